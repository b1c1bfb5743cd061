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


def _run_gpu_sh(args: list[str], tmp_path: Path, gpus: int | None) -> subprocess.CompletedProcess:
    """``bash tests/run_gpu.sh ARGS`` with a stub ``nvidia-smi`` listing ``gpus`` GPUs (None: no nvidia-smi)."""
    bin_dir = tmp_path / f"bin{len(list(tmp_path.glob('bin*')))}"
    bin_dir.mkdir()
    if gpus is not None:
        stub = bin_dir / "nvidia-smi"
        lines = "".join(f"GPU {i}: NVIDIA H100 (UUID: GPU-{i})\\n" for i in range(gpus))
        stub.write_text(f"#!/bin/sh\nprintf '{lines}'\n")
        stub.chmod(0o755)
    tools = {name: shutil.which(name) for name in ("python", "date", "sed", "grep", "dirname", "mkdir", "timeout")}
    for name, path in tools.items():
        (bin_dir / name).symlink_to(path)
    env = dict(os.environ, PATH=str(bin_dir))
    return subprocess.run([shutil.which("bash"), str(RUN_GPU), *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_run_gpu_dry_run_plans_one_process_per_gpu(tmp_path) -> None:
    result = _run_gpu_sh(["--dry-run", "--out", "x.json"], tmp_path, gpus=4)
    assert result.returncode == 0, result.stderr
    assert "plan: 4 GPU(s)\n" in result.stdout
    assert "gpu_checks.py all --device cuda --nproc 4 --steps 20 --out x.json" in result.stdout
    assert "transformer-engine[pytorch]" in result.stdout


def test_run_gpu_dry_run_without_a_gpu_and_with_choices(tmp_path) -> None:
    result = _run_gpu_sh(["--dry-run"], tmp_path, gpus=None)
    assert result.returncode == 0 and "no NVIDIA GPU found: plan shown for --nproc 1" in result.stdout
    result = _run_gpu_sh(["--dry-run", "--nproc", "2", "--steps", "5", "--no-install"], tmp_path, gpus=None)
    assert result.returncode == 0 and "--nproc 2 --steps 5" in result.stdout and "skipped (--no-install)" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--nproc", "9"], "--nproc 9: give 1 to 8 GPUs"),
    (["--nproc", "two"], "--nproc 'two': give a whole number"),
    (["--steps", "0"], "--steps '0'"),
    (["--out"], "--out needs a value"),
    (["--fast"], "unknown argument '--fast'"),
])
def test_run_gpu_rejects_bad_arguments_naming_the_flag(tmp_path, args, message) -> None:
    result = _run_gpu_sh(["--dry-run", *args], tmp_path, gpus=2)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_run_gpu_without_dry_run_needs_enough_gpus(tmp_path) -> None:
    result = _run_gpu_sh([], tmp_path, gpus=None)
    assert result.returncode == 2 and "no NVIDIA GPU found" in result.stderr
    result = _run_gpu_sh(["--nproc", "4", "--no-install"], tmp_path, gpus=2)
    assert result.returncode == 2 and "this machine has 2 GPU(s)" in result.stderr
