"""Multi-rank test helpers: gloo workers (a failing worker fails the test) and megatron-ordered groups."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch.distributed as dist

from disco_megatron.runtime.spawn import free_port, run_workers

__all__ = ["free_port", "run_workers", "megatron_groups"]

if TYPE_CHECKING:
    from disco_megatron.optim.distributed import StageGroups


def megatron_groups(tp: int, pp: int) -> tuple["StageGroups", tuple[int, int, int]]:
    """TP / DP / TP×DP groups in megatron's rank order (TP fastest, then DP, then PP), built with
    ``dist.new_group`` so tests need not import megatron; returns them and (tp, pp, dp) rank.

    Collective: every rank must call it with the same sizes.
    """
    from disco_megatron.optim.distributed import StageGroups

    world, rank = dist.get_world_size(), dist.get_rank()
    dp = world // (tp * pp)
    coord = lambda r: (r % tp, r // (tp * dp), (r // tp) % dp)  # noqa: E731
    mine = coord(rank)
    found: dict[str, dist.ProcessGroup] = {}
    for kind, same in (("tp", lambda c: (c[1], c[2])), ("dp", lambda c: (c[0], c[1])), ("tp_dp", lambda c: c[1])):
        keys = sorted({same(coord(r)) for r in range(world)})
        for key in keys:
            group = dist.new_group([r for r in range(world) if same(coord(r)) == key])
            if same(mine) == key:
                found[kind] = group
    return StageGroups(tp=found["tp"], dp=found["dp"], tp_dp=found["tp_dp"], world=None), mine
