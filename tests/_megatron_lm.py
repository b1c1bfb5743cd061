"""The Megatron-LM fixture (core_v0.16.1's training package) and running its ``pretrain_gpt.py``.

The folder is ``$MEGATRON_LM``, else ``shared/megatron-lm`` beside the repository (where CI puts
the fixture); tests that need it skip, naming the path, only when it is absent. It goes on the
subprocess's ``PYTHONPATH`` (and on ``sys.path`` for in-process tests), so it need not be installed;
its imports need ``six`` and ``triton`` (the ``test`` extra).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _dist import free_port

REPO = Path(__file__).resolve().parents[1]
MEGATRON_LM = Path(os.environ.get("MEGATRON_LM") or REPO.parent / "shared" / "megatron-lm")
PRETRAIN_GPT = MEGATRON_LM / "pretrain_gpt.py"
LAUNCHER = Path(__file__).with_name("_megatron_lm_cpu.py")

needs_megatron_lm = pytest.mark.skipif(
    not PRETRAIN_GPT.is_file(),
    reason=f"no Megatron-LM at {MEGATRON_LM} (set MEGATRON_LM, or put Megatron-LM core_v0.16.1's training "
           "package in shared/megatron-lm beside the repository)")


def run_pretrain_gpt(nproc: int, flags: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node NPROC`` the plug-in on Megatron-LM's ``pretrain_gpt.py``, on CPU with gloo.

    CPU on every machine (GPUs hidden), so runs at different TP sizes share one arithmetic.
    ``--use-cpu-initialization`` draws each full weight, then cuts the rank's shard, so a seed gives
    the same model at every TP size.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), str(LAUNCHER), str(PRETRAIN_GPT), *flags,
           "--distributed-backend", "gloo", "--use-cpu-initialization"]
    path = os.pathsep.join(p for p in (str(MEGATRON_LM), str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", CUDA_DEVICE_MAX_CONNECTIONS="1",
               PYTHONPATH=path)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
