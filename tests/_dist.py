"""Multi-rank test helpers: gloo workers (a failing worker fails the test) and megatron-ordered groups."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch.distributed as dist

from disco_megatron.runtime.spawn import free_port, run_workers

__all__ = ["free_port", "run_workers", "megatron_groups"]

if TYPE_CHECKING:
    from disco_megatron.optim.distributed import StageGroups


def megatron_groups(tp: int, pp: int, dp: int | None = None) -> tuple["StageGroups", tuple[int, int, int]]:
    """TP / DP / TP×DP groups in megatron's rank order (TP fastest, then DP, then PP), built with
    ``dist.new_group`` so tests need not import megatron; returns them and (tp, pp, dp) rank.

    ``dp`` (default: the rest of the world) makes a layout of tp·pp·dp ranks that runs on each
    block of that many consecutive ranks at once (its ``world`` group is the block).
    Collective: every rank must call it with the same sizes.
    """
    from disco_megatron.optim.distributed import StageGroups

    world, rank = dist.get_world_size(), dist.get_rank()
    dp = dp or world // (tp * pp)
    size = tp * pp * dp
    assert world % size == 0, f"world {world} is not a multiple of TP{tp} x PP{pp} x DP{dp}"
    coord = lambda r: (r // size, r % tp, (r % size) // (tp * dp), (r % size // tp) % dp)  # noqa: E731
    mine = coord(rank)
    found: dict[str, dist.ProcessGroup | None] = {}
    kinds = {"tp": lambda c: (c[0], c[2], c[3]), "dp": lambda c: (c[0], c[1], c[2]),
             "tp_dp": lambda c: (c[0], c[2]), "world": lambda c: c[0]}
    for kind, same in kinds.items():
        for key in sorted({same(coord(r)) for r in range(world)}):
            group = dist.new_group([r for r in range(world) if same(coord(r)) == key])
            if same(mine) == key:
                found[kind] = group
    return StageGroups(**found), mine[1:]
