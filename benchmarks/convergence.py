#!/usr/bin/env python
"""Scion vs AdamW at equal tokens: does Scion reach AdamW's final validation loss with fewer tokens?

Each optimizer runs a small lr grid (Scion: ``--lr`` of every group; AdamW: megatron-core Adam
with ``--weight-decay 0.1``) of the same model, data (the embedded corpus), schedule (linear
warmup, cosine decay to ``--min-lr-ratio`` x peak) and token budget, sequentially, each into
``OUT/{optimizer}_lr{LR}`` (finished runs are reused: delete a run directory to redo it).
Validation runs every ``--eval-interval`` steps. The best lr of each optimizer is the one of
lowest final validation loss (a diverged run counts as worse than any finished one).

The grids bracket their optima by themselves: while an optimizer's best lr is the smallest
(largest) of its grid, the grid is extended by one lr ``--extend-factor`` times smaller (larger)
and that run is added, at most ``--max-extensions`` times per optimizer; a best lr still at an
edge after that is reported loudly (and ``bests_interior`` is false in the JSON). Reported:

  * the final validation loss of each optimizer at its best lr;
  * the tokens Scion needs to reach AdamW's final validation loss, by linear interpolation on
    Scion's validation curve, divided by AdamW's tokens (the ratio; target <= --target-ratio);
  * the same on the train curves (running mean over --smooth logged losses; AdamW's target is
    the mean of its last --smooth logged losses).

Writes ``--results`` (JSON) and ``--plot`` (PNG: loss vs tokens, final loss vs lr) and prints
a table. Caveat: a run reaches the target mid-schedule, before its own lr has decayed, so the
ratio compares a partly trained Scion run with a finished AdamW run; a Scion run with a schedule
that short would likely need fewer tokens still.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Optional

from disco_megatron import launcher

OPTIMIZERS = ("scion", "adam")


class BenchmarkError(Exception):
    """Bad input or a run that failed for a reason other than divergence."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convergence.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] [-- extra disco-pretrain flags for every run]")
    floats = launcher.comma_list(float)
    parser.add_argument("--scion-lrs", type=floats, default=[0.01, 0.02, 0.04],
                        help="initial Scion peak lrs (default: 0.01,0.02,0.04)")
    parser.add_argument("--adam-lrs", type=floats, default=[2e-3, 4e-3, 8e-3],
                        help="initial AdamW peak lrs (default: 0.002,0.004,0.008)")
    parser.add_argument("--extend-factor", type=float, default=2.0,
                        help="a best lr at a grid edge adds the lr this factor beyond it (default: 2)")
    parser.add_argument("--max-extensions", type=int, default=4,
                        help="at most this many added lrs per optimizer (default: 4)")
    parser.add_argument("--adam-weight-decay", type=float, default=0.1, help="AdamW --weight-decay (default: 0.1)")
    parser.add_argument("--hidden-size", type=int, default=128, help="model width (default: 128)")
    parser.add_argument("--num-layers", type=int, default=4, help="layers (default: 4)")
    parser.add_argument("--num-attention-heads", type=int, default=4, help="attention heads (default: 4)")
    parser.add_argument("--seq-length", type=int, default=128, help="sequence length (default: 128)")
    parser.add_argument("--global-batch-size", type=int, default=16, help="sequences per step (default: 16)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences per microbatch (default: 4)")
    parser.add_argument("--train-iters", type=int, default=100, help="steps per run (default: 100)")
    parser.add_argument("--lr-decay-style", default="cosine", help="lr schedule (default: cosine)")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="--min-lr = this x --lr (default: 0.1)")
    parser.add_argument("--warmup-fraction", type=float, default=0.1,
                        help="linear warmup over this fraction of the steps (default: 0.1)")
    parser.add_argument("--log-interval", type=int, default=5, help="steps between logged train losses (default: 5)")
    parser.add_argument("--eval-interval", type=int, default=10, help="steps between validations (default: 10)")
    parser.add_argument("--eval-iters", type=int, default=4, help="validation batches each time (default: 4)")
    parser.add_argument("--smooth", type=int, default=3,
                        help="running mean over this many logged train losses for the train-curve ratio (default: 3)")
    parser.add_argument("--target-ratio", type=float, default=0.8,
                        help="the ratio Scion should meet (reported, not enforced; default: 0.8)")
    launcher.add_launch_flags(parser)
    parser.add_argument("--out", default="runs/convergence", help="directory of the runs (default: runs/convergence)")
    parser.add_argument("--results", default="benchmarks/results/convergence.json",
                        help="JSON results (default: benchmarks/results/convergence.json)")
    parser.add_argument("--plot", default="docs/img/convergence.png", help="PNG (default: docs/img/convergence.png)")
    return parser


def validate(args: argparse.Namespace) -> None:
    if not args.scion_lrs or not args.adam_lrs:
        raise BenchmarkError("--scion-lrs and --adam-lrs each need at least one value")
    if any(lr <= 0 for lr in args.scion_lrs + args.adam_lrs):
        raise BenchmarkError("--scion-lrs and --adam-lrs must be > 0")
    if args.eval_interval < 1 or args.eval_interval > args.train_iters:
        raise BenchmarkError(f"--eval-interval {args.eval_interval} must be in [1, --train-iters {args.train_iters}] "
                             "(the ratio needs validation losses)")
    if args.smooth < 1:
        raise BenchmarkError(f"--smooth must be >= 1 (got {args.smooth})")
    if not args.extend_factor > 1:
        raise BenchmarkError(f"--extend-factor must be > 1 (got {args.extend_factor})")
    if args.max_extensions < 0:
        raise BenchmarkError(f"--max-extensions must be >= 0 (got {args.max_extensions})")


def grid(args: argparse.Namespace) -> list[tuple[str, float]]:
    return [("scion", lr) for lr in args.scion_lrs] + [("adam", lr) for lr in args.adam_lrs]


def run_name(optimizer: str, lr: float) -> str:
    return f"{optimizer}_lr{lr:g}"


def train_args(args: argparse.Namespace, optimizer: str, lr: float, extra: Sequence[str]) -> list[str]:
    """Trainer flags of one run (without --run-dir): same model, data, schedule and tokens for both optimizers."""
    flags = ["--tensor-model-parallel-size", args.tensor_model_parallel_size,
             "--pipeline-model-parallel-size", args.pipeline_model_parallel_size,
             "--num-layers", args.num_layers, "--hidden-size", args.hidden_size,
             "--num-attention-heads", args.num_attention_heads, "--seq-length", args.seq_length,
             "--micro-batch-size", args.micro_batch_size, "--global-batch-size", args.global_batch_size,
             "--optimizer", optimizer, "--log-interval", args.log_interval,
             "--norm-log-interval", args.train_iters, "--eval-interval", args.eval_interval,
             "--eval-iters", args.eval_iters]
    if optimizer == "adam":
        flags += ["--weight-decay", args.adam_weight_decay]
    schedule = launcher.schedule_flags(lr, args.train_iters, args.lr_decay_style, args.min_lr_ratio,
                                     args.warmup_fraction)
    return [*(str(x) for x in flags), *schedule, *extra]


def next_lr(losses: Mapping[float, float], factor: float) -> Optional[float]:
    """The lr to add so that the best lr (lowest finite final loss; nan = diverged, worse than any)
    moves strictly inside the grid: ``factor`` x beyond the edge it sits on; None when it is interior.

    With every run diverged the lowest lr is divided by ``factor`` (smaller lrs diverge less).
    """
    grid_lrs = sorted(losses)
    best = launcher.lowest({lr: losses[lr] for lr in grid_lrs})
    if best is None or best == grid_lrs[0]:
        return grid_lrs[0] / factor
    if best == grid_lrs[-1]:
        return grid_lrs[-1] * factor
    return None


def tokens_to_reach(curve: Sequence[tuple[float, float]], target: float) -> Optional[float]:
    """Tokens at which a loss curve first gets down to ``target``, linearly interpolated between
    logged points; the first point's tokens when it is already there; None when never."""
    previous = None
    for tokens, loss in curve:
        if math.isfinite(loss) and loss <= target:
            if previous is None:
                return float(tokens)
            (t0, l0) = previous
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        previous = (tokens, loss) if math.isfinite(loss) else None
    return None


def running_mean(curve: Sequence[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """Trailing mean over ``window`` points (fewer at the start), at each point's tokens."""
    out = []
    for i, (tokens, _) in enumerate(curve):
        values = [loss for _, loss in curve[max(0, i - window + 1):i + 1]]
        out.append((tokens, sum(values) / len(values)))
    return out


def run_one(args: argparse.Namespace, optimizer: str, lr: float, extra: Sequence[str], label: str) -> dict:
    """Launch (or reuse) one run; its result dict with the final validation loss (nan if diverged)."""
    run_dir = os.path.join(args.out, run_name(optimizer, lr))
    result = launcher.run_training(run_dir, train_args(args, optimizer, lr, extra), args.nproc,
                                   timeout=args.run_timeout, prefix=f"[{run_name(optimizer, lr)}] ")
    if not result.ok and not launcher.diverged(run_dir):
        raise BenchmarkError(f"run {run_dir} failed (exit {result.returncode}), not by divergence:\n"
                             f"{launcher.log_tail(run_dir)}fix the flags, remove {run_dir} and run again")
    status = "reused" if result.reused else f"{result.seconds:.0f} s"
    print(f"convergence: {label} {run_name(optimizer, lr)}: {'ok' if result.ok else 'diverged'} ({status})",
          flush=True)
    return {"optimizer": optimizer, "lr": lr, "run_dir": run_dir, "returncode": result.returncode,
            "seconds": result.seconds,
            "final_valid_loss": launcher.final_valid_loss(run_dir) if result.ok else math.nan}


def run_all(args: argparse.Namespace, extra: Sequence[str]) -> tuple[list[dict], dict]:
    """Launch (or reuse) the initial grid, then extend each optimizer's grid until its best lr is
    interior (:func:`next_lr`, at most ``--max-extensions`` added lrs); the runs and, per optimizer,
    the initial lrs, the added lrs and whether its best ended interior."""
    points = grid(args)
    runs = [run_one(args, optimizer, lr, extra, f"{i}/{len(points)}") for i, (optimizer, lr) in
            enumerate(points, start=1)]
    bracketing = {}
    for optimizer in OPTIMIZERS:
        added = []
        while True:
            lr = next_lr({r["lr"]: r["final_valid_loss"] for r in runs if r["optimizer"] == optimizer},
                         args.extend_factor)
            if lr is None or len(added) == args.max_extensions:
                break
            print(f"convergence: {optimizer}'s best lr is at the edge of its grid: adding lr {lr:g}", flush=True)
            runs.append(run_one(args, optimizer, lr, extra, f"extension {len(added) + 1}/{args.max_extensions}"))
            added.append(lr)
        if lr is not None:
            print(f"convergence: WARNING: {optimizer}'s best lr is STILL AT THE EDGE of its grid after "
                  f"--max-extensions {args.max_extensions} added lrs ({', '.join(f'{a:g}' for a in added)}); "
                  f"its optimum is not bracketed: widen --{optimizer}-lrs or raise --max-extensions", flush=True)
        initial = getattr(args, f"{optimizer}_lrs")
        bracketing[optimizer] = {"initial_lrs": list(initial), "added_lrs": added, "best_interior": lr is None}
    return runs, bracketing


def summarize(args: argparse.Namespace, runs: list[dict], bracketing: dict) -> dict:
    """Best lr per optimizer, final losses, how the grids were bracketed, and the tokens ratio
    (valid and train curves)."""
    for run in runs:
        ok = run["returncode"] == 0
        run["valid_curve"] = launcher.valid_curve(run["run_dir"]) if ok else []
        run["train_curve"] = launcher.train_curve(run["run_dir"]) if ok else []
        run["final_train_loss"] = run["train_curve"][-1][1] if run["train_curve"] else math.nan
    best = {}
    for optimizer in OPTIMIZERS:
        mine = [r for r in runs if r["optimizer"] == optimizer]
        index = launcher.lowest({i: r["final_valid_loss"] for i, r in enumerate(mine)})
        if index is None:
            raise BenchmarkError(f"every {optimizer} run diverged or has no validation loss; "
                                 f"lower --{optimizer}-lrs")
        best[optimizer] = mine[index]
    scion, adam = best["scion"], best["adam"]
    adam_tokens = adam["valid_curve"][-1][0]
    target = adam["final_valid_loss"]
    reach = tokens_to_reach(scion["valid_curve"], target)
    train_target = running_mean(adam["train_curve"], args.smooth)[-1][1]
    train_reach = tokens_to_reach(running_mean(scion["train_curve"], args.smooth), train_target)
    ratio = None if reach is None else reach / adam_tokens
    return {
        "setup": {k: v for k, v in vars(args).items() if k not in ("dry_run",)},
        "tokens_per_run": adam_tokens,
        "runs": [_finite_or_none(r) for r in runs],
        "bracketing": bracketing,
        "bests_interior": all(b["best_interior"] for b in bracketing.values()),
        "best": {o: {"lr": best[o]["lr"], "final_valid_loss": best[o]["final_valid_loss"],
                     "final_train_loss": best[o]["final_train_loss"]} for o in OPTIMIZERS},
        "valid": {"target_loss": target, "scion_tokens_to_target": reach, "adam_tokens": adam_tokens,
                  "token_ratio": ratio, "meets_target_ratio": ratio is not None and ratio <= args.target_ratio},
        "train": {"target_loss": train_target, "scion_tokens_to_target": train_reach,
                  "token_ratio": None if train_reach is None else train_reach / adam_tokens},
        "wall_time_s": sum(r["seconds"] for r in runs),
    }


def _finite_or_none(value):
    """The value with every non-finite float replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise BenchmarkError("--plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(summary: dict, args: argparse.Namespace, path: str) -> None:
    """Left: loss vs tokens (every run faint, the best of each optimizer bold); right: final loss vs lr."""
    plt = _pyplot()
    fig, (ax_curve, ax_lr) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"scion": "tab:blue", "adam": "tab:orange"}
    labels = {"scion": "Scion", "adam": f"AdamW (wd {args.adam_weight_decay:g})"}
    for run in summary["runs"]:
        color = colors[run["optimizer"]]
        is_best = summary["best"][run["optimizer"]]["lr"] == run["lr"]
        if run["valid_curve"]:
            xs, ys = zip(*run["valid_curve"])
            ax_curve.plot(xs, ys, color=color, alpha=1.0 if is_best else 0.25, linewidth=2 if is_best else 1,
                          marker="o" if is_best else None, markersize=3,
                          label=f"{labels[run['optimizer']]} lr {run['lr']:g} (valid)" if is_best else None)
        if is_best and run["train_curve"]:
            xs, ys = zip(*running_mean(run["train_curve"], args.smooth))
            ax_curve.plot(xs, ys, color=color, linestyle=":", linewidth=1, label=f"{labels[run['optimizer']]} (train)")
    valid = summary["valid"]
    ax_curve.axhline(valid["target_loss"], color="gray", linestyle="--", linewidth=1)
    if valid["scion_tokens_to_target"] is not None:
        ax_curve.axvline(valid["scion_tokens_to_target"], color=colors["scion"], linestyle="--", linewidth=1)
        ax_curve.set_title(f"Scion reaches AdamW's final valid loss at {valid['token_ratio']:.2f}x its tokens",
                           fontsize=9)
    else:
        ax_curve.set_title("Scion does not reach AdamW's final valid loss", fontsize=9)
    from matplotlib import ticker

    ax_curve.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    ax_curve.set_xlabel("tokens")
    ax_curve.set_ylabel("loss")
    low = min(valid["target_loss"], summary["best"]["scion"]["final_valid_loss"])
    ax_curve.set_ylim(low - 0.3, low + 2.5)
    ax_curve.legend(fontsize=7)
    for optimizer in OPTIMIZERS:
        points = sorted((r["lr"], r["final_valid_loss"]) for r in summary["runs"] if r["optimizer"] == optimizer)
        ax_lr.plot([p[0] for p in points], [math.nan if p[1] is None else p[1] for p in points], marker="o",
                   color=colors[optimizer], label=labels[optimizer])
    ax_lr.set_xscale("log")
    ax_lr.set_xlabel("peak lr")
    ax_lr.set_ylabel("final validation loss")
    ax_lr.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(summary: dict) -> str:
    """The runs and the headline numbers as markdown."""
    def fmt(value: Optional[float]) -> str:
        return "diverged" if value is None else f"{value:.4f}"

    lines = ["| optimizer | lr | final valid loss | final train loss | wall s |", "|---|---|---|---|---|"]
    for r in sorted(summary["runs"], key=lambda r: (OPTIMIZERS.index(r["optimizer"]), r["lr"])):
        mark = " (best)" if summary["best"][r["optimizer"]]["lr"] == r["lr"] else ""
        lines.append(f"| {r['optimizer']}{mark} | {r['lr']:g} | {fmt(r['final_valid_loss'])} | "
                     f"{fmt(r['final_train_loss'])} | {r['seconds']:.0f} |")
    valid, train = summary["valid"], summary["train"]
    reach = valid["scion_tokens_to_target"]
    lines.append("")
    for optimizer, b in summary["bracketing"].items():
        added = ", ".join(f"{lr:g}" for lr in b["added_lrs"]) or "none"
        lines.append(f"{optimizer}: best lr {summary['best'][optimizer]['lr']:g} "
                     f"{'strictly inside' if b['best_interior'] else 'AT THE EDGE of'} its grid; lrs added: {added}")
    lines += [f"both best lrs interior: {'yes' if summary['bests_interior'] else 'NO'}",
              f"tokens per run: {summary['tokens_per_run']}",
              f"AdamW final valid loss (target): {valid['target_loss']:.4f}; "
              f"Scion final valid loss: {summary['best']['scion']['final_valid_loss']:.4f}",
              "Scion tokens to the target (valid curve): "
              + ("not reached" if reach is None else f"{reach:.0f} = {valid['token_ratio']:.3f}x AdamW's"),
              "Scion tokens to AdamW's final train loss (train curve, smoothed): "
              + ("not reached" if train["token_ratio"] is None else f"{train['token_ratio']:.3f}x"),
              f"wall time of all runs: {summary['wall_time_s'] / 60:.1f} min"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    own, extra = launcher.split_passthrough(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    try:
        validate(args)
        if args.dry_run:
            print("# the initial grid; lrs are added after it while a best lr is at a grid edge")
            for optimizer, lr in grid(args):
                run_dir = os.path.join(args.out, run_name(optimizer, lr))
                command = launcher.torchrun_command(
                    launcher.run_args(train_args(args, optimizer, lr, extra), run_dir), args.nproc)
                print("OMP_NUM_THREADS=1 " + shlex.join(command))
            return 0
        os.makedirs(args.out, exist_ok=True)
        summary = summarize(args, *run_all(args, extra))
        for path in (args.results, args.plot):
            if os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(args.results, "w") as f:
            json.dump(summary, f, indent=1, allow_nan=False)
        plot(summary, args, args.plot)
        print(table(summary))
        print(f"wrote {args.results} and {args.plot}")
    except (BenchmarkError, launcher.LaunchError) as exc:
        print(f"convergence.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
