"""Run a function on N local one-thread gloo processes (tests, benchmarks, CPU experiments)."""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable[..., None], world_size: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Run top-level ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes with torchrun's
    environment variables set (so ``initialize_parallel`` works inside); a failing rank raises here."""
    mp.spawn(_worker, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)
