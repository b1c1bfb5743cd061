"""σ_max accuracy of a run's logged norms: recorded bounds, and rms_to_rms against exact SVD of its checkpoints.

For a finished ``disco-pretrain`` run directory (``norms.jsonl`` + ``checkpoints/``):

1. ``recorded``: ``sigma_max_rel_bound`` (the tracker's own bound on σ_max's relative error; 0
   for a matrix measured by exact SVD) of every matrix at every logged step, for params,
   updates and weight changes: max and median.
2. ``logged_vs_exact``: every logged step that has a checkpoint is exported to HF
   (``to-hf``: separate q/k/v and gate/up, the embedding transposed as the reference measures
   it), and each parameter matrix's logged ``rms_to_rms = σ_max·√(d_in/d_out)`` is compared
   with the reference formula on float64 exact SVD (``tests/_reference_norms.py``): max and
   median relative error over all those steps and matrices. Updates need two consecutive
   checkpoints and are covered by ``tests/test_norms_reference.py`` instead.
3. ``lanczos_vs_exact``: the same matrices through the tracker's Lanczos alone
   (``exact_max_dim=0``, the default tolerance and cap, warm-started from step to step as the
   tracker does): the error of the iterative path, which the tracker uses for matrices larger
   than ``PowerIterationState.exact_max_dim`` in their smaller dim.

``--quick`` first trains a tiny TP2 model for 4 steps (a checkpoint and norms every 2) into a
temporary directory (the test's mode).

    python benchmarks/norm_accuracy.py RUN_DIR [--out DIR]
    python benchmarks/norm_accuracy.py --quick
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import format_table, median, write_result  # noqa: E402
from _reference_norms import hf_matrix, reference_norms  # noqa: E402
from disco_megatron import launcher  # noqa: E402
from disco_megatron.config import RunDir  # noqa: E402
from disco_megatron.norms import PowerIterationState, read_norms_jsonl, sharded_norms  # noqa: E402
from disco_megatron.norms.definitions import SIGMA_BOUND  # noqa: E402

REQUIRED = 1e-3  # the bound on σ_max's relative error at every logged step
QUICK_RUN = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
             "--ffn-hidden-size", "128", "--seq-length", "32", "--vocab-size", "4096",
             "--tensor-model-parallel-size", "2", "--micro-batch-size", "2", "--global-batch-size", "4",
             "--train-iters", "4", "--log-interval", "1", "--norm-log-interval", "2", "--save-interval", "2",
             "--optimizer", "scion", "--lr", "0.01"]


def _summary(errors: list[float]) -> dict:
    return {"count": len(errors), "max": max(errors, default=0.0), "median": median(errors) if errors else 0.0}


def recorded_bounds(records: list[dict]) -> dict[str, dict]:
    """Max and median of the recorded ``sigma_max_rel_bound`` per record kind, over all steps and matrices."""
    kinds = ("params", "updates", "weight_changes")
    return {kind: _summary([norms[SIGMA_BOUND] for r in records for norms in r.get(kind, {}).values()
                            if norms.get(SIGMA_BOUND) is not None]) for kind in kinds}


def checkpoint_weights(run_dir: str, step: int, out: str) -> dict:
    """The HF tensors of the run's checkpoint at ``step`` (exported with ``to-hf``)."""
    from safetensors.torch import load_file

    from disco_megatron.checkpoint.cli import main as convert

    with contextlib.redirect_stdout(io.StringIO()):  # to-hf's "wrote ..." lines, once per step
        code = convert(["to-hf", "--load", RunDir(run_dir).checkpoints, "--ckpt-step", str(step), "--out", out])
    if code != 0:
        raise SystemExit(f"to-hf of {run_dir} step {step} failed")
    return load_file(os.path.join(out, "model.safetensors"))


def compare(run_dir: str) -> dict:
    """The three measurements of the module docstring for ``run_dir``."""
    records = read_norms_jsonl(RunDir(run_dir).norms)
    ckpt_dir = RunDir(run_dir).checkpoints
    saved = {int(name.removeprefix("iter_")) for name in os.listdir(ckpt_dir) if name.startswith("iter_")}
    steps = [r for r in records if r["step"] in saved]
    if not steps:
        raise SystemExit(f"{run_dir}: no logged step has a checkpoint; run with --save-interval a multiple of "
                         "--norm-log-interval")
    logged, lanczos, worst = [], [], {}
    state = PowerIterationState(exact_max_dim=0)
    with tempfile.TemporaryDirectory() as tmp:
        for record in steps:
            weights = checkpoint_weights(run_dir, record["step"], os.path.join(tmp, str(record["step"])))
            for key, got in record["params"].items():
                W = hf_matrix(weights, key)
                if W.dim() != 2:
                    continue
                exact = reference_norms(W)["rms_to_rms"]
                error = abs(got["rms_to_rms"] - exact) / exact
                logged.append(error)
                iterated = sharded_norms(W.float(), None, None, state=state, key=key)["rms_to_rms"]
                lanczos.append(abs(iterated - exact) / exact)
                if error >= worst.get("error", -1.0):
                    worst = {"step": record["step"], "key": key, "error": error}
    return {"run_dir": run_dir, "logged_steps": [r["step"] for r in records],
            "compared_steps": [r["step"] for r in steps], "recorded": recorded_bounds(records),
            "logged_vs_exact": {**_summary(logged), "worst": worst}, "lanczos_vs_exact": _summary(lanczos),
            "required": REQUIRED, "tolerance": state.tol, "max_iters": state.max_iters}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", nargs="?", help="a finished disco-pretrain run directory (not with --quick)")
    parser.add_argument("--quick", action="store_true", help="train a tiny TP2 model for 4 steps first (the test's mode)")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick == (args.run_dir is not None):
        parser.error("give a RUN_DIR or --quick (one of them)")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or os.path.join(tmp, "run")
        if args.quick:
            result = launcher.run_training(run_dir, QUICK_RUN, 2, timeout=600, echo=None)
            if not result.ok:
                raise SystemExit(f"the --quick training run failed:\n{launcher.log_tail(run_dir)}")
        result = compare(run_dir)
    print(f"{run_dir}: {len(result['logged_steps'])} logged steps, {len(result['compared_steps'])} with a checkpoint")
    rows = [(f"recorded bound, {kind}", s["count"], s["max"], s["median"]) for kind, s in result["recorded"].items()]
    rows += [(label, result[key]["count"], result[key]["max"], result[key]["median"])
             for label, key in (("logged vs exact SVD, params", "logged_vs_exact"),
                                ("Lanczos alone vs exact SVD, params", "lanczos_vs_exact"))]
    print(format_table(["σ_max relative error (rms_to_rms)", "values", "max", "median"], rows))
    print(f"worst logged: {result['logged_vs_exact']['worst']}; required <= {REQUIRED:g} at every logged step")
    path = write_result("norm_accuracy", {"quick": args.quick, **result}, *([args.out] if args.out else []))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
