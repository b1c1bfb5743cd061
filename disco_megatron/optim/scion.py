"""Single-process reference Scion (Pethick et al. 2025): the ground truth for the
distributed optimizer, which imports the update arithmetic from here.

Per parameter, with α = ``momentum`` (weight of the NEW gradient), ρ = ``radius``:

    d ← (1−α)·d + α·g
    W ← W·(1 − lr·wd)                      (decoupled weight decay, if wd > 0)
    W ← (1−lr)·W − lr·ρ·dualize(d)         (constrained)
    W ← W − lr·ρ·dualize(d)                (unconstrained)

No Adam moments: one momentum buffer per parameter, in fp32 (fp64 for fp64 parameters). This
reference does not clip; the distributed optimizer's optional clipping (``--clip-grad``) scales
the gradient by :func:`clip_coefficient` before the momentum update, which equals this
reference stepped on the clipped gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from disco_megatron.optim.lmo import LMO_PARAM_NDIM, check_lmo_name, dualize_many
from disco_megatron.scion_options import DEFAULTS, GROUP_DEFAULTS, check_option

# A group's LMO and Newton–Schulz settings travel in the group here (the distributed optimizer
# takes them from each parameter's layout and its own options instead).
SCION_DEFAULTS: dict[str, Any] = {
    **GROUP_DEFAULTS, "lmo": "spectral", "ns_backend": DEFAULTS.ns_backend, "ns_steps": DEFAULTS.ns_steps,
}


def update_momentum_(buf: Tensor, grad: Tensor, momentum: float, grad_scale: float = 1.0) -> None:
    """d ← (1−α)·d + α·s·g in place, α = ``momentum`` (the weight of the new gradient), s =
    ``grad_scale`` (a clip coefficient; scaling here spares a pass over the gradient)."""
    buf.mul_(1.0 - momentum).add_(grad, alpha=momentum * grad_scale)


def clip_coefficient(grad_norm: float, max_norm: float) -> float:
    """The factor megatron-core's ``clip_grad_by_total_norm_fp32`` scales gradients by:
    max_norm / (‖g‖ + 1e-6) when that is below 1, else 1 (and 1 when ``max_norm`` is 0: off)."""
    if max_norm <= 0.0:
        return 1.0
    return min(1.0, max_norm / (grad_norm + 1.0e-6))


def apply_update_(param: Tensor, direction: Tensor, *, lr: float, radius: float,
                  constrained: bool, weight_decay: float) -> None:
    """W ← W·(1−lr·wd), then W ← (1−lr)·W − lr·ρ·direction (constrained) or W − lr·ρ·direction.

    ``direction`` is dualize(d); it may be fp32 for a lower-precision ``param``.
    """
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    if constrained:
        param.mul_(1.0 - lr)
    param.add_(direction, alpha=-lr * radius)


def _momentum_dtype(p: Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 parameters, fp64 for fp64 ones."""
    return torch.promote_types(p.dtype, torch.float32)


def _check_group(group: Mapping[str, Any]) -> None:
    """Reject bad hyper-parameters at construction instead of mid-training."""
    check_lmo_name(group["lmo"])
    for key in ("lr", "radius"):
        if not 0.0 <= group[key] < math.inf:
            raise ValueError(f"Scion {key} must be >= 0 and finite, got {group[key]}")
    for option in ("momentum", "weight_decay", "ns_backend", "ns_steps"):
        check_option(option, group[option])
    ndim = LMO_PARAM_NDIM[group["lmo"]]
    for p in group["params"]:
        if p.ndim != ndim:
            raise ValueError(
                f"LMO {group['lmo']!r} needs {ndim}-D parameters, got one of shape "
                f"{tuple(p.shape)}; put it in a param group with a matching 'lmo'"
            )


def _check_row_splits(row_splits: Mapping[Tensor, Sequence[Tensor]],
                      params: set[Tensor]) -> None:
    """Each split must be a partition of the parameter's rows (every row exactly once)."""
    for p, splits in row_splits.items():
        if p not in params:
            raise ValueError(f"row_splits names a tensor of shape {tuple(p.shape)} that is not "
                             "a parameter of this optimizer")
        if p.ndim != 2:
            raise ValueError(f"row_splits only applies to 2-D parameters, got shape "
                             f"{tuple(p.shape)}")
        if any(idx.ndim != 1 or idx.dtype != torch.long for idx in splits):
            raise ValueError("row_splits entries must be 1-D LongTensors of row indices")
        rows = torch.cat([idx.cpu() for idx in splits] or [torch.empty(0, dtype=torch.long)])
        if not torch.equal(rows.sort().values, torch.arange(p.size(0))):
            raise ValueError(f"row_splits for a parameter of shape {tuple(p.shape)} must cover "
                             "each of its rows exactly once")


class Scion(torch.optim.Optimizer):
    """Reference Scion; see the module docstring for the update.

    Param-group keys: ``lr``, ``momentum`` (α, weight of the new gradient), ``radius`` (ρ),
    ``lmo`` (a name in ``LMOS``), ``constrained``, ``weight_decay``, ``ns_backend``,
    ``ns_steps``.

    ``row_splits`` maps a 2-D parameter to index sets of its rows, each one *logical matrix*
    (e.g. Q, K, V rows of a fused QKV weight per GQA group, the gate/up halves of a SwiGLU
    fc1): each is dualized on its own and the results scattered back. Parameters not in the
    mapping are dualized whole.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], *,
                 row_splits: Mapping[Tensor, Sequence[Tensor]] | None = None,
                 **defaults: Any) -> None:
        unknown = set(defaults) - set(SCION_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown Scion option(s) {sorted(unknown)}; "
                             f"valid: {', '.join(SCION_DEFAULTS)}")
        super().__init__(params, {**SCION_DEFAULTS, **defaults})
        self._row_splits: dict[Tensor, list[Tensor]] = {
            p: list(splits) for p, splits in (row_splits or {}).items()
        }
        _check_row_splits(self._row_splits,
                          {p for g in self.param_groups for p in g["params"]})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    def _momentum(self, p: Tensor, group: Mapping[str, Any]) -> Tensor:
        """Update and return the momentum d of ``p`` (kept in state, at least fp32)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=_momentum_dtype(p),
                                                        memory_format=torch.preserve_format)
        buf = state["momentum_buffer"]
        update_momentum_(buf, p.grad, group["momentum"])
        return buf

    def _after_update(self, p: Tensor, group: Mapping[str, Any]) -> None:
        """Hook for ScionLight; Scion has nothing to do."""

    def _directions(self, group: Mapping[str, Any], params: Sequence[Tensor],
                    moms: Sequence[Tensor]) -> list[Tensor]:
        """dualize(d) per parameter, logical matrix by logical matrix, NS batched by shape."""
        pieces: list[Tensor] = []
        for p, d in zip(params, moms):
            splits = self._row_splits.get(p)
            pieces.extend([d] if splits is None else [d[idx.to(d.device)] for idx in splits])
        results = iter(dualize_many(group["lmo"], pieces, ns_backend=group["ns_backend"],
                                    ns_steps=group["ns_steps"]))
        directions: list[Tensor] = []
        for p, d in zip(params, moms):
            splits = self._row_splits.get(p)
            if splits is None:
                directions.append(next(results))
                continue
            whole = torch.empty_like(d)
            for idx in splits:
                whole[idx.to(d.device)] = next(results)
            directions.append(whole)
        return directions

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise ValueError("Scion does not support sparse gradients")
            moms = [self._momentum(p, group) for p in params]
            directions = self._directions(group, params, moms)
            for p, direction in zip(params, directions):
                apply_update_(p, direction, lr=group["lr"], radius=group["radius"],
                              constrained=group["constrained"],
                              weight_decay=group["weight_decay"])
                self._after_update(p, group)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts floating state to each parameter's dtype; keep momentum at least fp32."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid, {}).get("momentum_buffer")
            if saved is not None:
                self.state[p]["momentum_buffer"] = saved.to(device=p.device,
                                                             dtype=_momentum_dtype(p), copy=True)


class ScionLight(Scion):
    """Memory-light Scion (as LIONS-EPFL/scion's ScionLight): the momentum lives in ``p.grad``.

    After the update, ``p.grad`` is multiplied by (1−α); the next backward then ADDS the new
    gradient, so ``p.grad`` holds d' = (1−α)·d' + g, which is Scion's d divided by α. Every LMO
    is invariant to positive scaling, so the updates equal Scion's (up to round-off), with no
    extra buffer. Consequences for the training loop:

    - it must NOT zero gradients between steps (no ``zero_grad``: ``ScionLight.zero_grad``
      raises, and ``model.zero_grad()`` or a DDP grad-buffer reset would silently turn it
      into momentum-free Scion); gradient accumulation over micro-batches must happen
      before ``step`` as usual;
    - ``p.grad`` must have the parameter's dtype (it is the only momentum copy).

    The momentum (``p.grad``) is saved in ``state_dict`` under ``grad_state`` and restored into
    ``p.grad`` by ``load_state_dict``.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], *,
                 row_splits: Mapping[Tensor, Sequence[Tensor]] | None = None,
                 **defaults: Any) -> None:
        super().__init__(params, row_splits=row_splits, **defaults)
        # Same hooks as LIONS-EPFL/scion: state_dict carries p.grad, load puts it back.
        self.register_state_dict_pre_hook(type(self)._store_grads_in_state)
        self.register_load_state_dict_post_hook(type(self)._load_grads_from_state)

    def _momentum(self, p: Tensor, group: Mapping[str, Any]) -> Tensor:
        return p.grad

    def _after_update(self, p: Tensor, group: Mapping[str, Any]) -> None:
        p.grad.mul_(1.0 - group["momentum"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        raise RuntimeError(
            "ScionLight keeps its momentum in p.grad: do not zero gradients between steps "
            "(use Scion if the training loop must zero them)"
        )

    def _store_grads_in_state(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["grad_state"] = p.grad

    def _load_grads_from_state(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                saved = self.state.get(p, {}).get("grad_state")
                p.grad = saved.to(device=p.device, dtype=p.dtype) if saved is not None else None
