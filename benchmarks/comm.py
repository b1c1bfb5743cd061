"""Bytes per rank per optimizer step, by collective: tp_mode owner vs duplicated vs theory.

For each TP size t one world of t gloo processes (TP = the world, PP1, DP1) holds the shards
of a megatron-named GQA + SwiGLU model built from shapes (no model instance: only the optimizer
step runs; real shapes, full layer count) and takes one ``DistributedScion`` step per mode.
``comm_stats()`` gives the bytes each rank sent per collective kind. Theory, with M the full
bytes of the TP group's matrices that must be whole (the spectral ones), per rank averaged over
the TP group: owner 2(t−1)/t²·M (each matrix's t−1 foreign pieces go to its owner and come
back), duplicated (t−1)/t·M (every rank sends its piece of every matrix to t−1 peers), so
owner/duplicated = 2/t.

Newton–Schulz runs 1 step (``--ns-steps``): bytes do not depend on it, time does. Each rank
also checks that the optimizer's ownership plan equals the one ``balance.py`` computes.

    python benchmarks/comm.py [--quick] [--preset gpt12] [--tp 2 4] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from disco_megatron.runtime.spawn import run_workers
from _common import QKV_SPLIT, describe, format_table, preset, stage_layouts, stage_plan, whole_matrix_bytes, \
    write_result

MODES = ("owner", "duplicated")
DUALIZE_KINDS = ("all_to_all", "all_gather")  # the collectives of the dualize step; all_reduce: grad check


def comm_worker(rank: int, world: int, preset_name: str, ns_steps: int, out: str) -> None:
    """One DistributedScion step per tp_mode on TP=world; rank 0 writes every rank's byte counts."""
    import torch
    import torch.distributed as dist

    from disco_megatron.optim.distributed import DistributedScion, StageGroups

    singletons = [dist.new_group([r]) for r in range(world)]  # DP groups of a DP1 world
    groups = StageGroups(tp=None, dp=singletons[rank], tp_dp=None, world=None)
    layouts = stage_layouts(preset(preset_name), world, rank)
    gen = torch.Generator().manual_seed(rank)
    params = {name: torch.randn(layout.local_shape, generator=gen) for name, layout in layouts.items()}
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen)
    by_param = {params[name]: layout for name, layout in layouts.items()}
    report: dict = {"matrix_bytes": whole_matrix_bytes(layouts.values())}
    for mode in MODES:
        opt = DistributedScion(list(params.values()), by_param, groups, tp_mode=mode, ns_steps=ns_steps)
        opt.step()
        report[mode] = opt.comm_stats()["last_step"]
        if mode == "owner":
            report["plan_balance"] = opt.plan.balance()
            report["plan_matches_balance_py"] = opt.plan.buckets == stage_plan(preset(preset_name), world, 1).buckets
        del opt
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        Path(out).write_text(json.dumps(reports))


def summarize(tp: int, reports: list[dict]) -> dict:
    """Per-mode bytes (mean and max over ranks, by kind), theory and the owner/duplicated ratio."""
    matrix_bytes = reports[0]["matrix_bytes"]
    theory = {"owner": 2 * (tp - 1) / tp**2 * matrix_bytes, "duplicated": (tp - 1) / tp * matrix_bytes}
    modes = {}
    for mode in MODES:
        kinds = sorted({k for r in reports for k in r[mode]})
        sent = {k: [r[mode].get(k, {}).get("sent", 0) for r in reports] for k in kinds}
        received = {k: [r[mode].get(k, {}).get("received", 0) for r in reports] for k in kinds}
        dualize = [sum(r[mode].get(k, {}).get("sent", 0) for k in DUALIZE_KINDS) for r in reports]
        mean = sum(dualize) / tp
        modes[mode] = {
            "sent_mean_by_kind": {k: sum(v) / tp for k, v in sent.items()},
            "received_mean_by_kind": {k: sum(v) / tp for k, v in received.items()},
            "calls_by_kind": {k: reports[0][mode].get(k, {}).get("calls", 0) for k in kinds},
            "dualize_sent_per_rank": dualize, "dualize_sent_mean": mean, "dualize_sent_max": max(dualize),
            "theory": theory[mode], "measured_over_theory": mean / theory[mode],
        }
    ratio = modes["owner"]["dualize_sent_mean"] / modes["duplicated"]["dualize_sent_mean"]
    return {"tp": tp, "matrix_bytes": matrix_bytes, "modes": modes, "owner_over_duplicated": ratio,
            "expected_owner_over_duplicated": 2 / tp,
            "plan_balance": reports[0]["plan_balance"],
            "plan_matches_balance_py": all(r["plan_matches_balance_py"] for r in reports)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model (the test's mode)")
    parser.add_argument("--preset", default=None, help="model preset (default gpt12; --quick: tiny)")
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4], help="TP sizes (one world each)")
    parser.add_argument("--ns-steps", type=int, default=1, help="Newton–Schulz steps (bytes do not depend on it)")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    name = args.preset or ("tiny" if args.quick else "gpt12")
    cfg = preset(name)
    if any(t < 2 for t in args.tp):
        sys.exit(f"--tp {args.tp}: every TP size must be >= 2 (TP1 moves no bytes)")
    print(f"{name}: {describe(cfg)}; qkv split {QKV_SPLIT}; fp32; NS steps {args.ns_steps}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for tp in args.tp:
            path = str(Path(tmp, f"tp{tp}.json"))
            run_workers(comm_worker, tp, name, args.ns_steps, path)
            results.append(summarize(tp, json.loads(Path(path).read_text())))
    mb = 1e6
    rows = []
    for r in results:
        for mode in MODES:
            m = r["modes"][mode]
            kinds = m["sent_mean_by_kind"]
            rows.append((r["tp"], mode, r["matrix_bytes"] / mb, kinds.get("all_to_all", 0) / mb,
                         kinds.get("all_gather", 0) / mb, kinds.get("all_reduce", 0), m["dualize_sent_max"] / mb,
                         m["theory"] / mb, m["measured_over_theory"]))
    print("bytes sent per rank per step (mean over the TP group; MB = 1e6 bytes; all_reduce in bytes)")
    print(format_table(["TP", "tp_mode", "matrices MB", "all_to_all MB", "all_gather MB", "all_reduce B",
                        "max rank MB", "theory MB", "meas/theory"], rows))
    print(format_table(["TP", "owner/duplicated", "expected 2/t", "plan max/mean", "plan = balance.py"],
                       [(r["tp"], r["owner_over_duplicated"], r["expected_owner_over_duplicated"],
                         r["plan_balance"], r["plan_matches_balance_py"]) for r in results]))
    path = write_result("comm", {"quick": args.quick, "preset": name, "model": describe(cfg),
                                 "qkv_split": QKV_SPLIT, "ns_steps": args.ns_steps, "dtype": "float32",
                                 "results": results}, *([args.out] if args.out else []))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
