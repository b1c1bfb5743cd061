"""Which TP rank runs the exact SVD of each TP-split logical matrix: the optimizer's owner.

An exact σ_max (and σ_min, for the condition number) needs the whole matrix. The distributed
Scion step already gives every matrix it exchanges one owner rank that receives the matrix
whole and dualizes it (:func:`~disco_megatron.optim.plan.plan_owners`, longest processing
time first); the tracker reuses that assignment, so the SVD of a matrix runs on the rank that
dualizes it, once, and the matrix travels to that rank only. A split matrix the plan does not
exchange (a row-local LMO on a vocab-parallel embedding or output layer; ``--scion-tp-mode``
``duplicated`` or ``local``; a ``--scion-qkv-split`` other than the tracker's q/k/v; Adam)
gets an owner by the same rule over the TP ranks. A matrix whole on one rank (replicated, or
TP1) needs no owner: the one rank that measures it runs its SVD.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from disco_megatron.models.naming import canonical_name
from disco_megatron.optim.layout import ParamLayout, matrix_key, split_matrix_key
from disco_megatron.optim.plan import ExchangePlan, plan_owners


def planned_svd_owners(plan: ExchangePlan, layouts: Sequence[tuple[str, ParamLayout]]) -> dict[str, int]:
    """TP rank of each norm key (``<global name>[:<part>]``) the optimizer's ``plan`` exchanges.

    ``layouts``: the global name (PP layer indices made global) and the optimizer's layout of
    each parameter; the plan's keys carry the optimizer's stage-local names, hence the pairing.
    Owners are slots of the exchange group; they are TP ranks when that group is the TP group
    (``--scion-dp-mode replicated``); with sharded DP this returns nothing (owners elsewhere).
    """
    if plan.slots != plan.tp_size:
        return {}
    owners = plan.owners
    out = {}
    for name, layout in layouts:
        for matrix in layout.matrices:
            if matrix.key in owners:
                out[matrix_key(canonical_name(name), split_matrix_key(matrix.key)[1])] = owners[matrix.key]
    return out


def optimizer_svd_owners(optimizer, named_params: Sequence[tuple[str, object]]) -> dict[str, int]:
    """:func:`planned_svd_owners` of a ``ScionOptimizer`` for ``named_params`` (global names); {} for another optimizer."""
    inner = getattr(optimizer, "optimizer", None)
    if not hasattr(inner, "plan"):
        return {}
    layout_of = {id(p): layout for p, layout in zip(optimizer.model_params, inner.layouts)}
    return planned_svd_owners(inner.plan, [(name, layout_of[id(p)]) for name, p in named_params if id(p) in layout_of])


def svd_owners(matrices: Sequence[tuple[str, int, int]], planned: Mapping[str, int], tp_size: int) -> dict[str, int]:
    """TP rank of each split ``(key, m, n)``: ``planned[key]`` where the plan has it, else balanced
    over the TP ranks by ``plan_owners`` (pure: every rank gets the same map)."""
    rest = [(key, m, n) for key, m, n in matrices if key not in planned]
    return {**{key: planned[key] for key, _, _ in matrices if key in planned},
            **plan_owners(rest, list(range(tp_size)))}
