"""The CPU twins of ``tests/run_gpu.sh``'s GPU checks (``tests/gpu_checks.py``): the same functions on
gloo with fp32, TP2 on two processes, and the script's argument handling and ``--dry-run``."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import gpu_checks

RUN_GPU = Path(__file__).with_name("run_gpu.sh")


def test_parity_twin_owner_duplicated_sharded_within_fp32_tolerance() -> None:
    result = gpu_checks.check_parity("cpu", 2)
    assert result["ns_dtype"] == "fp32" and result["tolerance"] == gpu_checks.PARITY_TOLERANCE["fp32"]
    assert set(result["max_relative_error"]) == {"owner", "duplicated", "sharded"}


def test_train_twin_loss_falls_and_masters_move(embedded_data) -> None:
    result = gpu_checks.check_train("cpu", 2, embedded_data)
    assert result["masters_moved"] == result["masters"] > 0 and result["te_layers"] == 0


def test_throughput_twin_measures_scion_and_adam(embedded_data) -> None:
    rows = gpu_checks.check_throughput("cpu", 2, embedded_data, steps=4)
    assert [r["optimizer"] for r in rows] == ["scion", "adam"]
    assert all(r["tokens_per_s"] > 0 and r["optimizer_step_ms"] > 0 and r["mfu"] is None for r in rows)
