"""The exchange plan of the distributed Scion step: a pure value, built without communication.

Vocabulary: the *storage layout* is the shards megatron gives each rank (and the momentum, which
has the same sharding); the *compute layout* is whole logical matrices, which is what a
non-local LMO (spectral always, ``bias_rms`` on a TP-sharded bias) must see. The plan says which
logical matrices are dualized in storage layout (no communication) and, for the others, the
buckets of same-(lmo, shape, concat dim) matrices that travel together, in key order, and in
``owner`` mode the slot (rank of the exchange group) that computes each one.

Owners: greedy longest-processing-time over the slots, matrices by decreasing dualize cost
(:func:`dualize_cost`: Newton–Schulz's flops in the form the kernel takes for spectral; for the
element-wise maps those of an (m·n)×1 matrix, which grow as m·n; ties by key), each to the
least-loaded slot (ties by slot). Every rank of a pipeline stage builds its plan from the same
inputs and gets the same buckets and owners, so no rank has to tell another who owns what;
:attr:`ExchangePlan.fingerprint` hashes those inputs and the optimizer compares it across ranks
once, so a disagreement fails with a message instead of a hang.

``dp_mode="sharded"``: every logical matrix of the stage has exactly one owner slot among the
TP×DP ranks (slot = dp rank · TP + tp rank, megatron's order), which holds its momentum and fp32
master. Nothing is dualized in place. Row-local maps on whole or row-sharded matrices (vocab rows)
become :class:`RowBlocks`: each TP piece's rows split evenly over the DP replicas of that TP rank
(over all TP×DP slots for a matrix whole on every TP rank), so they need no gather and their state
spreads evenly; every other matrix goes whole to one LPT-chosen owner through a bucket.
"""
from __future__ import annotations

import functools
import hashlib
import heapq
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

from disco_megatron.optim.layout import LogicalMatrix, ParamLayout, needs_whole, row_blockable
from disco_megatron.optim.newton_schulz import NS_TORCH_DTYPES, ns_flops
from disco_megatron.scion_options import DEFAULTS, NS_DTYPE_OTHER, NS_DTYPES, check_option, check_parallel_modes


def plan_owners(matrices: Sequence[tuple[str, int, int]], ranks: Sequence[int],
                cost: Callable[[int, int], float] = ns_flops) -> dict[str, int]:
    """Map each matrix key (with its m, n) to one of ``ranks``, balancing ``cost(m, n)``."""
    if not ranks:
        raise ValueError("plan_owners needs at least one rank")
    keys = [key for key, _, _ in matrices]
    if len(set(keys)) != len(keys):
        raise ValueError("plan_owners: matrix keys must be unique")
    heap = [(0.0, position) for position in range(len(ranks))]
    owners: dict[str, int] = {}
    for key, m, n in sorted(matrices, key=lambda kmn: (-cost(kmn[1], kmn[2]), kmn[0])):
        load, position = heapq.heappop(heap)
        owners[key] = ranks[position]
        heapq.heappush(heap, (load + cost(m, n), position))
    return owners


def rank_loads(plan: Mapping[str, int], costs: Mapping[str, float],
               ranks: Sequence[int] | None = None) -> dict[int, float]:
    """Total cost per rank (ranks without matrices count as 0 when listed in ``ranks``)."""
    loads = {r: 0.0 for r in (ranks if ranks is not None else sorted(set(plan.values())))}
    for key, owner in plan.items():
        loads[owner] = loads.get(owner, 0.0) + costs[key]
    return loads


def plan_balance(plan: Mapping[str, int], costs: Mapping[str, float],
                 ranks: Sequence[int] | None = None) -> float:
    """max/mean load over ranks: 1.0 is perfect balance."""
    loads = list(rank_loads(plan, costs, ranks).values())
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 1.0


def plan_fingerprint(*parts: Hashable) -> int:
    """A 63-bit hash of ``parts`` (their repr), equal on every rank iff the parts are equal."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def dualize_cost(ns_backend: str, ns_steps: int, ns_dtype: str) -> Callable[[int, int], float]:
    """``cost(m, n)`` of a :func:`plan_size`: ``ns_flops`` at this backend, step count and precision."""
    return functools.partial(ns_flops, steps=ns_steps, dtype=NS_TORCH_DTYPES[ns_dtype], backend=ns_backend)


def plan_size(matrix: LogicalMatrix, lmo: str) -> tuple[int, int]:
    """(m, n) whose ``ns_flops`` is the matrix's dualize cost: its shape for spectral, (m·n)×1
    for the element-wise maps (a cost that grows as m·n)."""
    if lmo == "spectral":
        return matrix.shape[0], matrix.shape[1]
    return math.prod(matrix.shape), 1


@dataclass(frozen=True)
class PlannedMatrix:
    """One logical matrix of the plan: the index of its parameter (in the layouts planned) and
    where this rank's piece of it lies."""

    param: int
    matrix: LogicalMatrix


@dataclass(frozen=True)
class InPlace:
    """Matrices of one LMO that this rank dualizes on its own pieces (no communication)."""

    lmo: str
    entries: tuple[PlannedMatrix, ...]


@dataclass(frozen=True)
class Bucket:
    """Same-(lmo, whole shape, concat dim) matrices, in key order; in owner mode the slot that
    dualizes each (``owners[i]`` for ``entries[i]``), else no owners (every rank dualizes all)."""

    lmo: str
    shape: tuple[int, ...]
    concat_dim: int
    entries: tuple[PlannedMatrix, ...]
    owners: tuple[int, ...]
    split: int

    @property
    def piece_shape(self) -> tuple[int, ...]:
        """Shape of one TP rank's piece of each matrix (``split`` pieces concatenated make it;
        split 1: every TP rank holds it whole)."""
        piece = list(self.shape)
        piece[self.concat_dim] //= self.split
        return tuple(piece)


@dataclass(frozen=True)
class RowBlocks:
    """Sharded mode: a row-locally dualized matrix whose piece's rows [bounds[j], bounds[j+1])
    are owned by slot ``owners[j]``; the owners are exactly the slots that hold this piece."""

    lmo: str
    entry: PlannedMatrix
    bounds: tuple[int, ...]
    owners: tuple[int, ...]

    def rows_of(self, slot: int) -> tuple[int, int] | None:
        """The piece rows ``slot`` owns (None: it owns none)."""
        return next(((self.bounds[j], self.bounds[j + 1]) for j, o in enumerate(self.owners) if o == slot), None)


@dataclass(frozen=True)
class ExchangePlan:
    """What the distributed dualize does, equal on every rank of a pipeline stage's exchange group.

    ``slots``: ranks of the exchange group (the TP group; TP×DP when ``dp_mode`` is sharded).
    ``in_place``: this rank's matrices dualized in storage layout (row-local LMOs on row shards,
    unsharded tensors, or everything in ``local`` mode), by LMO; empty when sharded. ``buckets``:
    the matrices that go to compute layout; they and ``fingerprint`` are equal on every rank of
    the exchange group. ``row_blocks`` (sharded only): this rank's row-blocked matrices.
    """

    tp_mode: str
    dp_mode: str
    ns_backend: str
    ns_steps: int
    ns_dtype: str
    tp_size: int
    slots: int
    in_place: tuple[InPlace, ...]
    buckets: tuple[Bucket, ...]
    row_blocks: tuple[RowBlocks, ...]
    fingerprint: int

    @property
    def owners(self) -> dict[str, int]:
        """Owner slot of each matrix key (owner mode; empty otherwise)."""
        return {e.matrix.key: o for b in self.buckets for e, o in zip(b.entries, b.owners)}

    def cost(self, m: int, n: int) -> float:
        """:func:`dualize_cost` of a :func:`plan_size` (m, n) at the plan's backend, steps and precision."""
        return float(dualize_cost(self.ns_backend, self.ns_steps, self.ns_dtype)(m, n))

    def costs(self) -> dict[str, float]:
        """Dualize cost of each matrix that goes whole."""
        return {e.matrix.key: self.cost(*plan_size(e.matrix, b.lmo)) for b in self.buckets for e in b.entries}

    def balance(self) -> float:
        """max/mean dualize cost over the slots (1.0 = perfect; owner mode)."""
        return plan_balance(self.owners, self.costs(), list(range(self.slots)))

    def owned_numel(self, slot: int) -> int:
        """Elements of the logical matrices (and row blocks) whose state ``slot`` holds (sharded
        mode; the row blocks counted are this rank's TP piece's, so ask for this rank's slot)."""
        whole = sum(math.prod(b.shape) for b in self.buckets for o in b.owners if o == slot)
        blocks = sum((rows[1] - rows[0]) * math.prod(rb.entry.matrix.shape[1:])
                     for rb in self.row_blocks if (rows := rb.rows_of(slot)) is not None)
        return whole + blocks


def _exchanged(matrix: LogicalMatrix, lmo: str, tp_mode: str, dp_mode: str, tp_size: int) -> bool:
    """Whether a matrix goes to compute layout through the exchange (else it is dualized in place).

    At TP1 every matrix is whole on every rank; sharded DP still spreads the Newton–Schulz work
    of the spectral ones over the DP replicas (an owner computes, the others receive the result).
    """
    if tp_mode == "local":
        return False
    return needs_whole(matrix, lmo) or dp_mode == "sharded"


def _row_blocks(entry: PlannedMatrix, lmo: str, tp_size: int, tp_rank: int, dp_size: int) -> RowBlocks:
    """Sharded mode: split the piece's rows over the DP replicas of this TP rank (a row shard),
    or over every slot (a matrix whole on every TP rank), in near-equal contiguous blocks."""
    rows = sum(b - a for a, b in entry.matrix.local_rows)
    owners = tuple(range(tp_size * dp_size)) if entry.matrix.local \
        else tuple(d * tp_size + tp_rank for d in range(dp_size))
    n = len(owners)
    return RowBlocks(lmo, entry, tuple(j * rows // n for j in range(n + 1)), owners)


def _check_sharded(layouts: Sequence[ParamLayout], tp_size: int) -> None:
    """Sharded mode needs every matrix to be the same on every TP rank (a per-head split is not)."""
    for layout in layouts:
        if tp_size > 1 and layout.partition_dim is not None and any(m.local for m in layout.matrices):
            raise ValueError(f"{layout.name}: --scion-qkv-split head at --tensor-model-parallel-size > 1 gives "
                             "each TP rank its own matrices, which --scion-dp-mode sharded cannot spread over "
                             "TP×DP; use --scion-qkv-split qkv (or fused) or --scion-dp-mode replicated")


def build_exchange_plan(layouts: Sequence[ParamLayout], *, tp_size: int, dp_size: int = 1, tp_rank: int = 0,
                        tp_mode: str = DEFAULTS.tp_mode, dp_mode: str = DEFAULTS.dp_mode,
                        ns_backend: str = DEFAULTS.ns_backend, ns_steps: int = DEFAULTS.ns_steps,
                        ns_dtype: str = NS_DTYPE_OTHER) -> ExchangePlan:
    """The plan for the parameter shards ``layouts`` of one rank (pure; see the module docstring).

    ``ns_dtype`` is the resolved Newton–Schulz precision (``scion_options.ns_dtype_for``): part of
    the fingerprint, so ranks that would round differently refuse to run together. ``tp_rank``
    (this rank's) only places the owners of row blocks in sharded mode.

    The buckets hold only matrices that are not local to a rank, whose keys and shapes are the
    same on every TP rank, so every rank of the exchange group gets the same buckets and owners.
    """
    check_parallel_modes(tp_mode, dp_mode)
    check_option("ns_backend", ns_backend)
    check_option("ns_steps", ns_steps)
    if ns_dtype not in NS_DTYPES:
        raise ValueError(f"--scion-ns-dtype {ns_dtype}: choose one of {', '.join(NS_DTYPES)}")
    sharded = dp_mode == "sharded"
    if sharded:
        _check_sharded(layouts, tp_size)
    whole: dict[tuple[str, tuple[int, ...], int, int], list[PlannedMatrix]] = {}
    in_place: dict[str, list[PlannedMatrix]] = {}
    row_blocks: list[RowBlocks] = []
    for index, layout in enumerate(layouts):
        for matrix in layout.matrices:
            entry = PlannedMatrix(index, matrix)
            if sharded and row_blockable(matrix, layout.lmo):
                row_blocks.append(_row_blocks(entry, layout.lmo, tp_size, tp_rank, dp_size))
            elif _exchanged(matrix, layout.lmo, tp_mode, dp_mode, tp_size):
                spec = (layout.lmo, matrix.shape, matrix.concat_dim, 1 if matrix.local else tp_size)
                whole.setdefault(spec, []).append(entry)
            else:
                in_place.setdefault(layout.lmo, []).append(entry)
    grouped = sorted((spec, tuple(sorted(entries, key=lambda e: e.matrix.key))) for spec, entries in whole.items())
    slots = tp_size * dp_size if sharded else tp_size
    owners = plan_owners([(e.matrix.key, *plan_size(e.matrix, spec[0])) for spec, entries in grouped
                          for e in entries], list(range(slots)), dualize_cost(ns_backend, ns_steps, ns_dtype)) \
        if tp_mode == "owner" else {}
    buckets = tuple(Bucket(lmo, shape, cdim, entries, tuple(owners[e.matrix.key] for e in entries) if owners else (),
                           split) for (lmo, shape, cdim, split), entries in grouped)
    specs = tuple((*spec, tuple(e.matrix.key for e in entries)) for spec, entries in grouped)
    blocked = tuple((rb.lmo, rb.entry.matrix.key, rb.entry.matrix.shape, len(rb.owners)) for rb in row_blocks)
    return ExchangePlan(tp_mode=tp_mode, dp_mode=dp_mode, ns_backend=ns_backend, ns_steps=ns_steps,
                        ns_dtype=ns_dtype, tp_size=tp_size,
                        slots=slots, in_place=tuple(InPlace(lmo, tuple(e)) for lmo, e in in_place.items()),
                        buckets=buckets, row_blocks=tuple(row_blocks),
                        fingerprint=plan_fingerprint(tp_mode, dp_mode, ns_backend, ns_steps, ns_dtype, tp_size,
                                                     specs, blocked))
