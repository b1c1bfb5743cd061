"""The benchmarks in ``--quick`` mode: they run, write their JSON, and the numbers that do
not depend on timing are right (byte counts vs the owner/duplicated formulas on a hand-counted
matrix size, plan balance, layouts vs a real model, optimizer state held vs 8·P/(TP·DP)). Timings are only checked for sanity: one
positive, finite sample per repeat."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import balance  # noqa: E402
import comm  # noqa: E402
import memory  # noqa: E402
import norm_accuracy  # noqa: E402
import ns_precision  # noqa: E402
import overlap  # noqa: E402
import peer_muon  # noqa: E402
import step  # noqa: E402
from _common import PRESETS  # noqa: E402

HARDWARE_KEYS = {"platform", "processor", "cpu_count", "torch", "python"}


def _result(out: Path, name: str) -> dict:
    record = json.loads((out / f"{name}.json").read_text())
    assert record["benchmark"] == name and record["quick"] is True
    assert HARDWARE_KEYS <= record["hardware"].keys() and record["date"][:2] == "20"
    return record


def _spectral_bytes(cfg) -> int:
    """fp32 bytes of the hidden matrices of a Llama-shaped GPT, counted from the shape by hand."""
    h, kv = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    per_layer = ((cfg.num_attention_heads + 2 * cfg.query_groups) * kv * h + h * cfg.num_attention_heads * kv
                 + 2 * cfg.ffn_size * h + h * cfg.ffn_size)
    return 4 * cfg.num_layers * per_layer


def test_comm_quick_matches_theory(tmp_path: Path) -> None:
    assert comm.main(["--quick", "--out", str(tmp_path)]) == 0
    record = _result(tmp_path, "comm")
    assert [r["tp"] for r in record["results"]] == [2, 4]
    for r in record["results"]:
        t = r["tp"]
        assert r["matrix_bytes"] == _spectral_bytes(PRESETS[record["preset"]])
        owner, dup = r["modes"]["owner"], r["modes"]["duplicated"]
        assert owner["dualize_sent_mean"] == pytest.approx(2 * (t - 1) / t**2 * r["matrix_bytes"], rel=0.01)
        assert dup["dualize_sent_per_rank"] == [pytest.approx((t - 1) / t * r["matrix_bytes"], rel=0.01)] * t
        assert owner["sent_mean_by_kind"].get("all_gather", 0) == 0 < owner["sent_mean_by_kind"]["all_to_all"]
        assert dup["sent_mean_by_kind"].get("all_to_all", 0) == 0 < dup["sent_mean_by_kind"]["all_gather"]
        assert r["plan_matches_balance_py"] is True and 1.0 <= r["plan_balance"] <= 1.1


def test_balance_quick_within_target(tmp_path: Path) -> None:
    assert balance.main(["--quick", "--out", str(tmp_path)]) == 0
    record = _result(tmp_path, "balance")
    rows = record["rows"]
    assert {(r["tp"], r["dp"]) for r in rows} == set(balance.LAYOUTS)
    for r in rows:
        cfg = PRESETS[r["preset"]]
        # q, k, v, proj, gate, up, fc2 per layer (qkv split); sharded DP also gives every gain an owner
        # (2 norms per layer and the final norm; the vocab rows go in row blocks, not whole)
        gains = 2 * cfg.num_layers + 1 if r["dp_mode"] == "sharded" else 0
        assert r["matrices"] == 7 * cfg.num_layers + gains
        assert 1.0 <= r["bound"] <= r["balance"] <= record["target"] == 1.1


def test_step_quick_reports_times(tmp_path: Path) -> None:
    assert step.main(["--quick", "--out", str(tmp_path)]) == 0
    record = _result(tmp_path, "step")
    result = record["optimizer_step"]
    assert result["layouts_match_model"] is True
    assert set(result["median_s"]) == set(step.OPTIMIZERS)
    samples = result["samples"]
    assert set(samples) == {*step.OPTIMIZERS, "fwd_bwd", *step.TRACKER_SAMPLES}
    assert all(len(v) == record["repeats"] == 1 and all(0 < s < 60 for s in v) for v in samples.values())
    assert 0 < result["tracker"]["cold_s"] < 60
    assert "AdamW" in result["adam"]
    shapes = [tuple(r["shape"]) for r in record["newton_schulz"]]
    assert shapes == [(32, 32), (64, 64), (32, 128), (64, 256)]
    assert all(r[b] is not None and math.isfinite(r[b]) and r[b] > 0
               for r in record["newton_schulz"] for b in ("ns5", "polar_express", "svd"))


def test_ns_precision_quick_bf16_is_near_fp32(tmp_path: Path) -> None:
    """bf16 Newton–Schulz is within the 5e-2 parity tolerance of fp32 (docs/newton_schulz_precision.md),
    and both are farther from the exact polar factor than from each other (ns5's design interval)."""
    assert ns_precision.main(["--quick", "--out", str(tmp_path)]) == 0
    record = _result(tmp_path, "ns_precision")
    for r in record["records"]:
        assert 0 < r["bf16_vs_fp32"] < 5e-2 and r["bf16_vs_fp32"] < r["fp32_vs_exact"], r
    # the tiny model's wide matrices (k/v 32x64, gate/up 128x64, fc2 64x128) take the Gram form in fp32
    assert len(record["gram_records"]) == 2 * 2 * 3  # backends x inputs x shapes
    # as accurate as the standard form up to round-off noise (errors 1e-6 - 1e-5; ratio measured <= 1.74)
    assert all(r["gram_vs_fp64"] <= 2 * r["standard_vs_fp64"] + 2e-6 for r in record["gram_records"])


def test_norm_accuracy_quick_within_the_bound(tmp_path: Path) -> None:
    assert norm_accuracy.main(["--quick", "--out", str(tmp_path)]) == 0
    record = _result(tmp_path, "norm_accuracy")
    assert record["logged_steps"] == record["compared_steps"] == [2, 4]
    # 2 layers x (q, k, v, proj, gate, up, fc2) + embedding + output = 16 matrices per step.
    for key in ("logged_vs_exact", "lanczos_vs_exact"):
        assert record[key]["count"] == 2 * 16 and record[key]["max"] <= record["required"] == 1e-3
    assert record["recorded"]["params"]["count"] == 2 * 16
    assert record["recorded"]["updates"]["max"] <= record["tolerance"]


def test_memory_quick_sharded_state_meets_the_theory(tmp_path: Path) -> None:
    assert memory.main(["--quick", "--out", str(tmp_path)]) == 0
    record = _result(tmp_path, "memory")
    assert [(r["tp"], r["dp"]) for r in record["results"]] == [(1, 4), (2, 2), (4, 1)]
    for r in record["results"]:
        assert r["sharded_equals_plan"] is True
        # every logical matrix's momentum and master held once over TP×DP: the mean is the theory
        assert r["sharded_mean_over_theory"] == pytest.approx(1.0, rel=1e-12)
        # owners are balanced on Newton–Schulz flops, not bytes: the tiny model's few matrices leave
        # up to 8.1% more on one rank (measured; the quickstart and 125M models: <= 0.1%, README)
        assert 1.0 <= r["sharded_max_over_theory"] <= 1.1
        # replicated: every rank holds 8 bytes per local parameter, DP copies of the sharded total
        assert r["replicated"]["mean"] >= r["dp"] * r["sharded"]["mean"] * 0.999


def test_overlap_quick_reports_ratios(tmp_path: Path) -> None:
    """Owner and duplicated steps overlapped vs sequential at TP2 on the tiny preset: equal bit for
    bit, every bucket counted, the owner step's parts and the ratios from the same times."""
    assert overlap.main(["--quick", "--out", str(tmp_path)]) == 0
    record = _result(tmp_path, "overlap")
    assert record["tp"] == 2 and record["max_in_flight"] == 2
    for mode in ("owner", "duplicated"):
        entry = record[mode]
        assert entry["bit_equal"] is True and entry["buckets"] >= 3
        assert all(0 < v < 60e3 for v in entry["ms"].values())
        assert entry["overlapped / sequential"] == pytest.approx(entry["ms"]["overlapped"] / entry["ms"]["sequential"])
    owner = record["owner"]
    assert owner["sum_of_parts_ms"] == pytest.approx(sum(owner["parts_ms"][k] for k in overlap.PARTS))
    assert 0 < owner["parts_ms"]["all_to_all"] <= owner["parts_ms"]["gather_to_owners"] + owner["parts_ms"]["scatter_to_shards"]
    assert owner["overlapped / sum of parts"] == pytest.approx(owner["ms"]["overlapped"] / owner["sum_of_parts_ms"])


def test_peer_muon_without_the_peer_says_how_to_install_it(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(peer_muon, "load_peer", lambda: None)
    assert peer_muon.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "emerging-optimizers is not installed" in out
    assert "pip install --ignore-requires-python --no-deps emerging-optimizers==0.3.0 absl-py" in out
    assert not (tmp_path / "peer_muon.json").exists()


def test_peer_muon_quick_times_ours(tmp_path: Path) -> None:
    """Ours only (the peer is never a test dependency): the tiny model's matrix shapes, both dualizer
    modes and QKV splits at TP2, the owner step's stages, and owner == duplicated bit for bit."""
    assert peer_muon.main(["--quick", "--out", str(tmp_path)]) == 0
    record = _result(tmp_path, "peer_muon")
    assert record["peer"] is None
    # tiny: h64, 8 heads of 8, 4 groups, ffn128 -> k/v 32x64, q and proj 64x64, fc2 64x128, gate/up 128x64.
    assert [tuple(r["shape"]) for r in record["single_matrix"]] == [(32, 64), (64, 64), (64, 128), (128, 64)]
    assert all(0 < r["ours_ms"] < 60e3 and "peer_ms" not in r for r in record["single_matrix"])
    (step,) = record["optimizer_step"]
    assert step["tp"] == 2 and "ratios" not in step
    assert set(step["ms"]) == {f"ours {m} {s}" for m in ("owner", "duplicated") for s in ("qkv", "fused")}
    assert all(0 < v < 60e3 for v in step["ms"].values())
    assert step["owner_vs_duplicated_max_abs_diff"] == 0.0
    # NS flops per step, in units of 64³. The peer's standard form on a k×n X: 4k²n + 2k³; distributed
    # at TP2 it runs megatron's shards: qkv 64×64 (6), proj 64×32 (4), fc1 64×128 (10), fc2 64×64 (6)
    # = 26. Ours runs q and proj 64×64 in the standard form (6 each) and the wide ones in the Gram
    # form, 5 steps in segments of 3 and 2, sum of 2·(2k²n + (4L−3)·k³), per step: k and v 32×64
    # (2·(0.5 + 1.125) + 2·(0.5 + 0.625) = 5.5, /5 = 1.1 each), gate, up and fc2 64×128 (2·(4 + 9) +
    # 2·(4 + 5) = 44, /5 = 8.8 each): 40.6, halved.
    assert step["flop_floor"]["owner qkv / peer distributed"] == pytest.approx((12 + 2 * 1.1 + 3 * 8.8) / 2 / 26)
    for stages in step["owner_stages_ms"].values():
        assert 0 < stages["all_to_all"] <= stages["gather_to_owners"] + stages["scatter_to_shards"]
        assert stages["dualize"] > 0
