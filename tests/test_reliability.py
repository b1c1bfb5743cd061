"""Faults lose nothing: a killed rank, a save cut short, non-finite steps; resume is bit-exact.

Every run is a real torchrun launch of ``disco_megatron.train`` on the tiny model; checkpoints
are read back with torch's DCP reader (no process group), so weights are compared as saved.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import torch

from disco_megatron.launcher import torchrun_command
from tests._dist import run_workers
from tests._launch import TINY_MODEL, read_log, torchrun, train_losses
from tests.test_bad_inputs import LAUNCHER_FAILED, assert_reported

OPTIMIZER = ["--optimizer", "scion", "--lr", "0.01"] if importlib.util.find_spec("disco_megatron.optim.megatron") \
    else ["--optimizer", "adam", "--lr", "3e-3"]
TP2 = ["--tensor-model-parallel-size", "2"]
TP2PP2 = [*TP2, "--pipeline-model-parallel-size", "2"]
EXIT_LIMIT_S = 60.0


def _args(run_dir: Path, iters: int, *extra: str) -> list[str]:
    return [*TINY_MODEL, *OPTIMIZER, "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", str(iters), "--log-interval", "1", "--run-dir", str(run_dir), *extra]


def checkpoint_tensors(ckpt: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved iteration (model and optimizer state), whole, by flattened key."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / f"{ckpt.parent.parent.name}_{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    flat: dict[str, torch.Tensor] = {}
    pending = [("", torch.load(out, weights_only=False))]
    while pending:
        prefix, tree = pending.pop()
        for key, value in tree.items():
            if isinstance(value, dict):
                pending.append((f"{prefix}{key}.", value))
            elif torch.is_tensor(value):
                flat[prefix + key] = value
    return flat


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    assert any(k.startswith("optimizer.") for k in a), "optimizer state must be in the checkpoint"
    for key in a:
        assert torch.equal(a[key], b[key]), (key, (a[key] - b[key]).abs().max().item())


def test_resume_is_bit_exact_in_losses_and_weights(tmp_path):
    """20 steps vs 10 + save + load + 10: the same losses and the same final weights and optimizer state."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    result = torchrun(2, _args(full, 20, *TP2, "--save-interval", "10"))
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun(2, _args(resumed, 20, *TP2, "--load", str(full / "checkpoints"), "--ckpt-step", "10"))
    assert result.returncode == 0, result.stderr[-3000:]
    losses, again = train_losses(full), train_losses(resumed)
    assert sorted(again) == list(range(11, 21))
    assert [again[i] for i in range(11, 21)] == [losses[i] for i in range(11, 21)]
    assert losses[20] < losses[1]
    final = checkpoint_tensors(full / "checkpoints" / "iter_0000020", tmp_path)
    assert_same_tensors(final, checkpoint_tensors(resumed / "checkpoints" / "iter_0000020", tmp_path))
    assert not torch.equal(final["output_layer.weight"],
                           checkpoint_tensors(full / "checkpoints" / "iter_0000010", tmp_path)["output_layer.weight"])


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    """NaN at 3, 4 (skipped: weights of iter 4 == iter 2), then 6, 7, 8: the third in a row stops the run."""
    run = tmp_path / "run"
    result = torchrun(2, _args(run, 10, *TP2, "--save-interval", "2", "--max-skipped-steps", "3"),
                      env={"DISCO_FAULT_NAN_AT": "3,4,6,7,8"})
    assert result.returncode != 0
    assert LAUNCHER_FAILED in result.stderr
    assert_reported(result.stderr, 2, "3 non-finite steps in a row", "--max-skipped-steps 3")
    assert "iteration 3: skipped, non-finite loss/gradients (1 in a row, 1 in total)" in result.stdout
    assert "iteration 7: skipped, non-finite loss/gradients (2 in a row, 4 in total)" in result.stdout
    records = {r["iteration"]: r for r in read_log(run) if "loss" in r}
    assert sorted(records) == list(range(1, 8))
    assert [records[i]["skipped_steps"] for i in range(1, 8)] == [0, 0, 1, 2, 2, 3, 4]
    assert all(math.isnan(records[i]["loss"]) for i in (3, 4, 6, 7))
    assert all(math.isfinite(records[i]["loss"]) for i in (1, 2, 5))
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000002", "iter_0000004", "iter_0000006"]
    saved = {i: checkpoint_tensors(ckpts / f"iter_{i:07d}", tmp_path) for i in (2, 4, 6)}
    for tensors in saved.values():
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert_same_tensors(saved[2], saved[4])
    assert not torch.equal(saved[4]["output_layer.weight"], saved[6]["output_layer.weight"])


def _adam_skip_worker(rank: int, world: int) -> None:
    """TP2 megatron-core Adam as disco-pretrain builds it, NaN in rank 1's gradient only."""
    import torch.distributed as dist

    from disco_megatron.builders import build_trainable
    from disco_megatron.config import ModelConfig, RunConfig
    from disco_megatron.runtime import initialize_parallel

    initialize_parallel(tp=world, pp=1, seed=3)
    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=128, seq_length=16, vocab_size=256, make_vocab_size_divisible_by=64)
    parts = build_trainable(RunConfig(model=model, optimizer="adam", lr=1e-3, tensor_model_parallel_size=world))
    params = [p for chunk in parts.model for p in chunk.parameters()]
    for param in params:
        param.main_grad.fill_(0.01)  # DDP's gradient buffer, as after a backward pass
    if rank == 1:
        params[0].main_grad.view(-1)[0] = float("nan")
    before = [p.detach().clone() for p in params]
    reductions = []
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda tensor, *args, **kwargs: reductions.append(tensor.numel()) or all_reduce(
        tensor, *args, **kwargs)
    try:
        outcome = parts.optimizer.step()
    finally:
        dist.all_reduce = all_reduce
    assert outcome == (False, None, None), (rank, outcome)  # on rank 0 too: its own gradients are finite
    assert reductions == [1], reductions
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not parts.optimizer.optimizer.state
    if rank == 1:
        params[0].main_grad.view(-1)[0] = 0.01
    applied, _, _ = parts.optimizer.step()
    assert applied and all(not torch.equal(p, b) for p, b in zip(params, before))


def test_adam_skips_a_non_finite_step_on_every_rank_with_one_reduction():
    """The loop skips a step on the optimizer's answer alone, so megatron's Adam must answer like
    Scion: a NaN on one TP rank makes ``step()`` return (False, None, None) on both, after one
    all-reduce of one element, with weights and moments untouched; finite gradients then step."""
    run_workers(_adam_skip_worker, 2)


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL after the shards of iteration 4 are written, before the rename: pointer and iter 2 stay
    valid, the resumed run repeats steps 3-4 exactly and finishes, replacing the leftover .tmp."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    ckpts = first / "checkpoints"
    result = torchrun(2, _args(first, 6, *TP2, "--save-interval", "2"), env={"DISCO_FAULT_KILL_IN_SAVE_AT": "4"})
    assert result.returncode != 0
    assert (ckpts / "iter_0000004.tmp").is_dir() and not (ckpts / "iter_0000004").exists()
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "2"
    result = torchrun(2, _args(resumed, 6, *TP2, "--load", str(ckpts), "--save", str(ckpts), "--save-interval", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {ckpts} at iteration 2" in result.stdout
    before, after = train_losses(first), train_losses(resumed)
    assert sorted(after) == [3, 4, 5, 6]
    assert [after[3], after[4]] == [before[3], before[4]]
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "6"
    assert not list(ckpts.glob("*.tmp"))


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _latest(ckpts: Path) -> str:
    pointer = ckpts / "latest_checkpointed_iteration.txt"
    return pointer.read_text() if pointer.is_file() else ""


def _logged_iterations(run_dir: Path) -> int:
    return max(train_losses(run_dir), default=0) if (run_dir / "train_log.jsonl").is_file() else 0


def _workers(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """torchrun's worker processes by global rank."""
    found = {}
    for child in launcher.children():
        rank = child.environ().get("RANK")
        if rank is not None:
            found[int(rank)] = child
    return found


def _kill_tree(launcher: subprocess.Popen) -> None:
    """SIGKILL a launcher this test started, and its workers, if it is still running (not yet reaped,
    so its pid is still its own)."""
    if launcher.poll() is not None:
        return
    root = psutil.Process(launcher.pid)
    for process in [*root.children(recursive=True), root]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    launcher.wait()


def test_killed_rank_stops_every_rank_and_the_run_resumes(tmp_path):
    """SIGKILL rank 1 of a TP2xPP2 run after its iteration-4 checkpoint: torchrun stops every other
    rank (SIGTERM, well within a minute; the gloo timeout is only the backstop), and a relaunch with
    --load repeats the lost steps exactly and reaches the last iteration."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    ckpts = first / "checkpoints"
    cmd = torchrun_command(_args(first, 12, *TP2PP2, "--save-interval", "4"), 4)
    with open(tmp_path / "first.out", "w") as out, open(tmp_path / "first.err", "w") as err:
        launcher = subprocess.Popen(cmd, stdout=out, stderr=err, env=dict(os.environ, OMP_NUM_THREADS="1"))
        try:
            _wait_for(lambda: (_latest(ckpts) == "4" and _logged_iterations(first) >= 6) or launcher.poll() is not None,
                      300, "iteration 6 after the first checkpoint")
            assert launcher.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
            workers = _workers(psutil.Process(launcher.pid))
            assert sorted(workers) == [0, 1, 2, 3]
            killed_at = time.monotonic()
            os.kill(workers[1].pid, signal.SIGKILL)
            _, alive = psutil.wait_procs([workers[r] for r in (0, 2, 3)], timeout=EXIT_LIMIT_S)
            assert not alive, f"ranks still running {EXIT_LIMIT_S} s after rank 1 was killed"
            assert launcher.wait(timeout=EXIT_LIMIT_S) != 0
            assert time.monotonic() - killed_at < EXIT_LIMIT_S
        finally:
            _kill_tree(launcher)
    exit_codes = dict(re.findall(r"rank\s+: (\d) \(local_rank: \d\)\n\s+exitcode\s+: (-?\d+)",
                                 (tmp_path / "first.err").read_text()))
    assert exit_codes == {"1": str(-signal.SIGKILL), "0": str(-signal.SIGTERM), "2": str(-signal.SIGTERM),
                          "3": str(-signal.SIGTERM)}, exit_codes
    lost = train_losses(first)
    assert _latest(ckpts) in ("4", "8") and max(lost) < 12
    start = int(_latest(ckpts))
    result = torchrun(4, _args(resumed, 12, *TP2PP2, "--load", str(ckpts)))
    assert result.returncode == 0, result.stderr[-3000:]
    again = train_losses(resumed)
    assert sorted(again) == list(range(start + 1, 13))
    assert [again[i] for i in range(start + 1, max(lost) + 1)] == [lost[i] for i in range(start + 1, max(lost) + 1)]


def _signalled_after_step_4(tmp_path: Path, run_dir: Path, iters: int, to_launcher: bool) -> int:
    """Launch a TP2 run; after its step 4 send SIGTERM to torchrun (which forwards it to every worker) or
    SIGUSR1 to rank 1 only; check the saved step and, for SIGUSR1, every rank's exit code 75 in torchrun's
    failure summary (torchrun, itself signalled, prints none); return the saved step."""
    from disco_megatron.config import PREEMPTED_EXIT_CODE

    out, err = tmp_path / f"{run_dir.name}.out", tmp_path / f"{run_dir.name}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        launcher = subprocess.Popen(torchrun_command(_args(run_dir, iters, *TP2), 2), stdout=stdout, stderr=stderr,
                                    env=dict(os.environ, OMP_NUM_THREADS="1"))
        try:
            _wait_for(lambda: _logged_iterations(run_dir) >= 4 or launcher.poll() is not None, 300, "iteration 4")
            if to_launcher:
                launcher.send_signal(signal.SIGTERM)
            else:
                os.kill(_workers(psutil.Process(launcher.pid))[1].pid, signal.SIGUSR1)
            assert launcher.wait(timeout=EXIT_LIMIT_S) != 0
        finally:
            _kill_tree(launcher)
    exit_codes = re.findall(r"exitcode\s+: (-?\d+)", err.read_text())
    assert exit_codes == [str(PREEMPTED_EXIT_CODE)] * (0 if to_launcher else 2), err.read_text()[-3000:]
    stopped = int(_latest(run_dir / "checkpoints"))
    assert 5 <= stopped < iters and max(train_losses(run_dir)) == stopped
    assert f"checkpointing at iteration {stopped}, then exiting with code {PREEMPTED_EXIT_CODE}" in out.read_text()
    return stopped


def test_a_signal_to_one_rank_checkpoints_every_rank_and_resume_is_bit_exact(tmp_path):
    """SIGUSR1 to rank 1 only of a TP2 run after step 4: both ranks stop after the same step, save it
    and exit with code 75; resumed, the losses from step 5 on are bit-identical to an uninterrupted run's."""
    iters = 30
    reference, first, resumed = tmp_path / "reference", tmp_path / "first", tmp_path / "resumed"
    result = torchrun(2, _args(reference, iters, *TP2))
    assert result.returncode == 0, result.stderr[-3000:]
    _signalled_after_step_4(tmp_path, first, iters, to_launcher=False)
    result = torchrun(2, _args(resumed, iters, *TP2, "--load", str(first / "checkpoints")))
    assert result.returncode == 0, result.stderr[-3000:]
    expected, combined = train_losses(reference), {**train_losses(first), **train_losses(resumed)}
    assert sorted(combined) == list(range(1, iters + 1))
    assert [combined[i] for i in range(5, iters + 1)] == [expected[i] for i in range(5, iters + 1)]


def test_sigterm_to_torchrun_is_forwarded_and_every_rank_checkpoints(tmp_path):
    """torchrun forwards its SIGTERM to the workers; they save the step they are at and exit."""
    _signalled_after_step_4(tmp_path, tmp_path / "run", 30, to_launcher=True)
