"""The exchange plan of the distributed Scion step: a pure value, built without communication.

Vocabulary: the *storage layout* is the shards megatron gives each rank (and the momentum, which
has the same sharding); the *compute layout* is whole logical matrices, which is what a
non-local LMO (spectral always, ``bias_rms`` on a TP-sharded bias) must see. The plan says which
logical matrices are dualized in storage layout (no communication) and, for the others, the
buckets of same-(lmo, shape, concat dim) matrices that travel together, in key order, and in
``owner`` mode the slot (rank of the exchange group) that computes each one.

Owners: greedy longest-processing-time over the slots, matrices by decreasing dualize cost
(:func:`plan_size`: Newton–Schulz's m·n·min(m, n) for spectral, m·n for the element-wise maps;
ties by key), each to the least-loaded slot (ties by slot). Every rank of a pipeline stage
builds its plan from the same inputs and gets the same buckets and owners, so no rank has to
tell another who owns what; :attr:`ExchangePlan.fingerprint` hashes those inputs and the optimizer compares it
across ranks once, so a disagreement fails with a message instead of a hang.
"""
from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

from disco_megatron.optim.layout import LogicalMatrix, ParamLayout, needs_whole
from disco_megatron.optim.newton_schulz import ns_flops
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


def plan_size(matrix: LogicalMatrix, lmo: str) -> tuple[int, int]:
    """(m, n) whose ``ns_flops`` is the matrix's dualize cost: m·n·min(m, n) for spectral,
    m·n for the element-wise maps (given as an (m·n)×1 matrix)."""
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

    def piece_shape(self, tp_size: int) -> tuple[int, ...]:
        """Shape of one TP rank's piece of each matrix (storage layout, pieces concatenated)."""
        piece = list(self.shape)
        piece[self.concat_dim] //= tp_size
        return tuple(piece)


@dataclass(frozen=True)
class ExchangePlan:
    """What the distributed dualize does, equal on every rank of a pipeline stage's exchange group.

    ``slots``: ranks of the exchange group (the TP group; TP×DP when ``dp_mode`` is sharded).
    ``in_place``: this rank's matrices dualized in storage layout (row-local LMOs on row shards,
    unsharded tensors, or everything in ``local`` mode), by LMO. ``buckets``: the matrices that go
    to compute layout; they and ``fingerprint`` are equal on every rank of the exchange group.
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
    fingerprint: int

    @property
    def owners(self) -> dict[str, int]:
        """Owner slot of each matrix key (owner mode; empty otherwise)."""
        return {e.matrix.key: o for b in self.buckets for e, o in zip(b.entries, b.owners)}

    def costs(self) -> dict[str, float]:
        """Dualize cost (``ns_flops`` of :func:`plan_size`) of each matrix that goes whole."""
        return {e.matrix.key: float(ns_flops(*plan_size(e.matrix, b.lmo))) for b in self.buckets for e in b.entries}

    def balance(self) -> float:
        """max/mean dualize cost over the slots (1.0 = perfect; owner mode)."""
        return plan_balance(self.owners, self.costs(), list(range(self.slots)))


def _exchanged(matrix: LogicalMatrix, lmo: str, tp_mode: str, dp_mode: str, tp_size: int) -> bool:
    """Whether a matrix goes to compute layout through the exchange (else it is dualized in place).

    At TP1 every matrix is whole on every rank; sharded DP still spreads the Newton–Schulz work
    of the spectral ones over the DP replicas (an owner computes, the others receive the result).
    """
    if tp_mode == "local":
        return False
    return needs_whole(matrix, lmo) or (dp_mode == "sharded" and tp_size == 1 and lmo == "spectral")


def build_exchange_plan(layouts: Sequence[ParamLayout], *, tp_size: int, dp_size: int = 1,
                        tp_mode: str = DEFAULTS.tp_mode, dp_mode: str = DEFAULTS.dp_mode,
                        ns_backend: str = DEFAULTS.ns_backend, ns_steps: int = DEFAULTS.ns_steps,
                        ns_dtype: str = NS_DTYPE_OTHER) -> ExchangePlan:
    """The plan for the parameter shards ``layouts`` of one rank (pure; see the module docstring).

    ``ns_dtype`` is the resolved Newton–Schulz precision (``scion_options.ns_dtype_for``): part of
    the fingerprint, so ranks that would round differently refuse to run together.

    The buckets hold only matrices that are not local to a rank, whose keys and shapes are the
    same on every TP rank, so every rank of the exchange group gets the same buckets and owners.
    """
    check_parallel_modes(tp_mode, dp_mode)
    check_option("ns_backend", ns_backend)
    check_option("ns_steps", ns_steps)
    if ns_dtype not in NS_DTYPES:
        raise ValueError(f"--scion-ns-dtype {ns_dtype}: choose one of {', '.join(NS_DTYPES)}")
    whole: dict[tuple[str, tuple[int, ...], int], list[PlannedMatrix]] = {}
    in_place: dict[str, list[PlannedMatrix]] = {}
    for index, layout in enumerate(layouts):
        for matrix in layout.matrices:
            if _exchanged(matrix, layout.lmo, tp_mode, dp_mode, tp_size):
                spec = (layout.lmo, matrix.shape, matrix.concat_dim)
                whole.setdefault(spec, []).append(PlannedMatrix(index, matrix))
            else:
                in_place.setdefault(layout.lmo, []).append(PlannedMatrix(index, matrix))
    grouped = sorted((spec, tuple(sorted(entries, key=lambda e: e.matrix.key))) for spec, entries in whole.items())
    slots = tp_size * dp_size if dp_mode == "sharded" else tp_size
    owners = plan_owners([(e.matrix.key, *plan_size(e.matrix, lmo)) for (lmo, _, _), entries in grouped
                          for e in entries], list(range(slots))) if tp_mode == "owner" else {}
    buckets = tuple(Bucket(lmo, shape, cdim, entries, tuple(owners[e.matrix.key] for e in entries) if owners else ())
                    for (lmo, shape, cdim), entries in grouped)
    specs = tuple((*spec, tuple(e.matrix.key for e in entries)) for spec, entries in grouped)
    return ExchangePlan(tp_mode=tp_mode, dp_mode=dp_mode, ns_backend=ns_backend, ns_steps=ns_steps,
                        ns_dtype=ns_dtype, tp_size=tp_size,
                        slots=slots, in_place=tuple(InPlace(lmo, tuple(e)) for lmo, e in in_place.items()),
                        buckets=buckets,
                        fingerprint=plan_fingerprint(tp_mode, dp_mode, ns_backend, ns_steps, ns_dtype, tp_size,
                                                     specs))
