"""Newton–Schulz load balance of the ownership plan: max/mean work over the ranks that share it.

Pure (no processes): the exchange plan the optimizer builds (``build_exchange_plan`` on the same
layouts; ``comm.py`` checks on live ranks that the optimizer's plan equals this one). Work of a
matrix is its NS cost ``m·n·min(m, n)``. With DP > 1 the owners spread over TP×DP (``--scion-dp-mode
sharded``); with DP replicated every replica plans over its TP ranks, i.e. the TP×1 row.
``bound`` is the best any assignment can do: max(largest matrix, mean load) / mean load.

    python benchmarks/balance.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys

from _common import PRESETS, QKV_SPLIT, describe, format_table, stage_plan, write_result

LAYOUTS = ((2, 1), (4, 1), (2, 2), (4, 2))
TARGET = 1.1


def balance_row(preset: str, tp: int, dp: int, qkv_split: str) -> dict:
    """Plan balance of one model on TP×DP (owners over TP×DP when DP > 1)."""
    plan = stage_plan(PRESETS[preset], tp, dp, qkv_split)
    costs = plan.costs()
    mean = sum(costs.values()) / plan.slots
    return {"preset": preset, "model": describe(PRESETS[preset]), "qkv_split": qkv_split, "tp": tp, "dp": dp,
            "dp_mode": plan.dp_mode, "matrices": len(costs), "balance": plan.balance(),
            "bound": max(max(costs.values()), mean) / mean}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="12-layer model only (the test's mode)")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    presets = ["gpt12"] if args.quick else ["gpt12", "gpt24"]
    splits = [QKV_SPLIT] if args.quick else sorted({QKV_SPLIT, "fused"}, key=lambda s: s != QKV_SPLIT)
    rows = [balance_row(p, tp, dp, s) for p in presets for s in splits for tp, dp in LAYOUTS]
    for p in presets:
        print(f"{p}: {describe(PRESETS[p])}")
    print(format_table(["model", "qkv_split", "TPxDP", "dp_mode", "matrices", "max/mean", "bound"],
                       [(r["preset"], r["qkv_split"], f"{r['tp']}x{r['dp']}", r["dp_mode"], r["matrices"],
                         r["balance"], r["bound"]) for r in rows]))
    worst = max(r["balance"] for r in rows)
    print(f"worst max/mean {worst:.4f} (target <= {TARGET})")
    path = write_result("balance", {"quick": args.quick, "target": TARGET, "rows": rows},
                        *([args.out] if args.out else []))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
