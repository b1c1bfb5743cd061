#!/usr/bin/env python
"""Turn the norm statistics of training runs into one tidy table and plots.

Each RUN_DIR is a ``--run-dir`` of ``disco-pretrain``: its ``norms.jsonl`` is read, or, when
there is none, the ``norms/...`` scalars of the TensorBoard event files under
``RUN_DIR/tensorboard/``; ``RUN_DIR/run_config.json`` (the run's flags, nested dicts
flattened to dotted keys such as ``model.hidden_size``, ``scion.lr_output``) adds the
hyper-parameters.

The table (``--out``, .csv or .parquet) has one row per (run, step, parameter or group,
kind, norm): columns run, step, tokens, loss, param, group, kind (param | update), norm,
value, then one column per hyper-parameter. Rows of a group aggregate have an empty param.

Plots (``--plots DIR``, PNG):
  norms_<norm>.png           norm vs step (or tokens) per group, params and updates, a line per run
  final_<group>_<norm>_vs_lr.png
                             the last logged group norm (default: output-layer RMS->inf) vs
                             learning rate, a line per batch size, the loss-optimal lr of each
                             batch size marked with a star (loss: mean of the last
                             --loss-window logged losses of the run)
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence

from disco_megatron.config import RunDir
from disco_megatron.models.naming import PARAM_GROUPS, param_group
from disco_megatron.norms.writers import read_norms_jsonl, read_norms_tensorboard

CORE_COLUMNS = ("run", "step", "tokens", "loss", "param", "group", "kind", "norm", "value")
_KINDS = (("param", "params"), ("update", "updates"))


class ExportError(Exception):
    """Bad input: the message names the directory, file or flag and the fix."""


class Run:
    """One run directory: its norm records and flattened hyper-parameters."""

    def __init__(self, name: str, records: list[dict], config: dict) -> None:
        self.name, self.records, self.config = name, records, config


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested dicts to dotted keys; lists become JSON text so every value is a scalar."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return flat


def load_run(run_dir: str, name: str) -> Run:
    """Records (norms.jsonl, else TensorBoard) and run_config.json of one run directory."""
    if not os.path.isdir(run_dir):
        raise ExportError(f"run directory {run_dir} does not exist")
    jsonl, tensorboard = RunDir(run_dir).norms, RunDir(run_dir).tensorboard
    if os.path.isfile(jsonl):
        records = read_norms_jsonl(jsonl)
    elif os.path.isdir(tensorboard):
        records = read_norms_tensorboard(tensorboard)
    else:
        records = []
    if not records:
        raise ExportError(f"run directory {run_dir}: no norm statistics found (expected norms.jsonl or "
                          "norms/... scalars under tensorboard/); train with --run-dir and --norm-log-interval")
    config = {}
    config_path = RunDir(run_dir).run_config
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                config = flatten(json.load(f))
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ExportError(f"{config_path}: not a JSON object of run flags ({exc}); "
                              "fix or remove it") from exc
    return Run(name, records, config)


def run_names(run_dirs: Sequence[str]) -> list[str]:
    """Directory base names, or the paths as given when two base names coincide."""
    paths = [os.path.normpath(d) for d in run_dirs]
    names = [os.path.basename(p) for p in paths]
    return names if len(set(names)) == len(names) else paths


def _group(name: str) -> str | None:
    try:
        return param_group(name)
    except ValueError:
        return None


def norm_rows(run: Run) -> Iterator[tuple]:
    """The CORE_COLUMNS values of every norm of a run."""
    for record in run.records:
        base = (run.name, record["step"], record.get("tokens"), record.get("loss"))
        for kind, key in _KINDS:
            for name, norms in record.get(key, {}).items():
                group = _group(name)
                for norm, value in norms.items():
                    yield (*base, name, group, kind, norm, value)
            for group, norms in record.get("groups", {}).get(kind, {}).items():
                for norm, value in norms.items():
                    yield (*base, None, group, kind, norm, value)


def config_columns(runs: Sequence[Run]) -> list[tuple[str, str]]:
    """(table column, config key) of every hyper-parameter; keys clashing with a core column get 'config.'."""
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run.config))
    return [(f"config.{k}" if k in CORE_COLUMNS else k, k) for k in keys]


def write_csv(runs: Sequence[Run], path: str) -> int:
    columns = config_columns(runs)
    count = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CORE_COLUMNS, *(c for c, _ in columns)])
        for run in runs:
            extra = ["" if run.config.get(k) is None else run.config[k] for _, k in columns]
            for row in norm_rows(run):
                writer.writerow([*("" if v is None else v for v in row), *extra])
                count += 1
    return count


def write_parquet(runs: Sequence[Run], path: str) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ExportError("--out *.parquet needs pyarrow: pip install pyarrow "
                          "(or pip install -e .[plots])") from exc
    columns = config_columns(runs)
    tables = []
    for run in runs:
        rows = list(norm_rows(run))
        data = {col: pa.array([row[i] for row in rows]) for i, col in enumerate(CORE_COLUMNS)}
        data["value"] = pa.array([row[-1] for row in rows], type=pa.float64())
        for column, key in columns:
            data[column] = pa.repeat(run.config.get(key), len(rows))
        tables.append(pa.table(data))
    table = pa.concat_tables(tables, promote_options="permissive")
    pq.write_table(table, path)
    return table.num_rows


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ExportError("--plots needs matplotlib: pip install matplotlib "
                          "(or pip install -e .[plots])") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_norms_vs_step(runs: Sequence[Run], directory: str, x_axis: str) -> list[str]:
    """One figure per norm: rows param/update, a column per group, a line per run."""
    plt = _pyplot()
    series: dict[str, dict[tuple[str, str], dict[str, tuple[list, list]]]] = {}
    for run in runs:
        for record in run.records:
            x = record.get(x_axis)
            if x is None:
                continue
            for kind, _ in _KINDS:
                for group, norms in record.get("groups", {}).get(kind, {}).items():
                    for norm, value in norms.items():
                        xs, ys = series.setdefault(norm, {}).setdefault((kind, group), {}).setdefault(
                            run.name, ([], []))
                        xs.append(x)
                        ys.append(math.nan if value is None else value)
    written = []
    for norm, panels in series.items():
        groups = sorted({group for _, group in panels},
                        key=lambda g: (PARAM_GROUPS.index(g) if g in PARAM_GROUPS else len(PARAM_GROUPS), g))
        width = 3.6 * len(groups) + 1.8  # room on the right for the legend
        fig, axes = plt.subplots(2, len(groups), figsize=(width, 6.4), squeeze=False)
        for row, (kind, _) in enumerate(_KINDS):
            for column, group in enumerate(groups):
                ax = axes[row][column]
                for run_name, (xs, ys) in panels.get((kind, group), {}).items():
                    ax.plot(xs, ys, label=run_name)
                if all(y > 0 for lines in panels.get((kind, group), {}).values() for y in lines[1]):
                    ax.set_yscale("log")
                ax.set_title(f"{kind} · {group}", fontsize=9)
                ax.set_xlabel(x_axis)
        axes[0][0].set_ylabel(norm)
        axes[1][0].set_ylabel(norm)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper right", fontsize=8)
        fig.suptitle(f"{norm} per group")
        fig.tight_layout(rect=(0, 0, 1 - 1.8 / width, 0.95))
        path = os.path.join(directory, f"norms_{norm}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def final_points(runs: Sequence[Run], lr_key: str, batch_key: str, group: str, norm: str,
                 loss_window: int) -> dict[object, list[tuple[float, float, float]]]:
    """{batch size: [(lr, last group norm, final loss)]} of the runs that have all three."""
    points: dict[object, list[tuple[float, float, float]]] = {}
    for run in runs:
        lr, batch = run.config.get(lr_key), run.config.get(batch_key)
        with_norm = [r for r in run.records
                     if r.get("groups", {}).get("param", {}).get(group, {}).get(norm) is not None]
        losses = [r["loss"] for r in run.records if r.get("loss") is not None][-loss_window:]
        if lr is None or batch is None or not with_norm:
            print(f"export_norms.py: note: run {run.name} left out of the lr plot (needs {lr_key}, {batch_key} "
                  f"in run_config.json and a {group} {norm} norm)", file=sys.stderr)
            continue
        loss = sum(losses) / len(losses) if losses else math.nan
        points.setdefault(batch, []).append((float(lr), with_norm[-1]["groups"]["param"][group][norm], loss))
    return points


def _numbers_first(value: object) -> tuple:
    """Sort key: numbers ascending, then anything else by its text."""
    is_number = isinstance(value, (int, float))
    return (not is_number, value if is_number else str(value))


def loss_optimal(points: Sequence[tuple[float, float, float]]) -> tuple[float, float, float] | None:
    """The (lr, norm, loss) point of lowest finite loss; None when no loss is known."""
    finite = [p for p in points if math.isfinite(p[2])]
    return min(finite, key=lambda p: p[2]) if finite else None


def plot_final_norm_vs_lr(runs: Sequence[Run], directory: str, lr_key: str, batch_key: str, group: str,
                          norm: str, loss_window: int) -> list[str]:
    """Last group norm vs lr, a line per batch size, the loss-optimal lr of each marked."""
    points = final_points(runs, lr_key, batch_key, group, norm, loss_window)
    if not points:
        print(f"export_norms.py: note: no run has {lr_key}, {batch_key} and a {group} {norm} norm; "
              "lr plot skipped", file=sys.stderr)
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for batch in sorted(points, key=_numbers_first):
        line = sorted(points[batch])
        (drawn,) = ax.plot([p[0] for p in line], [p[1] for p in line], marker="o", label=f"{batch_key}={batch}")
        best = loss_optimal(line)
        if best is not None:
            ax.plot([best[0]], [best[1]], marker="*", markersize=16, color=drawn.get_color(),
                    markeredgecolor="black", linestyle="none")
    ax.set_xscale("log")
    ax.set_xlabel(lr_key)
    ax.set_ylabel(f"final {group} {norm} (param)")
    ax.set_title(f"final {group} {norm} vs {lr_key} (star: lowest loss per {batch_key})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(directory, f"final_{group}_{norm}_vs_lr.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="export_norms.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories (--run-dir of disco-pretrain); the run column is each "
                        "directory's base name (the path when two base names coincide)")
    parser.add_argument("--out", metavar="FILE",
                        help="tidy table to write: FILE.csv or FILE.parquet (Parquet needs pyarrow)")
    parser.add_argument("--plots", metavar="DIR", help="directory for PNG plots (created; needs matplotlib)")
    parser.add_argument("--x-axis", choices=("step", "tokens"), default="step",
                        help="x axis of the norm-vs-step plots (default: step)")
    parser.add_argument("--lr-key", default="lr",
                        help="run_config.json key (dotted for nested ones, e.g. scion.lr_output) used as "
                        "the learning rate of the final-norm plot (default: lr)")
    parser.add_argument("--batch-key", default="global_batch_size",
                        help="run_config.json key that tells batch sizes apart in the final-norm plot "
                        "(default: global_batch_size)")
    parser.add_argument("--final-group", default="output",
                        help="group whose last logged parameter norm the final-norm plot shows "
                        "(default: output)")
    parser.add_argument("--final-norm", default="rms_to_inf",
                        help="norm of the final-norm plot (default: rms_to_inf, the norm that transfers "
                        "across model and data size at the optimal lr and batch)")
    parser.add_argument("--loss-window", type=int, default=1,
                        help="a run's loss for choosing the best lr is the mean of its last N logged "
                        "losses (default: 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.out and not args.plots:
            raise ExportError("nothing to do: give --out FILE.csv|FILE.parquet and/or --plots DIR")
        if args.out and not args.out.endswith((".csv", ".parquet")):
            raise ExportError(f"--out {args.out}: the file name must end in .csv or .parquet")
        if args.loss_window < 1:
            raise ExportError(f"--loss-window must be >= 1 (got {args.loss_window})")
        runs = [load_run(d, name) for d, name in zip(args.run_dirs, run_names(args.run_dirs))]
        if args.out:
            parent = os.path.dirname(args.out)
            if parent:
                os.makedirs(parent, exist_ok=True)
            count = (write_parquet if args.out.endswith(".parquet") else write_csv)(runs, args.out)
            print(f"wrote {args.out} ({count} rows, {len(runs)} runs)")
        if args.plots:
            os.makedirs(args.plots, exist_ok=True)
            written = plot_norms_vs_step(runs, args.plots, args.x_axis)
            written += plot_final_norm_vs_lr(runs, args.plots, args.lr_key, args.batch_key, args.final_group,
                                             args.final_norm, args.loss_window)
            for path in written:
                print(f"wrote {path}")
    except ExportError as exc:
        print(f"export_norms.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
