"""Spawn gloo worker processes for multi-rank tests; a failing worker fails the test."""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import torch.multiprocessing as mp

if TYPE_CHECKING:
    from disco_megatron.optim.distributed import StageGroups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable[..., None], world_size: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_workers(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Run top-level ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes."""
    mp.spawn(_worker, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)


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
