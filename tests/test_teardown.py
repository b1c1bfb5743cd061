"""Orderly teardown (runtime.parallel.destroy_parallel) and the stress runner.

A gloo process group's C++ threads (``pt_gloo_runloop`` workers, the ``gloo_tcp_loop`` device
loop) are joined only when the group object is freed. Left alive to interpreter exit, a worker
that releases a finished collective's tensors there aborts the process (SIGABRT, "terminate
called without an active exception") at random. These tests pin the fix deterministically: after
teardown no gloo thread is left, and a leaked group fails the spawn helper every time.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from _dist import run_workers

REPO = Path(__file__).resolve().parents[1]
_LEAKED: list = []


def ddp_step_then_teardown_worker(rank: int, world: int) -> None:
    """A TP2 GPTModel (RoPE, whose lru_cache pins the model) in megatron DDP, one step, teardown."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from disco_megatron.config import ModelConfig
    from disco_megatron.models import build_gpt_model
    from disco_megatron.runtime import destroy_parallel, initialize_parallel
    from disco_megatron.runtime.parallel import live_gloo_threads

    initialize_parallel(2, 1)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, seq_length=16, vocab_size=128, make_vocab_size_divisible_by=64)
    model = build_gpt_model(cfg)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    ddp(tokens[:, :-1], torch.arange(16).expand(2, -1), None, labels=tokens[:, 1:]).mean().backward()
    ddp.finish_grad_sync()
    before = live_gloo_threads()
    assert before.count("pt_gloo_runloop") >= 4, before  # the detector sees live groups here
    del ddp, model
    destroy_parallel()
    assert live_gloo_threads() == [], live_gloo_threads()


def test_teardown_joins_every_gloo_thread() -> None:
    run_workers(ddp_step_then_teardown_worker, 2)


def leak_a_group_worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    _LEAKED.append(dist.new_group([0, 1]))


def test_spawn_helper_fails_on_a_leaked_process_group() -> None:
    with pytest.raises(mp.ProcessRaisedException, match="gloo threads .* outlived destroy_parallel"):
        run_workers(leak_a_group_worker, 2)


def test_stress_counts_failures_per_test(tmp_path: Path) -> None:
    tests = tmp_path / "test_flaky_fixture.py"
    tests.write_text("def test_ok():\n    pass\n\n\ndef test_bad():\n    assert False\n")
    result = subprocess.run(["bash", str(REPO / "tests" / "stress.sh"), "2", str(tests)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stress: 2 of 2 runs failed" in result.stdout
    assert re.search(r"^ +2 \S*test_flaky_fixture\.py::test_bad$", result.stdout, re.M), result.stdout
    assert "test_ok" not in result.stdout.split("failures per test:")[1]


@pytest.mark.parametrize("args", [[], ["0"], ["x"], ["-3"]])
def test_stress_rejects_a_bad_count(args: list[str]) -> None:
    result = subprocess.run(["bash", str(REPO / "tests" / "stress.sh"), *args], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "usage: bash tests/stress.sh N" in result.stderr
