"""Run ``python -m disco_megatron.train`` under torchrun in a subprocess, as a user would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests._dist import free_port

TINY_MODEL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
              "--num-query-groups", "2", "--ffn-hidden-size", "128", "--seq-length", "32",
              "--vocab-size", "4096"]


def torchrun(nproc: int, args: list[str], timeout: float = 300.0, env: dict | None = None,
             module: str = "disco_megatron.train") -> subprocess.CompletedProcess:
    """torchrun --nproc-per-node NPROC -m MODULE ARGS (CPU, gloo); returns the completed process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "-m", module, *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: str | Path) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_log(run_dir) if "loss" in r}
