"""Run a function on N local one-thread gloo processes (tests, benchmarks, tools that spawn ranks)."""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from disco_megatron.runtime.parallel import destroy_parallel, init_process_group, live_gloo_threads


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable[..., None], world_size: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    init_process_group(backend="gloo")
    try:
        fn(rank, world_size, *args)
    except BaseException:
        destroy_parallel(synchronize=False)  # a peer may be stuck in a collective: no barrier
        raise
    destroy_parallel()
    if leftover := live_gloo_threads():
        raise RuntimeError(
            f"rank {rank}: {len(leftover)} gloo threads ({', '.join(sorted(set(leftover)))}) outlived "
            f"destroy_parallel(): something still references a process group; release it (or add it to "
            "runtime.parallel._release_megatron_state) so the process cannot abort at interpreter exit")


def run_workers(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Run top-level ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes with torchrun's
    environment variables set (so ``initialize_parallel`` works inside); a failing rank raises here.

    Every rank ends through :func:`~disco_megatron.runtime.parallel.destroy_parallel` and then
    checks that no gloo thread survived it, so a leaked process group fails the run here instead of
    aborting a later process exit at random.
    """
    mp.spawn(_worker, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)
