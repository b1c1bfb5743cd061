"""Newton–Schulz in bf16 vs fp32 vs the exact polar factor, on the quickstart's and a 125M model's matrices.

Why: on CUDA the NS runs in bf16 by default (``--scion-ns-dtype``); this measures what that costs
in accuracy and so which tolerance a bf16 parity test needs. Each logical matrix that Scion
orthogonalises (``--scion-qkv-split qkv``: Q, K, V; SwiGLU gate and up; proj; fc2) is a Gaussian
momentum-like matrix (fixed seed); errors are relative Frobenius norms of the update
``orthogonalize(G)``. bf16 matmuls run on CPU too (slowly), so the numbers come from the CPU.

Second table: the Gram form that fp32 takes for wide matrices (n >= 2k) against the standard form,
each against the fp64 iteration, on the same Gaussian matrices and on ill-conditioned ones (the same
singular vectors, singular values log-spaced over [1e-6, 1]).
Writes ``benchmarks/results/ns_precision.json``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import format_table, write_result  # noqa: E402
from disco_megatron.optim import newton_schulz  # noqa: E402
from disco_megatron.optim.newton_schulz import gram_segments, orthogonalize  # noqa: E402
from disco_megatron.scion_options import DEFAULTS  # noqa: E402


def matrix_shapes(hidden: int, heads: int, groups: int, ffn: int) -> dict[str, tuple[int, int]]:
    """Scion's logical matrices of one layer (qkv split, SwiGLU halves)."""
    kv = hidden // heads
    return {"q": (heads * kv, hidden), "k/v": (groups * kv, hidden), "proj": (hidden, heads * kv),
            "fc1 gate/up": (ffn, hidden), "fc2": (hidden, ffn)}


MODELS = {
    "quickstart (h192 heads4 groups2 ffn512)": matrix_shapes(192, 4, 2, 512),
    "125M (h768 heads12 ffn3072)": matrix_shapes(768, 12, 12, 3072),
}
QUICK = {"tiny (h64 heads4 groups2 ffn128)": matrix_shapes(64, 4, 2, 128)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def measure(shape: tuple[int, int], backend: str, seed: int) -> dict[str, float]:
    """Relative differences of one matrix's update: bf16 vs fp32 NS, and each vs the exact SVD polar."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    ns32 = orthogonalize(G, backend, DEFAULTS.ns_steps, dtype=torch.float32)
    ns16 = orthogonalize(G, backend, DEFAULTS.ns_steps, dtype=torch.bfloat16)
    exact = orthogonalize(G.double(), "svd")
    return {"bf16_vs_fp32": rel(ns16, ns32), "fp32_vs_exact": rel(ns32, exact), "bf16_vs_exact": rel(ns16, exact)}


def ill_conditioned(G: torch.Tensor, condition: float = 1e6) -> torch.Tensor:
    """G's singular vectors with singular values log-spaced over [1/condition, 1] (fp64)."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U * torch.logspace(0, -math.log10(condition), S.numel(), dtype=torch.float64)) @ Vh


def measure_gram(shape: tuple[int, int], backend: str, seed: int) -> list[dict]:
    """fp32 vs the fp64 iteration, Gram form (what fp32 takes) and standard form, Gaussian and ill-conditioned."""
    G = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    out = []
    for inputs, matrix in (("gaussian", G.double()), ("condition 1e6", ill_conditioned(G))):
        fp64 = orthogonalize(matrix, backend, DEFAULTS.ns_steps, dtype=torch.float64)
        gram = rel(orthogonalize(matrix.float(), backend, DEFAULTS.ns_steps), fp64)
        with mock.patch.object(newton_schulz, "GRAM_MIN_ASPECT", math.inf):
            standard = rel(orthogonalize(matrix.float(), backend, DEFAULTS.ns_steps), fp64)
        out.append({"input": inputs, "gram_vs_fp64": gram, "standard_vs_fp64": standard})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes only (tests)")
    parser.add_argument("--out", default=None, help="directory of the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)
    rows, records = [], []
    for model, shapes in (QUICK if args.quick else MODELS).items():
        for backend in ("ns5", "polar_express"):
            for seed, (name, shape) in enumerate(shapes.items()):
                r = measure(shape, backend, seed)
                records.append({"model": model, "matrix": name, "shape": list(shape), "backend": backend, **r})
                rows.append([model, backend, name, f"{shape[0]}x{shape[1]}", f"{r['bf16_vs_fp32']:.2e}",
                             f"{r['fp32_vs_exact']:.2e}", f"{r['bf16_vs_exact']:.2e}"])
    print(format_table(["model", "backend", "matrix", "shape", "bf16 vs fp32", "fp32 vs exact", "bf16 vs exact"],
                       rows))
    worst = max(r["bf16_vs_fp32"] for r in records)
    print(f"largest bf16 vs fp32 update difference: {worst:.2e}")
    gram_rows, gram_records = [], []
    for model, shapes in (QUICK if args.quick else MODELS).items():
        for backend in ("ns5", "polar_express"):
            for seed, (name, shape) in enumerate(shapes.items()):
                k, n = sorted(shape)
                if not gram_segments(k, n, DEFAULTS.ns_steps, torch.float32, backend):
                    continue
                for r in measure_gram(shape, backend, seed):
                    gram_records.append({"model": model, "matrix": name, "shape": list(shape), "backend": backend, **r})
                    gram_rows.append([model, backend, name, f"{shape[0]}x{shape[1]}", r["input"],
                                      f"{r['gram_vs_fp64']:.2e}", f"{r['standard_vs_fp64']:.2e}",
                                      f"{r['gram_vs_fp64'] / r['standard_vs_fp64']:.2f}"])
    print("\nGram form (fp32, n >= 2k) vs standard form, each vs the fp64 iteration:")
    print(format_table(["model", "backend", "matrix", "shape", "input", "gram vs fp64", "standard vs fp64",
                        "gram / standard"], gram_rows))
    worst_gram = max((r["gram_vs_fp64"] / r["standard_vs_fp64"] for r in gram_records), default=float("nan"))
    print(f"largest gram / standard error ratio: {worst_gram:.2f}")
    write_result("ns_precision", {"quick": args.quick, "records": records, "max_bf16_vs_fp32": worst,
                                  "gram_records": gram_records, "max_gram_over_standard": worst_gram},
                 *([args.out] if args.out else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
