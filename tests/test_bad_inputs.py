"""Bad input ends in one clear message naming the flag or file, exit code 2, on every rank, quickly.

Three ways in, cheapest first. Flags that parsing or validation rejects go through
``disco_megatron.train.main`` in this process (it returns before any process group exists).
Inputs that need a model (checkpoints) go through ``main`` several times in one subprocess that
first saves a real checkpoint. A few cases are launched as a user would (``python -m``, torchrun
with 2 ranks) to prove the exit code, the message on every rank and the absence of tracebacks.
The checkpoint converter's refusal to overwrite is checked here too.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from tests._dist import free_port
from tests._launch import TINY_MODEL, torchrun

ERROR_PREFIX = "disco-pretrain: error"
# torchrun's own summary when a worker fails: the one traceback a failed launch may show.
LAUNCHER_FAILED = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:"
LIMIT_S = 60.0
REPO = Path(__file__).resolve().parents[1]
# TP2 needs a world of 2; every in-process case is checked against it.
WORLD = "2"
TINY_TP2 = [*TINY_MODEL, "--tensor-model-parallel-size", "2"]


def assert_reported(stderr: str, ranks: int, *needles: str) -> None:
    """One error line per rank, each naming every needle; no traceback but torchrun's summary."""
    lines = [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert sorted(line.split("):")[0] for line in lines) == [f"{ERROR_PREFIX} (rank {r}" for r in range(ranks)], \
        stderr[-3000:]
    for line in lines:
        for needle in needles:
            assert needle in line, (needle, line)
    assert stderr.count("Traceback") == stderr.count(LAUNCHER_FAILED), stderr[-3000:]


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _copy_dataset(prefix: str, dst: Path, truncated_ext: str) -> str:
    dst.mkdir(parents=True, exist_ok=True)
    for ext in ("idx", "bin"):
        shutil.copy(f"{prefix}.{ext}", dst / f"data.{ext}")
    _truncate(dst / f"data.{truncated_ext}")
    return str(dst / "data")


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _fake_checkpoints(root: Path, iterations: tuple[int, ...]) -> str:
    for iteration in iterations:
        (root / f"iter_{iteration:07d}").mkdir(parents=True)
    return str(root)


# name: (tmp_path, embedded (prefix, tokenizer)) -> (argv, texts the message must contain)
PARSE_CASES = {
    "tp_does_not_divide_heads": lambda t, d: (
        [*TINY_TP2, "--num-attention-heads", "3", "--num-query-groups", "3", "--hidden-size", "66"],
        ["--num-attention-heads 3", "--tensor-model-parallel-size 2"]),
    "tp_does_not_divide_query_groups": lambda t, d: (
        [*TINY_TP2, "--num-query-groups", "1"], ["--num-query-groups 1", "--tensor-model-parallel-size 2"]),
    "world_not_divisible_by_tp_pp": lambda t, d: (
        [*TINY_TP2, "--pipeline-model-parallel-size", "2"],
        ["world size 2", "--pipeline-model-parallel-size 2", "--nproc-per-node"]),
    "pp_does_not_divide_layers": lambda t, d: (
        [*TINY_MODEL, "--num-layers", "3", "--pipeline-model-parallel-size", "2"],
        ["--num-layers 3", "--pipeline-model-parallel-size 2"]),
    "global_batch_not_divisible": lambda t, d: (
        [*TINY_MODEL, "--micro-batch-size", "4", "--global-batch-size", "12"],
        ["--global-batch-size 12", "--micro-batch-size 4", "data-parallel size 2"]),
    "negative_global_batch": lambda t, d: (
        [*TINY_MODEL, "--micro-batch-size", "4", "--global-batch-size", "-8"], ["--global-batch-size", "-8"]),
    "unknown_optimizer": lambda t, d: (["--optimizer", "sgd"], ["--optimizer sgd", "scion, adam"]),
    "unknown_tp_mode": lambda t, d: (["--scion-tp-mode", "gather"], ["--scion-tp-mode gather", "owner"]),
    "unknown_output_lmo": lambda t, d: (["--scion-output-lmo", "spectral"], ["--scion-output-lmo spectral", "rownorm"]),
    "unknown_preset": lambda t, d: (["--scion-preset", "titan"], ["--scion-preset titan", "disco"]),
    "unknown_flag": lambda t, d: (["--no-such-flag", "3"], ["--no-such-flag", "--help"]),
    "negative_lr": lambda t, d: (["--lr", "-0.1"], ["--lr", "-0.1"]),
    "nan_lr": lambda t, d: (["--lr", "nan"], ["--lr", "nan"]),
    "lr_not_a_number": lambda t, d: (["--lr", "abc"], ["--lr", "abc"]),
    "zero_save_interval": lambda t, d: (["--save-interval", "0"], ["--save-interval"]),
    "zero_max_skipped_steps": lambda t, d: (["--max-skipped-steps", "0"], ["--max-skipped-steps"]),
    "missing_data_path": lambda t, d: (
        ["--data-path", str(t / "nothing"), "--tokenizer-model", d[1]],
        ["--data-path", str(t / "nothing.idx"), "preprocess_data.py"]),
    "data_path_without_tokenizer": lambda t, d: (["--data-path", d[0]], ["--data-path", "--tokenizer-model"]),
    "tokenizer_without_data_path": lambda t, d: (["--tokenizer-model", d[1]], ["--tokenizer-model", "--data-path"]),
    "missing_tokenizer_model": lambda t, d: (
        ["--data-path", d[0], "--tokenizer-model", str(t / "sp.model")], ["--tokenizer-model", str(t / "sp.model")]),
    "truncated_idx": lambda t, d: (
        ["--data-path", _copy_dataset(d[0], t, "idx"), "--tokenizer-model", d[1]],
        ["--data-path", str(t / "data.idx"), "truncated"]),
    "truncated_bin": lambda t, d: (
        ["--data-path", _copy_dataset(d[0], t, "bin"), "--tokenizer-model", d[1]],
        ["--data-path", str(t / "data.bin"), "truncated"]),
    "load_missing_dir": lambda t, d: (["--load", str(t / "nope")], ["--load", str(t / "nope")]),
    "ckpt_step_without_load": lambda t, d: (["--ckpt-step", "3"], ["--ckpt-step 3", "--load"]),
    "missing_config": lambda t, d: (["--config", str(t / "run_config.json")],
                                    ["--config", str(t / "run_config.json"), "No such file"]),
    "config_not_a_run_config": lambda t, d: (["--config", _write(t / "other.json", '{"lr": 1}')],
                                             ["--config", str(t / "other.json"), "not a disco-pretrain"]),
    "sequence_parallel_without_tp": lambda t, d: (
        [*TINY_MODEL, "--sequence-parallel"], ["--sequence-parallel", "--tensor-model-parallel-size > 1"]),
    "sequence_parallel_seq_not_divisible": lambda t, d: (
        [*TINY_TP2, "--sequence-parallel", "--seq-length", "33"], ["--sequence-parallel", "--seq-length 33"]),
    "vpp_without_pp": lambda t, d: (
        [*TINY_MODEL, "--virtual-pipeline-model-parallel-size", "2"],
        ["--virtual-pipeline-model-parallel-size", "--pipeline-model-parallel-size > 1"]),
    "vpp_does_not_divide_layers": lambda t, d: (
        [*TINY_MODEL, "--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "3"],
        ["--num-layers 4", "--pipeline-model-parallel-size 2", "--virtual-pipeline-model-parallel-size 3"]),
    "vpp_microbatches_not_multiple_of_pp": lambda t, d: (
        [*TINY_MODEL, "--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
         "--micro-batch-size", "1", "--global-batch-size", "3"],
        ["number of microbatches (3", "--pipeline-model-parallel-size 2"]),
    "context_parallel_on_local_spec": lambda t, d: (
        [*TINY_MODEL, "--context-parallel-size", "2"],
        ["--context-parallel-size 2", "--transformer-impl transformer_engine", "GPU"]),
    "context_parallel_does_not_divide_world": lambda t, d: (
        [*TINY_MODEL, "--context-parallel-size", "4"], ["world size 2", "--context-parallel-size 4"]),
    "overlap_param_gather": lambda t, d: (["--overlap-param-gather"], ["--overlap-param-gather", "drop the flag"]),
    "ckpt_step_not_saved": lambda t, d: (
        ["--load", _fake_checkpoints(t, (2, 4)), "--ckpt-step", "3"],
        ["--ckpt-step 3", "iter_0000003", "saved iterations", "2, 4"]),
}


@pytest.mark.parametrize("case", sorted(PARSE_CASES))
def test_flag_is_rejected_before_any_work(case, tmp_path, embedded_data, monkeypatch, capsys):
    """``main`` returns 2 with one line naming the flag/file; it never reaches process-group init."""
    from disco_megatron import train
    from disco_megatron.training import setup

    def reached_init(*args, **kwargs):
        raise AssertionError(f"{case}: validation accepted the flags")

    monkeypatch.setattr(setup, "initialize_parallel", reached_init)
    monkeypatch.setenv("WORLD_SIZE", WORLD)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    argv, needles = PARSE_CASES[case](tmp_path, embedded_data)
    capsys.readouterr()
    start = time.perf_counter()
    assert train.main(argv) == 2
    assert time.perf_counter() - start < LIMIT_S
    assert_reported(capsys.readouterr().err, 1, *needles)


def test_parse_error_from_the_command_line():
    """``python -m disco_megatron.train`` with a bad choice: exit code 2 and one line, no usage wall."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "disco_megatron.train", "--scion-tp-mode", "gather"],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert time.perf_counter() - start < LIMIT_S
    assert result.returncode == 2, result.stderr[-3000:]
    assert_reported(result.stderr, 1, "--scion-tp-mode gather")
    assert "usage:" not in result.stderr


def _torchrun_reports(args: list[str], *needles: str, env: dict | None = None) -> None:
    """Launch 2 ranks: both print the message and torchrun fails within the limit."""
    start = time.perf_counter()
    result = torchrun(2, args, timeout=300, env=env)
    seconds = time.perf_counter() - start
    assert result.returncode != 0
    assert seconds < LIMIT_S, seconds
    assert LAUNCHER_FAILED in result.stderr
    assert_reported(result.stderr, 2, *needles)


def test_every_rank_reports_a_config_error_even_a_late_rank(tmp_path):
    """Rank 1 starts 5 s late: torchrun stops all workers when the first exits, so rank 0 must wait
    for rank 1's report before exiting (a ``sitecustomize`` delays the rank, nothing else)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('RANK') == '1':\n    time.sleep(5)\n")
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    _torchrun_reports([*TINY_TP2, "--num-query-groups", "1"], "--num-query-groups 1", env={"PYTHONPATH": path})


# ---- inputs that need a model: a real checkpoint, then main() once per case in one subprocess ----

def _corrupt_distcp(ckpt: Path) -> None:
    _truncate(sorted(ckpt.glob("*.distcp"))[0])


def _corrupt_common(ckpt: Path) -> None:
    _truncate(ckpt / "common.pt")


def _corrupt_metadata(ckpt: Path) -> None:
    _truncate(ckpt / ".metadata")


def _dangling_pointer(ckpt: Path) -> None:
    (ckpt.parent / "latest_checkpointed_iteration.txt").write_text("7")


BASE_ARGS = [*TINY_MODEL, "--micro-batch-size", "2", "--global-batch-size", "2", "--optimizer", "adam",
             "--lr", "1e-3"]
# name: (corruption of a copy of the saved iter dir, extra flags (argparse keeps the last value),
#        texts the message must contain)
CHECKPOINT_CASES = {
    "other_hidden_size": (None, ["--hidden-size", "96"], ["hidden_size=64", "--hidden-size 96"]),
    "other_vocab": (None, ["--vocab-size", "2048"], ["vocab_size=4096", "--vocab-size 2048"]),
    "other_optimizer": (None, ["--optimizer", "scion"], ["optimizer", "--no-load-optim"]),
    "truncated_distcp": (_corrupt_distcp, [], [".distcp", "corrupt", "--ckpt-step"]),
    "truncated_common_pt": (_corrupt_common, [], ["common.pt", "corrupt"]),
    "truncated_metadata": (_corrupt_metadata, [], [".metadata", "corrupt"]),
    "latest_names_missing_iteration": (_dangling_pointer, [], ["latest_checkpointed_iteration.txt", "7"]),
}


def run_checkpoint_cases(work: str) -> None:
    """Subprocess body: save a 1-step checkpoint, then run every CHECKPOINT_CASES load through main()."""
    from disco_megatron.train import main

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", OMP_NUM_THREADS="1")
    root = Path(work)

    def run(argv: list[str]) -> dict:
        os.environ["MASTER_PORT"] = str(free_port())
        stderr = io.StringIO()
        start = time.perf_counter()
        with redirect_stderr(stderr):
            code = main(argv)
        return {"code": code, "stderr": stderr.getvalue(), "seconds": time.perf_counter() - start}

    base = root / "base"
    made = run([*BASE_ARGS, "--train-iters", "1", "--save", str(base)])
    results = {"base": made}
    for name, (corrupt, extra, _) in CHECKPOINT_CASES.items():
        load = root / name
        shutil.copytree(base, load)
        if corrupt is not None:
            corrupt(load / "iter_0000001")
        results[name] = run([*BASE_ARGS, "--train-iters", "2", "--load", str(load), *extra])
    (root / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def checkpoint_cases(tmp_path_factory, embedded_data) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("bad_checkpoints")
    code = f"from tests.test_bad_inputs import run_checkpoint_cases; run_checkpoint_cases({str(work)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads((work / "results.json").read_text())
    assert results["base"]["code"] == 0, results["base"]["stderr"][-3000:]
    return work, results


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_checkpoint_is_refused_with_the_file_named(case, checkpoint_cases):
    work, results = checkpoint_cases
    outcome = results[case]
    assert outcome["code"] == 2, outcome["stderr"][-3000:]
    assert outcome["seconds"] < LIMIT_S
    assert_reported(outcome["stderr"], 1, f"--load {work / case}", *CHECKPOINT_CASES[case][2])


def test_every_rank_reports_a_truncated_shard(checkpoint_cases, tmp_path):
    """A truncated .distcp loaded by a TP2 world: every rank checks every file and says which one."""
    work, _ = checkpoint_cases
    load = tmp_path / "ckpt"
    shutil.copytree(work / "base", load)
    _corrupt_distcp(load / "iter_0000001")
    _torchrun_reports([*BASE_ARGS, "--tensor-model-parallel-size", "2", "--train-iters", "2", "--load", str(load)],
                      f"--load {load}", ".distcp", "corrupt")


def test_converter_refuses_a_non_empty_output(checkpoint_cases, tmp_path, monkeypatch, capsys):
    """``tools/convert_checkpoint.py to-hf --out`` an existing non-empty directory: exit 2, one line
    naming --out and --force, and the directory is left as it was."""
    from disco_megatron.checkpoint.cli import main as convert_main

    work, _ = checkpoint_cases
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the converter sets it; restored after the test
    capsys.readouterr()
    assert convert_main(["to-hf", "--load", str(work / "base"), "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("disco-convert: error:"), lines
    assert f"--out {out}" in lines[0] and "--force" in lines[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
