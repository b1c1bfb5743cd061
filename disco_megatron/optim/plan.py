"""Ownership plan: which rank computes each whole logical matrix (pure, no communication).

Every rank of a pipeline stage calls :func:`plan_owners` with the same inputs and gets the same
answer, so no rank has to tell another who owns what. Greedy longest-processing-time: matrices
by decreasing Newton–Schulz cost (ties by key), each to the least-loaded rank (ties by position
in ``ranks``). :func:`plan_fingerprint` hashes the inputs; the optimizer compares it across
ranks once at construction so a disagreement fails with a message instead of a hang.
"""
from __future__ import annotations

import hashlib
import heapq
from collections.abc import Callable, Hashable, Mapping, Sequence

from disco_megatron.optim.newton_schulz import ns_flops


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
