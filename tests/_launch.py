"""Run ``python -m disco_megatron.train`` under torchrun in a subprocess, as a user would."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from disco_megatron.launcher import read_train_log, torchrun_command

TINY_MODEL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
              "--num-query-groups", "2", "--ffn-hidden-size", "128", "--seq-length", "32",
              "--vocab-size", "4096"]


def torchrun(nproc: int, args: list[str], timeout: float = 300.0, env: dict | None = None) -> subprocess.CompletedProcess:
    """torchrun --standalone --nproc-per-node NPROC -m disco_megatron.train ARGS (CPU, gloo)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(torchrun_command(args, nproc), capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def read_log(run_dir: str | Path) -> list[dict]:
    return read_train_log(str(run_dir))


def train_losses(run_dir: str | Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_log(run_dir) if "loss" in r}
