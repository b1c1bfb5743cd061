"""tools/export_norms.py on synthetic run directories: the tidy table reproduces every norm of
the records with the run's hyper-parameters (CSV and Parquet, JSONL or TensorBoard input), the
plots are real PNGs, and bad input gives one message naming the directory or flag."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from disco_megatron.config import RunConfig
from disco_megatron.norms import JsonlNormWriter, TensorBoardNormWriter

TOOL = Path(__file__).resolve().parents[1] / "tools" / "export_norms.py"
_spec = importlib.util.spec_from_file_location("export_norms", TOOL)
export_norms = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_norms)

PARAMS = {"embedding.word_embeddings.weight": "embedding", "output_layer.weight": "output",
          "decoder.layers.0.self_attention.linear_qkv.weight": "attention",
          "decoder.final_layernorm.weight": "gains"}
MATRIX = ("rms_to_rms", "rms_to_inf", "l1_to_rms", "frobenius", "rms", "supremum")
VECTOR = ("rms", "supremum", "frobenius")
STEPS = (10, 20, 30)
# (run name, lr, global batch size, loss scale): the loss-optimal lr is 0.02 for batch 8, 0.04 for 16.
RUNS = (("lr01_b8", 0.01, 8, 1.3), ("lr02_b8", 0.02, 8, 1.0), ("lr04_b8", 0.04, 8, 1.1),
        ("lr02_b16", 0.02, 16, 1.2), ("lr04_b16", 0.04, 16, 0.9))


def _value(run: int, step: int, kind: int, name: str, norm: str) -> float:
    """A distinct float32-exact value per (run, step, kind, tensor, norm)."""
    return (1 + run) * 64 + step / 8 + kind * 1024 + (len(name) % 17) / 4 + len(norm) / 32


def _records(run: int, loss_scale: float) -> list[dict]:
    records = []
    for step in STEPS:
        record = {"step": step, "tokens": 512 * step, "loss": loss_scale * (1 + 10 / step),
                  "lr": {"hidden": 0.5, "output": 0.25}, "groups": {}}
        for k, (kind, key) in enumerate((("param", "params"), ("update", "updates"))):
            record[key] = {name: {norm: _value(run, step, k, name, norm)
                                  for norm in (VECTOR if "layernorm" in name else MATRIX)} for name in PARAMS}
            record["groups"][kind] = {group: {norm: _value(run, step, k, group, norm) for norm in VECTOR}
                                      for group in PARAMS.values()}
            record["groups"][kind]["output"]["rms_to_inf"] = _value(run, step, k, "output", "rms_to_inf")
        records.append(record)
    return records


def _config(lr: float, batch: int) -> dict:
    cfg = RunConfig()
    cfg.lr, cfg.global_batch_size, cfg.model.hidden_size = lr, batch, 96
    return cfg.to_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Run dirs with norms.jsonl + run_config.json, as a training run leaves them."""
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for i, (name, lr, batch, loss_scale) in enumerate(RUNS):
        run_dir = root / name
        writer = JsonlNormWriter(str(run_dir / "norms.jsonl"))
        for record in _records(i, loss_scale):
            writer.write(record)
        (run_dir / "run_config.json").write_text(json.dumps(_config(lr, batch)))
        dirs.append(run_dir)
    return dirs


def _expected_row_count() -> int:
    per_record = 2 * (sum(len(VECTOR if "layernorm" in n else MATRIX) for n in PARAMS)
                      + len(set(PARAMS.values())) * len(VECTOR) + 1)
    return len(STEPS) * per_record


def _check_table(rows: list[dict], run_names: list[str]) -> None:
    assert len(rows) == len(run_names) * _expected_row_count()
    by_key = {(r["run"], int(r["step"]), r["param"] or None, r["group"], r["kind"], r["norm"]): r for r in rows}
    assert len(by_key) == len(rows)
    for i, name in enumerate(run_names):
        _, lr, batch, loss_scale = RUNS[i]
        row = by_key[(name, 20, "output_layer.weight", "output", "update", "rms_to_inf")]
        assert float(row["value"]) == _value(i, 20, 1, "output_layer.weight", "rms_to_inf")
        assert float(row["loss"]) == pytest.approx(loss_scale * 1.5) and int(row["tokens"]) == 512 * 20
        assert float(row["lr"]) == lr and int(row["global_batch_size"]) == batch
        assert int(row["model.hidden_size"]) == 96 and row["optimizer"] == "scion"
        group_row = by_key[(name, 30, None, "gains", "param", "frobenius")]
        assert float(group_row["value"]) == _value(i, 30, 0, "gains", "frobenius")
        for param, group in PARAMS.items():
            assert (name, 10, param, group, "param", "supremum") in by_key


def test_csv_table(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "table.csv"
    assert export_norms.main([str(d) for d in runs[:2]] + ["--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:9] == ["run", "step", "tokens", "loss", "param", "group", "kind", "norm", "value"]
    _check_table(rows, [RUNS[0][0], RUNS[1][0]])
    assert f"{len(rows)} rows, 2 runs" in capsys.readouterr().out


def test_parquet_table(runs: list[Path], tmp_path: Path):
    import pyarrow.parquet as pq

    out = tmp_path / "table.parquet"
    assert export_norms.main([str(d) for d in runs[:2]] + ["--out", str(out)]) == 0
    table = pq.read_table(out)
    assert str(table.schema.field("value").type) == "double" and str(table.schema.field("step").type) == "int64"
    _check_table(table.to_pylist(), [RUNS[0][0], RUNS[1][0]])


def test_tensorboard_only_run_dir(tmp_path: Path):
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / RUNS[0][0]
    summary = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    writer = TensorBoardNormWriter(summary)
    for record in _records(0, RUNS[0][3]):
        writer.write(record)
    summary.close()
    (run_dir / "run_config.json").write_text(json.dumps(_config(RUNS[0][1], RUNS[0][2])))
    out = tmp_path / "tb.csv"
    assert export_norms.main([str(run_dir), "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    _check_table(rows, [RUNS[0][0]])


def test_plots_are_pngs_and_best_lr(runs: list[Path], tmp_path: Path):
    from matplotlib.image import imread

    plots = tmp_path / "plots"
    assert export_norms.main([str(d) for d in runs] + ["--plots", str(plots)]) == 0
    names = sorted(p.name for p in plots.iterdir())
    assert names == sorted([f"norms_{n}.png" for n in VECTOR] + ["norms_rms_to_inf.png",
                                                                 "final_output_rms_to_inf_vs_lr.png"])
    for path in plots.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = imread(path).shape[:2]
        assert height > 100 and width > 100
    loaded = [export_norms.load_run(str(d), d.name) for d in runs]
    points = export_norms.final_points(loaded, "lr", "global_batch_size", "output", "rms_to_inf", 1)
    assert sorted(points) == [8, 16] and len(points[8]) == 3
    best = {batch: export_norms.loss_optimal(p) for batch, p in points.items()}
    assert best[8][0] == 0.02 and best[16][0] == 0.04
    assert best[8][1] == _value(1, STEPS[-1], 0, "output", "rms_to_inf")  # the last logged step's norm


def test_bad_input_messages(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture):
    missing = tmp_path / "no_such_run"
    assert export_norms.main([str(missing), "--out", str(tmp_path / "t.csv")]) == 2
    assert f"run directory {missing} does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert export_norms.main([str(empty), "--out", str(tmp_path / "t.csv")]) == 2
    assert f"run directory {empty}: no norm statistics found" in capsys.readouterr().err
    assert export_norms.main([str(runs[0]), "--out", str(tmp_path / "t.xlsx")]) == 2
    assert "--out" in capsys.readouterr().err
    assert export_norms.main([str(runs[0])]) == 2
    assert "nothing to do" in capsys.readouterr().err


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, check=True)
    for flag in ("--out", "--plots", "--x-axis", "--lr-key", "--batch-key", "--final-group", "--final-norm",
                 "--loss-window", "RUN_DIR"):
        assert flag in result.stdout
