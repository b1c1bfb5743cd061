"""A run repeated from its run_config.json (``--config``), and the progress a run reports: the ETA
on each log line and the one closing summary line."""
from __future__ import annotations

import json
import re
from pathlib import Path

from tests._launch import TINY_MODEL, read_log, torchrun, train_losses

ITERS, GLOBAL_BATCH, SEQ = 6, 4, 32
SUMMARY = re.compile(r"run summary \| steps (\d+) \(iteration (\d+)/(\d+)\) \| tokens (\d+) \| wall ([\d.]+) s \| "
                     r"mean tokens/s ([\d.]+) \| best validation lm loss ([\d.]+|n/a) \| checkpoint (\S+)")


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_config_repeats_the_run_into_a_new_run_dir_with_eta_and_summary(tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    args = [*TINY_MODEL, "--tensor-model-parallel-size", "2", "--optimizer", "adam", "--lr", "3e-3",
            "--micro-batch-size", "2", "--global-batch-size", str(GLOBAL_BATCH), "--train-iters", str(ITERS),
            "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1", "--norm-log-interval", "3", "--run-dir", str(first)]
    result = torchrun(2, args)
    assert result.returncode == 0, result.stderr[-3000:]

    summaries = SUMMARY.findall(result.stdout)
    assert len(summaries) == 1, result.stdout[-3000:]
    steps, iteration, total, tokens, wall, _, best, checkpoint = summaries[0]
    assert (int(steps), int(iteration), int(total)) == (ITERS, ITERS, ITERS)
    assert int(tokens) == ITERS * GLOBAL_BATCH * SEQ and float(wall) > 0
    valid = [r["valid_loss"] for r in read_log(first) if "valid_loss" in r]
    assert len(valid) == 2 and best == f"{min(valid):.4f}"
    assert checkpoint == str(first / "checkpoints" / f"iter_{ITERS:07d}")
    etas = re.findall(r"iteration +(\d+)/\d+ .*\| ETA (\d+):(\d\d):(\d\d) \|", result.stdout)
    assert [int(i) for i, *_ in etas] == list(range(1, ITERS + 1))
    assert etas[-1][1:] == ("0", "00", "00")

    before = _tree(first)
    result = torchrun(2, ["--config", str(first / "run_config.json"), "--run-dir", str(again)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert _tree(first) == before, "the rerun wrote into the old run directory"
    assert train_losses(again) == train_losses(first) and len(train_losses(first)) == ITERS
    recorded = json.loads((again / "run_config.json").read_text())
    assert recorded == {**json.loads((first / "run_config.json").read_text()), "run_dir": str(again),
                        "save": str(again / "checkpoints"), "tensorboard_dir": str(again / "tensorboard")}
    outputs = {"checkpoints", "tensorboard", "train_log.jsonl", "norms.jsonl", "run_config.json"}
    assert {p.name for p in again.iterdir()} == {p.name for p in first.iterdir()} == outputs
