"""Launch ``disco-pretrain`` runs as torchrun subprocesses and read their logs back.

Shared by the sweeps and benchmarks (``tools/sweep_norms.py``, ``benchmarks/convergence.py``):
each run gets its own ``--run-dir``; its full console output goes to ``RUN_DIR/launch.log``
and, once the trainer has exited on its own, ``RUN_DIR/launch.json`` records the flags, exit
code and wall time. A run directory with a ``launch.json`` for the same flags is not run again
(sweeps resume where they stopped); one without (a run cut short by a timeout or Ctrl-C) is
cleared and run from scratch. The command-line pieces both scripts share (comma lists, the
trainer flags after ``--``, the lr schedule of a sweep run) live here too.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, TypeVar

from disco_megatron.config import RunDir

# Console lines worth echoing while a run streams: the trainer's timestamped log lines and errors.
_ECHO_PREFIXES = ("[", "disco-pretrain: error")

K = TypeVar("K")


class LaunchError(RuntimeError):
    """A run cannot be launched or read; the message names the directory or flag and the fix."""


@dataclass
class RunResult:
    """Outcome of one run: exit code 0 is a finished run; ``reused`` when an earlier launch is reused."""

    run_dir: str
    returncode: int
    seconds: float
    reused: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """A script's own flags, and the trainer flags after ``--`` (given to every run unchanged)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def comma_list(kind: Callable[[str], K]) -> Callable[[str], list[K]]:
    """An argparse type: comma-separated values of ``kind``."""
    def parse(text: str) -> list[K]:
        return [kind(x) for x in text.split(",") if x.strip()]

    parse.__name__ = f"comma-separated {kind.__name__}"  # argparse names it in "invalid ... value"
    return parse


def schedule_flags(lr: float, iterations: int, style: str, min_lr_ratio: float,
                   warmup_fraction: float) -> list[str]:
    """The lr flags of a sweep run: peak ``lr``, warmup over a fraction of the run, decay to a ratio of the peak."""
    return ["--lr", f"{lr:.6g}", "--min-lr", f"{lr * min_lr_ratio:.6g}", "--lr-decay-style", style,
            "--lr-warmup-iters", str(round(iterations * warmup_fraction)), "--train-iters", str(iterations)]


def add_launch_flags(group, run_timeout: float = 1800.0) -> None:
    """The launch flags the sweep and the benchmarks share: processes, TP, PP, timeout, dry run."""
    group.add_argument("--nproc", type=int, default=2, help="processes per run (default: 2)")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP of every run (default: 1)")
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                       help="PP of every run (default: 1); DP = nproc / (TP x PP)")
    group.add_argument("--run-timeout", type=float, default=run_timeout,
                       help=f"seconds before a run is killed (default: {run_timeout:g})")
    group.add_argument("--dry-run", action="store_true", help="print the commands and exit")


def torchrun_command(train_args: Sequence[str], nproc: int) -> list[str]:
    """``torchrun --standalone`` (a free rendezvous port, so runs never collide) of the trainer."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "disco_megatron.train", *train_args]


def run_args(train_args: Sequence[str], run_dir: str) -> list[str]:
    """The trainer flags of a run: the given ones plus ``--run-dir``."""
    return [*train_args, "--run-dir", run_dir]


def read_launch(run_dir: str) -> Optional[dict]:
    """The ``launch.json`` of an earlier launch in ``run_dir``, or None."""
    path = RunDir(run_dir).launch_record
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise LaunchError(f"{path}: not JSON ({exc}); remove {run_dir} to run it again") from exc


def _clear_unfinished(run_dir: str) -> None:
    """Remove the leftovers of a run that never finished; refuse to touch foreign directories."""
    if not os.path.isdir(run_dir):
        return
    foreign = sorted(set(os.listdir(run_dir)) - RunDir.names())  # a directory holding anything else is not ours
    if foreign:
        raise LaunchError(f"run directory {run_dir} holds files that are not a run's ({', '.join(foreign[:5])}); "
                          "choose another output directory or remove them")
    shutil.rmtree(run_dir)


def _stream(proc: subprocess.Popen, log_path: str, echo: Optional[Callable[[str], None]], prefix: str) -> None:
    with open(log_path, "w") as log_file:
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()
            if echo is not None and line.startswith(_ECHO_PREFIXES):
                echo(f"{prefix}{line.rstrip()}")


def run_training(run_dir: str, train_args: Sequence[str], nproc: int, *, timeout: Optional[float] = None,
                 echo: Optional[Callable[[str], None]] = print, prefix: str = "") -> RunResult:
    """Run the trainer with ``train_args`` into ``run_dir`` (reusing a finished launch of the same flags).

    Console lines go to ``RUN_DIR/launch.log``; progress lines are passed to ``echo`` (prefixed).
    A non-zero exit of the trainer (e.g. a diverged run) is returned, not raised: for a sweep
    it is a result. A timeout or Ctrl-C kills the run's process group and raises.
    """
    args = run_args(train_args, run_dir)
    previous = read_launch(run_dir)
    if previous is not None:
        if previous.get("args") != args or previous.get("nproc") != nproc:
            raise LaunchError(f"run directory {run_dir} holds a run with other flags "
                              f"({' '.join(previous.get('args', []))}); choose another output directory or "
                              "remove it")
        return RunResult(run_dir, previous["returncode"], previous["seconds"], reused=True)
    _clear_unfinished(run_dir)
    os.makedirs(run_dir)
    command = torchrun_command(args, nproc)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    reader = threading.Thread(target=_stream, args=(proc, RunDir(run_dir).launch_log, echo, prefix), daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise LaunchError(f"run {run_dir} did not finish within {timeout:.0f} s (killed; see "
                          f"{RunDir(run_dir).launch_log}); raise the timeout or shrink the run") from exc
    finally:
        reader.join()
    seconds = time.perf_counter() - start
    with open(RunDir(run_dir).launch_record, "w") as f:
        json.dump({"command": command, "args": args, "nproc": nproc, "returncode": returncode,
                   "seconds": seconds}, f, indent=1)
    return RunResult(run_dir, returncode, seconds, reused=False)


def diverged(run_dir: str) -> bool:
    """Whether a failed run stopped on non-finite losses (a result of its lr) rather than a setup error."""
    path = RunDir(run_dir).launch_log
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return "non-finite" in f.read()


def log_tail(run_dir: str, lines: int = 5) -> str:
    """The last lines of a run's console log (for error messages)."""
    path = RunDir(run_dir).launch_log
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        return "".join(f.readlines()[-lines:])


def read_train_log(run_dir: str) -> list[dict]:
    """The records of ``RUN_DIR/train_log.jsonl`` (empty when the run logged nothing)."""
    path = RunDir(run_dir).train_log
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_run_config(run_dir: str) -> dict:
    """``RUN_DIR/run_config.json`` (every flag of the run)."""
    path = RunDir(run_dir).run_config
    if not os.path.isfile(path):
        raise LaunchError(f"{path} is missing: {run_dir} is not a finished disco-pretrain --run-dir")
    with open(path) as f:
        return json.load(f)


def train_curve(run_dir: str) -> list[tuple[int, float]]:
    """(tokens, train loss) at every logged iteration; a non-finite loss is kept as nan."""
    return [(r["tokens"], math.nan if r["loss"] is None else r["loss"])
            for r in read_train_log(run_dir) if "loss" in r]


def valid_curve(run_dir: str) -> list[tuple[int, float]]:
    """(tokens, validation loss) of every evaluation; tokens = iteration x global batch x seq length."""
    config = read_run_config(run_dir)
    tokens_per_step = config["global_batch_size"] * config["model"]["seq_length"]
    return [(r["iteration"] * tokens_per_step, math.nan if r["valid_loss"] is None else r["valid_loss"])
            for r in read_train_log(run_dir) if "valid_loss" in r]


def final_valid_loss(run_dir: str) -> float:
    """The last validation loss of a run (nan when there is none, e.g. a diverged run)."""
    curve = valid_curve(run_dir)
    return curve[-1][1] if curve else math.nan


def lowest(losses: Mapping[K, float]) -> Optional[K]:
    """The key of the lowest finite loss; None when no loss is finite."""
    finite = {k: v for k, v in losses.items() if math.isfinite(v)}
    return min(finite, key=finite.__getitem__) if finite else None
