"""tools/sweep_norms.py and benchmarks/convergence.py: the grid they launch, the best-lr choice and
token ratio on synthetic finished runs (reused, so nothing is launched), and one real 2x1 sweep of
3-step runs that must leave the tables and plots behind and be reused when run again."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import shlex
import sys
from pathlib import Path

import pytest

from disco_megatron.norms import JsonlNormWriter
from disco_megatron import launcher

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sweep = _load(REPO / "tools" / "sweep_norms.py", "sweep_norms")
convergence = _load(REPO / "benchmarks" / "convergence.py", "convergence")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _no_launch(*args, **kwargs):
    raise AssertionError("a run was launched although a finished launch.json was there to reuse")


def _fake_run(run_dir: Path, args: list[str], nproc: int, returncode: int, config: dict,
              train: list[tuple[int, int, float]], valid: list[tuple[int, float]], norms: list[tuple[int, float]],
              log: str = "") -> None:
    """A finished run directory as the trainer and launcher leave it."""
    run_dir.mkdir(parents=True)
    (run_dir / "launch.json").write_text(json.dumps({"args": args, "nproc": nproc, "returncode": returncode,
                                                     "seconds": 1.5}))
    (run_dir / "launch.log").write_text(log)
    (run_dir / "run_config.json").write_text(json.dumps(config))
    lines = [{"iteration": i, "tokens": t, "loss": loss} for i, t, loss in train]
    lines += [{"iteration": i, "valid_loss": loss} for i, loss in valid]
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    writer = JsonlNormWriter(str(run_dir / "norms.jsonl"))
    for step, value in norms:
        writer.write({"step": step, "tokens": step * 100, "loss": 5.0,
                      "groups": {"param": {"output": {"rms_to_inf": value}}}})


@pytest.mark.parametrize("iterations, points, expected", [(128, 10, 8), (64, 10, 4), (97, 10, 9), (5, 10, 1),
                                                          (100, 10, 10)])
def test_norm_interval_logs_the_last_step_when_cheap(iterations, points, expected):
    assert sweep.norm_interval(iterations, points) == expected


def test_dry_run_prints_one_command_per_grid_point(capsys):
    argv = ["--dry-run", "--lrs", "0.01,0.03", "--batch-sizes", "8", "--hidden-sizes", "64", "--seq-length", "32",
            "--train-tokens", "2560", "--out", "OUT", "--", "--seed", "7"]
    assert sweep.main(argv) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 2
    for command, lr in zip(commands, ("0.01", "0.03")):
        flags = command[command.index("disco_megatron.train") + 1:]
        value = {flag: flags[i + 1] for i, flag in enumerate(flags) if flag.startswith("--")}
        assert value["--lr"] == lr and value["--train-iters"] == str(2560 // (8 * 32))
        assert value["--global-batch-size"] == "8" and value["--hidden-size"] == "64"
        assert value["--run-dir"] == f"OUT/w64_b8_lr{lr}" and value["--seed"] == "7"
        assert float(value["--min-lr"]) == pytest.approx(0.1 * float(lr))
        assert value["--eval-iters"] == str(128 // 8)


@pytest.mark.parametrize("flags, message", [
    (["--batch-sizes", "6"], "--batch-sizes 6"),
    (["--batch-sizes", "8,24", "--eval-sequences", "32"], "--eval-sequences 32"),
    (["--train-tokens", "100"], "--train-tokens 100"),
])
def test_bad_grid_names_the_flag(capsys, flags, message):
    assert sweep.main([*flags, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


# (lr, batch): final validation loss; None = diverged. Width 64: best (0.02, 16); width 32: best (0.01, 8).
VALID = {(64, 0.01, 8): 4.0, (64, 0.02, 8): 3.8, (64, 0.04, 8): None,
         (64, 0.01, 16): 3.9, (64, 0.02, 16): 3.7, (64, 0.04, 16): 4.2,
         (32, 0.01, 8): 4.1, (32, 0.02, 8): 4.3, (32, 0.04, 8): None,
         (32, 0.01, 16): 4.4, (32, 0.02, 16): 4.5, (32, 0.04, 16): 4.6}


def _norm(width: int, lr: float, batch: int) -> float:
    return 10 * lr * width / batch + 1


def test_sweep_summarizes_finished_runs_without_launching(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    argv = ["--lrs", "0.01,0.02,0.04", "--batch-sizes", "8,16", "--hidden-sizes", "64,32", "--seq-length", "16",
            "--train-tokens", "1024", "--out", str(out)]
    args = sweep.build_parser().parse_args(argv)
    for (width, lr, batch), loss in VALID.items():
        point = sweep.Point(width, batch, lr)
        steps = 1024 // (batch * 16)
        run_dir = out / point.name
        config = {"lr": lr, "global_batch_size": batch, "model": {"hidden_size": width, "seq_length": 16}}
        train = [(s, s * batch * 16, 6.0 - s / steps) for s in range(1, steps + 1)]
        valid = [] if loss is None else [(steps, loss)]
        _fake_run(run_dir, launcher.run_args(sweep.train_args(args, point, []), str(run_dir)), 2,
                  1 if loss is None else 0, config, train, valid, [(steps // 2, 0.5), (steps, _norm(width, lr, batch))],
                  log="non-finite loss" if loss is None else "")
    monkeypatch.setattr(launcher.subprocess, "Popen", _no_launch)
    assert sweep.main(argv) == 0
    summary = {int(r["hidden_size"]): r for r in csv.DictReader(open(out / "summary.csv"))}
    for width in (64, 32):
        finite = {(lr, b): v for (w, lr, b), v in VALID.items() if w == width and v is not None}
        lr, batch = min(finite, key=finite.get)
        row = summary[width]
        assert (float(row["best_lr"]), int(row["best_batch"])) == (lr, batch)
        assert float(row["final_output_rms_to_inf"]) == pytest.approx(_norm(width, lr, batch))
        assert float(row["final_valid_loss"]) == pytest.approx(finite[(lr, batch)])
    runs = {r["run"]: r for r in csv.DictReader(open(out / "runs.csv"))}
    assert len(runs) == len(VALID)
    assert math.isnan(float(runs["w64_b8_lr0.04"]["final_valid_loss"]))
    assert runs["w64_b8_lr0.04"]["returncode"] == "1"
    with open(out / "norms.csv") as f:
        assert {r["run"] for r in csv.DictReader(f)} == set(runs)
    for png in ("plots/norm_transfer.png", "plots/w64/final_output_rms_to_inf_vs_lr.png",
                "plots/w32/final_output_rms_to_inf_vs_lr.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert "| 64 | 0.02 | 16 |" in capsys.readouterr().out


def test_reused_run_with_other_flags_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "w64_b8_lr0.01"
    _fake_run(run_dir, ["--lr", "0.5"], 2, 0, {}, [], [], [])
    with pytest.raises(launcher.LaunchError, match="other flags"):
        launcher.run_training(str(run_dir), ["--lr", "0.01"], 2)


@pytest.mark.parametrize("curve, target, expected", [
    ([(100, 5.0), (200, 4.0), (300, 3.0)], 3.5, 250.0),
    ([(100, 5.0), (200, 4.0), (300, 3.0)], 4.0, 200.0),
    ([(100, 5.0), (200, 4.0), (300, 3.0)], 6.0, 100.0),
    ([(100, 5.0), (200, 4.0), (300, 3.0)], 2.0, None),
    ([(100, 5.0), (200, math.nan), (300, 4.0), (400, 2.0)], 3.0, 350.0),
])
def test_tokens_to_reach_interpolates_the_first_crossing(curve, target, expected):
    assert convergence.tokens_to_reach(curve, target) == expected


def test_running_mean_is_trailing():
    assert convergence.running_mean([(1, 3.0), (2, 5.0), (3, 1.0)], 2) == [(1, 3.0), (2, 4.0), (3, 3.0)]


NAN = math.nan


@pytest.mark.parametrize("losses, expected", [
    ({0.01: 4.0, 0.02: 3.9, 0.04: 4.2}, None),            # interior
    ({0.04: 4.2, 0.01: 4.0, 0.02: 3.9}, None),            # any order
    ({0.01: 4.0, 0.02: 3.8}, 0.04),                       # best at the top: x2
    ({0.01: 3.0, 0.02: 3.8, 0.04: 4.0}, 0.005),           # best at the bottom: /2
    ({0.01: 4.0, 0.02: NAN}, 0.005),                      # a diverged larger lr: the best is the smallest
    ({0.005: 4.1, 0.01: 4.0, 0.02: NAN}, None),           # diverged counts as worse: interior
    ({0.01: NAN, 0.02: NAN}, 0.005),                      # all diverged: go lower
    ({0.01: 4.0}, 0.005),                                 # one point is its own edge
])
def test_next_lr_extends_the_grid_beyond_the_edge_holding_the_best(losses, expected):
    assert convergence.next_lr(losses, 2.0) == expected


def test_next_lr_uses_the_factor():
    assert convergence.next_lr({0.01: 4.0, 0.03: 3.0}, 3.0) == pytest.approx(0.09)


def _fake_convergence_runs(out: Path, args, ends: dict) -> None:
    """Finished runs (validation every 2 steps falling linearly from 6.0 to ``end``; None = diverged)."""
    for (optimizer, lr), end in ends.items():
        run_dir = out / convergence.run_name(optimizer, lr)
        valid = [] if end is None else [(2 * k, 6.0 - (6.0 - end) * k / 5) for k in range(1, 6)]
        train = [(s, s * 32, 6.0 - (6.0 - (end or 6.0)) * s / 10) for s in range(1, 11)]
        config = {"global_batch_size": 4, "model": {"seq_length": 8}}
        _fake_run(run_dir, launcher.run_args(convergence.train_args(args, optimizer, lr, []), str(run_dir)), 2,
                  1 if end is None else 0, config, train, valid, [], log="non-finite" if end is None else "")


def _convergence_argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--scion-lrs", "0.01,0.02", "--adam-lrs", "0.001,0.003", "--train-iters", "10", "--eval-interval", "2",
            "--log-interval", "1", "--seq-length", "8", "--global-batch-size", "4", "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png"), *extra]


def test_convergence_brackets_both_bests_then_picks_them_and_the_ratio(tmp_path, monkeypatch, capsys):
    argv = _convergence_argv(tmp_path)
    args = convergence.build_parser().parse_args(argv)
    # Initial grids: Scion's best (0.02) at the top edge, AdamW's (0.001; 0.003 diverged) at the bottom.
    # The added lrs (0.04, 0.0005) are worse, so both bests end strictly inside their grids.
    _fake_convergence_runs(tmp_path / "runs", args, {
        ("scion", 0.01): 4.0, ("scion", 0.02): 3.0, ("scion", 0.04): 3.5,
        ("adam", 0.001): 4.5, ("adam", 0.003): None, ("adam", 0.0005): 4.8})
    monkeypatch.setattr(launcher.subprocess, "Popen", _no_launch)
    assert convergence.main(argv) == 0
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["bracketing"] == {
        "scion": {"initial_lrs": [0.01, 0.02], "added_lrs": [0.04], "best_interior": True},
        "adam": {"initial_lrs": [0.001, 0.003], "added_lrs": [0.0005], "best_interior": True}}
    assert result["bests_interior"] is True
    assert sorted(r["lr"] for r in result["runs"]) == [0.0005, 0.001, 0.003, 0.01, 0.02, 0.04]
    assert result["best"]["scion"]["lr"] == 0.02 and result["best"]["adam"]["lr"] == 0.001
    # Scion (6 -> 3 over 320 tokens, evals every 64 tokens) reaches 4.5 at 6 - 3 t/320 = 4.5 -> t = 160.
    assert result["valid"]["target_loss"] == 4.5
    assert result["valid"]["scion_tokens_to_target"] == pytest.approx(160.0)
    assert result["valid"]["token_ratio"] == pytest.approx(0.5)
    assert result["valid"]["meets_target_ratio"] is True
    # Train: AdamW's mean of its last 3 losses (6 - 1.5 s/10, s = 8..10) = 4.65; Scion's trailing mean of
    # 6 - 0.3 s over 3 steps is 6 - 0.3 (s - 1) for s >= 3: 4.65 at s = 5.5, i.e. 176 tokens.
    assert result["train"]["target_loss"] == pytest.approx(4.65)
    assert result["train"]["token_ratio"] == pytest.approx(176 / 320)
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC
    out = capsys.readouterr().out
    assert "0.500x AdamW's" in out and "adding lr 0.04" in out and "adding lr 0.0005" in out
    assert "scion: best lr 0.02 strictly inside its grid; lrs added: 0.04" in out
    assert "both best lrs interior: yes" in out


def test_convergence_says_loudly_when_the_cap_leaves_a_best_at_the_edge(tmp_path, monkeypatch, capsys):
    argv = _convergence_argv(tmp_path, "--max-extensions", "1")
    args = convergence.build_parser().parse_args(argv)
    # Scion keeps improving with lr: after its one allowed extension (0.04) the best is still the edge.
    _fake_convergence_runs(tmp_path / "runs", args, {
        ("scion", 0.01): 4.0, ("scion", 0.02): 3.0, ("scion", 0.04): 2.5,
        ("adam", 0.001): 4.6, ("adam", 0.003): 4.5, ("adam", 0.006): 4.7})
    monkeypatch.setattr(launcher.subprocess, "Popen", _no_launch)
    assert convergence.main(argv) == 0
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["bracketing"]["scion"] == {"initial_lrs": [0.01, 0.02], "added_lrs": [0.04], "best_interior": False}
    assert result["bracketing"]["adam"]["best_interior"] is True and result["bests_interior"] is False
    out = capsys.readouterr().out
    assert "WARNING: scion's best lr is STILL AT THE EDGE" in out and "both best lrs interior: NO" in out


def test_real_tiny_sweep_writes_tables_and_plots_then_reuses(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["--lrs", "0.01,0.03", "--batch-sizes", "4", "--hidden-sizes", "64", "--seq-length", "16",
            "--micro-batch-size", "2", "--num-layers", "2", "--train-tokens", "192", "--eval-sequences", "8",
            "--out", str(out)]
    assert sweep.main(argv) == 0
    for name in ("summary.csv", "runs.csv", "norms.csv"):
        assert (out / name).stat().st_size > 0
    for png in ("plots/norm_transfer.png", "plots/w64/final_output_rms_to_inf_vs_lr.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert [r["iterations"] for r in runs] == ["3", "3"]
    for r in runs:
        log = launcher.read_train_log(str(out / r["run"]))
        assert [x["iteration"] for x in log if "loss" in x][-1] == 3
        assert float(r["final_valid_loss"]) == pytest.approx([x["valid_loss"] for x in log if "valid_loss" in x][-1])
    capsys.readouterr()
    assert sweep.main(argv) == 0
    assert capsys.readouterr().out.count("(reused)") == 2
