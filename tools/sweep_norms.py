#!/usr/bin/env python
"""Sweep learning rate x global batch size (x width) and see where the output-layer norm lands.

Runs one small ``disco-pretrain`` run per grid point on the embedded corpus, sequentially, each
into ``OUT/w{H}_b{B}_lr{LR}`` with the same token budget (``--train-tokens``; iterations =
tokens / (batch x seq length)), a cosine schedule, and one validation at the end on the same
``--eval-sequences`` validation sequences for every batch size (all batch sizes also see the
same training sequences in the same order). Finished runs are reused, so an interrupted sweep
resumes where it stopped (delete a run directory to redo it). Then:

  OUT/norms.csv                   tidy table of every norm of every run (tools/export_norms.py)
  OUT/plots/w{H}/                 export_norms plots per width, incl. the final output-layer RMS->inf
                                  norm vs lr, a line per batch size (its stars: lowest mean of the
                                  last --loss-window logged train losses)
  OUT/plots/norm_transfer.png     all widths: final validation loss and final norm vs lr, a line per
                                  (width, batch); stars mark the lowest validation loss per line,
                                  big stars the best (lr, batch) of each width
  OUT/runs.csv                    one row per run
  OUT/summary.csv                 per width: best lr, best batch, final norm, final validation loss
                                  (also printed as markdown)

Scion has one lr per layer group (embedding, hidden, output); the sweep sets ``--lr``, the
default of every group, so all groups move together. To sweep one group with the others fixed,
pin them after ``--``, e.g. ``-- --scion-lr-embedding 0.01 --scion-lr-hidden 0.01`` (the sweep
still varies ``--lr``, which then only reaches the unpinned group). Flags after ``--`` go to every
run unchanged (and override the sweep's own when repeated).

Best run = lowest final validation loss; a run that diverged (non-finite loss) has none.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import export_norms  # noqa: E402  (tools/export_norms.py, beside this script)

from disco_megatron.norms.writers import read_norms_jsonl  # noqa: E402
from disco_megatron import launcher  # noqa: E402
from disco_megatron.config import RunDir  # noqa: E402


class SweepError(Exception):
    """Bad input or a run that failed for a reason other than divergence; the message says what to do."""


@dataclass(frozen=True)
class Point:
    """One grid point of the sweep."""

    hidden: int
    batch: int
    lr: float

    @property
    def name(self) -> str:
        return f"w{self.hidden}_b{self.batch}_lr{self.lr:g}"


@dataclass
class Outcome:
    """What a finished run of a point gives back."""

    point: Point
    iterations: int
    returncode: int
    seconds: float
    final_norm: float
    final_train_loss: float
    final_valid_loss: float


def norm_interval(iterations: int, points: int) -> int:
    """Steps between norm logs: about ``points`` logs, on a divisor of ``iterations`` when that
    costs at most 3x the logs, so the last step (the "final" norm) is logged."""
    target = max(1, iterations // points)
    divisor = max(d for d in range(1, target + 1) if iterations % d == 0)
    return divisor if iterations // divisor <= 3 * points else target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweep_norms.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] [-- extra disco-pretrain flags]")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--lrs", type=launcher.comma_list(float), default=[0.004, 0.01, 0.025, 0.06],
                      help="comma-separated peak learning rates (--lr of each run; default: 0.004,0.01,0.025,0.06)")
    grid.add_argument("--batch-sizes", type=launcher.comma_list(int), default=[8, 16],
                      help="comma-separated global batch sizes in sequences (default: 8,16)")
    grid.add_argument("--hidden-sizes", type=launcher.comma_list(int), default=[64, 128],
                      help="comma-separated model widths (default: 64,128)")
    grid.add_argument("--train-tokens", type=int, default=81920,
                      help="tokens per run; iterations = tokens // (batch x seq length) (default: 81920)")
    model = parser.add_argument_group("model and run")
    model.add_argument("--seq-length", type=int, default=64, help="sequence length (default: 64)")
    model.add_argument("--num-layers", type=int, default=4, help="transformer layers (default: 4)")
    model.add_argument("--num-attention-heads", type=int, default=4, help="attention heads (default: 4)")
    model.add_argument("--micro-batch-size", type=int, default=4, help="sequences per microbatch (default: 4)")
    model.add_argument("--optimizer", choices=("scion", "adam"), default="scion", help="optimizer (default: scion)")
    model.add_argument("--lr-decay-style", default="cosine", help="lr schedule of every run (default: cosine)")
    model.add_argument("--min-lr-ratio", type=float, default=0.1,
                       help="--min-lr of a run = this x its --lr (default: 0.1)")
    model.add_argument("--warmup-fraction", type=float, default=0.05,
                       help="linear warmup over this fraction of the iterations (default: 0.05)")
    model.add_argument("--eval-sequences", type=int, default=128,
                       help="validation sequences of the one evaluation at the end, the same ones for every batch "
                       "size (--eval-iters = this / batch; default: 128)")
    model.add_argument("--norm-points", type=int, default=10, help="about this many norm logs per run (default: 10)")
    launch_group = parser.add_argument_group("launch")
    launcher.add_launch_flags(launch_group)
    launch_group.add_argument("--out", default="runs/norm_sweep", help="sweep directory (default: runs/norm_sweep)")
    report = parser.add_argument_group("report")
    report.add_argument("--final-group", default="output",
                        help="group whose final parameter norm is reported (default: output)")
    report.add_argument("--final-norm", default="rms_to_inf", help="norm reported (default: rms_to_inf)")
    report.add_argument("--loss-window", type=int, default=3,
                        help="export_norms --loss-window of the per-width plots (default: 3)")
    return parser


def validate(args: argparse.Namespace) -> None:
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if not (args.lrs and args.batch_sizes and args.hidden_sizes):
        raise SweepError("--lrs, --batch-sizes and --hidden-sizes each need at least one value")
    if any(lr <= 0 for lr in args.lrs):
        raise SweepError(f"--lrs must be > 0 (got {args.lrs})")
    if args.nproc < 1 or args.nproc % model_parallel:
        raise SweepError(f"--nproc {args.nproc} is not a multiple of --tensor-model-parallel-size x "
                         f"--pipeline-model-parallel-size = {model_parallel}")
    dp = args.nproc // model_parallel
    for batch in args.batch_sizes:
        if batch % (args.micro_batch_size * dp):
            raise SweepError(f"--batch-sizes {batch} is not divisible by --micro-batch-size {args.micro_batch_size} "
                             f"x data-parallel size {dp}")
        if args.eval_sequences % batch:
            raise SweepError(f"--eval-sequences {args.eval_sequences} is not divisible by --batch-sizes {batch} "
                             "(every batch size must validate on the same sequences)")
        if args.train_tokens // (batch * args.seq_length) < 1:
            raise SweepError(f"--train-tokens {args.train_tokens} is less than one step of batch {batch} x "
                             f"seq {args.seq_length}; raise it")
    for name in ("eval_sequences", "norm_points", "loss_window"):
        if getattr(args, name) < 1:
            raise SweepError(f"--{name.replace('_', '-')} must be >= 1")


def grid(args: argparse.Namespace) -> list[Point]:
    return [Point(h, b, lr) for h in args.hidden_sizes for b in args.batch_sizes for lr in args.lrs]


def iterations(args: argparse.Namespace, point: Point) -> int:
    return args.train_tokens // (point.batch * args.seq_length)


def train_args(args: argparse.Namespace, point: Point, extra: Sequence[str]) -> list[str]:
    """Trainer flags of one grid point (without --run-dir)."""
    steps = iterations(args, point)
    interval = norm_interval(steps, args.norm_points)
    flags = {
        "--tensor-model-parallel-size": args.tensor_model_parallel_size,
        "--pipeline-model-parallel-size": args.pipeline_model_parallel_size,
        "--num-layers": args.num_layers, "--hidden-size": point.hidden,
        "--num-attention-heads": args.num_attention_heads, "--seq-length": args.seq_length,
        "--micro-batch-size": args.micro_batch_size, "--global-batch-size": point.batch,
        "--optimizer": args.optimizer, "--log-interval": interval, "--norm-log-interval": interval,
        "--eval-interval": steps, "--eval-iters": args.eval_sequences // point.batch,
    }
    schedule = launcher.schedule_flags(point.lr, steps, args.lr_decay_style, args.min_lr_ratio, args.warmup_fraction)
    return [*(str(x) for pair in flags.items() for x in pair), *schedule, *extra]


def final_norm(run_dir: str, group: str, norm: str) -> float:
    """The last logged parameter norm of a group (nan when never logged or non-finite)."""
    path = RunDir(run_dir).norms
    records = read_norms_jsonl(path) if os.path.isfile(path) else []
    values = [r.get("groups", {}).get("param", {}).get(group, {}).get(norm) for r in records]
    values = [v for v in values if v is not None]
    return float(values[-1]) if values else math.nan


def run_point(args: argparse.Namespace, point: Point, extra: Sequence[str], index: int, total: int) -> Outcome:
    run_dir = os.path.join(args.out, point.name)
    result = launcher.run_training(run_dir, train_args(args, point, extra), args.nproc, timeout=args.run_timeout,
                                   prefix=f"[{point.name}] ")
    status = "reused" if result.reused else f"{result.seconds:.0f} s"
    if not result.ok and not launcher.diverged(run_dir):
        raise SweepError(f"run {run_dir} failed (exit {result.returncode}), not by divergence:\n"
                         f"{launcher.log_tail(run_dir)}fix the flags, remove {run_dir} and run the sweep again")
    print(f"sweep: {index}/{total} {point.name}: {'ok' if result.ok else 'diverged'} ({status})", flush=True)
    losses = [loss for _, loss in launcher.train_curve(run_dir)]
    return Outcome(point, iterations(args, point), result.returncode, result.seconds,
                   final_norm(run_dir, args.final_group, args.final_norm),
                   losses[-1] if losses and result.ok else math.nan,
                   launcher.final_valid_loss(run_dir) if result.ok else math.nan)


def best_per_width(outcomes: Sequence[Outcome]) -> dict[int, Outcome | None]:
    """Per width, the outcome of lowest final validation loss (None when every run diverged)."""
    widths = sorted({o.point.hidden for o in outcomes})
    best = {}
    for width in widths:
        mine = {i: o.final_valid_loss for i, o in enumerate(outcomes) if o.point.hidden == width}
        index = launcher.lowest(mine)
        best[width] = None if index is None else outcomes[index]
    return best


def best_per_line(outcomes: Sequence[Outcome]) -> dict[tuple[int, int], Outcome]:
    """Per (width, batch), the outcome of lowest final validation loss (lines where all diverged are left out)."""
    best = {}
    for key in sorted({(o.point.hidden, o.point.batch) for o in outcomes}):
        mine = {i: o.final_valid_loss for i, o in enumerate(outcomes) if (o.point.hidden, o.point.batch) == key}
        index = launcher.lowest(mine)
        if index is not None:
            best[key] = outcomes[index]
    return best


def _fmt(value: float) -> str:
    return "diverged" if not math.isfinite(value) else f"{value:.4g}"


def write_tables(args: argparse.Namespace, outcomes: Sequence[Outcome]) -> str:
    """runs.csv and summary.csv; returns the summary as markdown."""
    norm_column = f"final_{args.final_group}_{args.final_norm}"
    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "hidden_size", "global_batch_size", "lr", "iterations", "tokens", "returncode",
                         norm_column, "final_train_loss", "final_valid_loss", "seconds"])
        for o in outcomes:
            writer.writerow([o.point.name, o.point.hidden, o.point.batch, o.point.lr, o.iterations,
                             o.iterations * o.point.batch * args.seq_length, o.returncode, o.final_norm,
                             o.final_train_loss, o.final_valid_loss, round(o.seconds, 1)])
    best = best_per_width(outcomes)
    lines = [f"| width | best lr | best batch | final {args.final_group} {args.final_norm} | final valid loss |",
             "|---|---|---|---|---|"]
    with open(os.path.join(args.out, "summary.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["hidden_size", "best_lr", "best_batch", norm_column, "final_valid_loss"])
        for width, o in best.items():
            if o is None:
                writer.writerow([width, "", "", "", ""])
                lines.append(f"| {width} | all diverged | | | |")
                continue
            writer.writerow([width, o.point.lr, o.point.batch, o.final_norm, o.final_valid_loss])
            lines.append(f"| {width} | {o.point.lr:g} | {o.point.batch} | {_fmt(o.final_norm)} | "
                         f"{_fmt(o.final_valid_loss)} |")
    lines += ["", f"| width | batch | best lr | final {args.final_group} {args.final_norm} | final valid loss |",
              "|---|---|---|---|---|"]
    for (width, batch), o in best_per_line(outcomes).items():
        lines.append(f"| {width} | {batch} | {o.point.lr:g} | {_fmt(o.final_norm)} | {_fmt(o.final_valid_loss)} |")
    lines += ["", "| run | final norm | final train loss | final valid loss |", "|---|---|---|---|"]
    for o in outcomes:
        lines.append(f"| {o.point.name} | {_fmt(o.final_norm)} | {_fmt(o.final_train_loss)} | "
                     f"{_fmt(o.final_valid_loss)} |")
    return "\n".join(lines)


def plot_transfer(args: argparse.Namespace, outcomes: Sequence[Outcome], path: str) -> None:
    """Final validation loss and final norm vs lr, a line per (width, batch), best points starred."""
    plt = export_norms._pyplot()
    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(10, 4))
    widths = sorted({o.point.hidden for o in outcomes})
    batches = sorted({o.point.batch for o in outcomes})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")
    line_best = best_per_line(outcomes)
    width_best = best_per_width(outcomes)
    for wi, width in enumerate(widths):
        for bi, batch in enumerate(batches):
            line = sorted((o for o in outcomes if (o.point.hidden, o.point.batch) == (width, batch)),
                          key=lambda o: o.point.lr)
            style = dict(color=colors[wi % len(colors)], linestyle=styles[bi % len(styles)], marker="o")
            lrs = [o.point.lr for o in line]
            ax_loss.plot(lrs, [o.final_valid_loss for o in line], label=f"width {width}, batch {batch}", **style)
            ax_norm.plot(lrs, [o.final_norm for o in line], **style)
            best = line_best.get((width, batch))
            if best is not None:
                big = best is width_best.get(width)
                for ax, y in ((ax_loss, best.final_valid_loss), (ax_norm, best.final_norm)):
                    ax.plot([best.point.lr], [y], marker="*", markersize=18 if big else 11, linestyle="none",
                            color=colors[wi % len(colors)], markeredgecolor="black")
    from matplotlib import ticker

    ax_norm.set_yscale("log")
    ax_norm.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
    ax_norm.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax_norm.yaxis.set_minor_formatter(ticker.NullFormatter())
    for ax in (ax_loss, ax_norm):
        ax.set_xscale("log")
        ax.set_xticks(sorted({o.point.lr for o in outcomes}))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("lr (all Scion groups)" if args.optimizer == "scion" else "lr")
    ax_loss.set_ylabel("final validation loss")
    ax_norm.set_ylabel(f"final {args.final_group} {args.final_norm} (param)")
    ax_loss.legend(fontsize=8)
    fig.suptitle(f"{args.train_tokens} tokens per run; star: lowest loss per line, big star: per width", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def export(args: argparse.Namespace, outcomes: Sequence[Outcome]) -> None:
    """The tidy table of all runs and the export_norms plots of each width."""
    with_norms = [o for o in outcomes if os.path.isfile(RunDir(os.path.join(args.out, o.point.name)).norms)]
    dirs = [os.path.join(args.out, o.point.name) for o in with_norms]
    common = ["--lr-key", "lr", "--batch-key", "global_batch_size", "--final-group", args.final_group,
              "--final-norm", args.final_norm, "--loss-window", str(args.loss_window)]
    if dirs and export_norms.main([*dirs, "--out", os.path.join(args.out, "norms.csv"), *common]) != 0:
        raise SweepError("tools/export_norms.py failed on the sweep's runs (see its message above)")
    for width in sorted({o.point.hidden for o in with_norms}):
        mine = [os.path.join(args.out, o.point.name) for o in with_norms if o.point.hidden == width]
        plots = os.path.join(args.out, "plots", f"w{width}")
        if export_norms.main([*mine, "--plots", plots, *common]) != 0:
            raise SweepError(f"tools/export_norms.py failed on the width-{width} runs (see its message above)")


def main(argv: Sequence[str] | None = None) -> int:
    own, extra = launcher.split_passthrough(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    try:
        validate(args)
        points = grid(args)
        if args.dry_run:
            for point in points:
                run_dir = os.path.join(args.out, point.name)
                command = launcher.torchrun_command(launcher.run_args(train_args(args, point, extra), run_dir),
                                                    args.nproc)
                print("OMP_NUM_THREADS=1 " + shlex.join(command))
            return 0
        os.makedirs(args.out, exist_ok=True)
        outcomes = [run_point(args, p, extra, i, len(points)) for i, p in enumerate(points, start=1)]
        export(args, outcomes)
        os.makedirs(os.path.join(args.out, "plots"), exist_ok=True)
        plot_transfer(args, outcomes, os.path.join(args.out, "plots", "norm_transfer.png"))
        print(write_tables(args, outcomes))
        total = sum(o.seconds for o in outcomes)
        print(f"\nsweep: {len(outcomes)} runs, {total / 60:.1f} min of training wall time; wrote "
              f"{os.path.join(args.out, 'summary.csv')}, runs.csv, norms.csv, plots/")
    except (SweepError, launcher.LaunchError, export_norms.ExportError) as exc:
        print(f"sweep_norms.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
