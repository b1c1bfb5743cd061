"""The owner step overlapped against sequential, and against the sum of its parts.

Two gloo processes (TP``--tp``, one thread each) build the optimizer's layouts of every parameter
shard of a preset (``small`` by default) and run the :class:`~disco_megatron.optim.distributed.DistributedDualizer`
of ``--scion-tp-mode owner`` (and ``duplicated``) on random momenta:

- overlapped (the default): bucket i+1's gather and bucket i's scatter run asynchronously while
  bucket i+1 / i's Newton–Schulz computes (at most ``MAX_IN_FLIGHT`` of each in flight);
- sequential: each stage waits for the previous one;
- the parts of the sequential owner step, timed one by one on each rank (gather_to_owners,
  dualize, scatter_to_shards; the step of the smallest sum, slowest rank): their sum is what the
  step costs without overlap.

Step times: min over ``--steps`` rounds, max over ranks (time between barriers); each round runs
the overlapped step, the sequential one and (owner) the one whose parts are timed, so load
changes hit all three alike. Ratios come from the same run. The overlapped and sequential directions are
compared too (equal bit for bit).

    OMP_NUM_THREADS=1 python benchmarks/overlap.py [--quick] [--preset small] [--tp 2] [--steps 5] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from disco_megatron.runtime.spawn import run_workers
from _common import (RESULTS_DIR, describe, format_table, interleaved_min, owner_stage_times, preset, stage_layouts,
                     write_result)

MODES = ("owner", "duplicated")
VARIANTS = {"overlapped": True, "sequential": False}  # name -> DistributedDualizer.overlap
PARTS = ("gather_to_owners", "dualize", "scatter_to_shards")


def worker(rank: int, world: int, preset_name: str, steps: int, out: str) -> None:
    import torch.distributed as dist

    from disco_megatron.optim.distributed import MAX_IN_FLIGHT, DistributedDualizer, StageGroups
    from disco_megatron.optim.plan import build_exchange_plan

    torch.set_num_threads(1)
    singletons = [dist.new_group([r]) for r in range(world)]  # DP groups of a DP1 world
    groups = StageGroups(tp=None, dp=singletons[rank], tp_dp=None, world=None)
    layouts = list(stage_layouts(preset(preset_name), world, rank).values())
    gen = torch.Generator().manual_seed(rank)
    momenta = [torch.randn(layout.local_shape, generator=gen) for layout in layouts]
    report: dict[str, Any] = {"max_in_flight": MAX_IN_FLIGHT}
    for mode in MODES:
        plan = build_exchange_plan(layouts, tp_size=world, tp_mode=mode)
        dualizers = {name: DistributedDualizer(plan, groups, torch.device("cpu"), overlap=overlap)
                     for name, overlap in VARIANTS.items()}
        fns = {name: (lambda d=d: d(momenta)) for name, d in dualizers.items()}
        parts: list[dict[str, float]] = []
        if mode == "owner":  # one more sequential step per round, its stages timed one by one
            fns["parts"] = lambda: parts.append(owner_stage_times(dualizers["sequential"], momenta, 1))
        ms = {name: 1e3 * s for name, s in interleaved_min(fns, steps).items() if name in VARIANTS}
        directions = {name: d(momenta) for name, d in dualizers.items()}
        report[mode] = {"buckets": len(plan.buckets), "ms": ms,
                        "bit_equal": all(torch.equal(a, b) for a, b in zip(*directions.values()))}
        if parts:
            fastest = min(parts[1:], key=lambda p: sum(p[k] for k in PARTS))  # parts[0]: the warm-up round
            report[mode]["parts_ms"] = {k: 1e3 * v for k, v in fastest.items()}
    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        Path(out).write_text(json.dumps(reports))


def summarize(reports: list[dict]) -> dict[str, Any]:
    """Times (max over ranks already), the slowest rank's parts, and the ratios."""
    result: dict[str, Any] = {"max_in_flight": reports[0]["max_in_flight"]}
    for mode in MODES:
        ms = reports[0][mode]["ms"]
        entry: dict[str, Any] = {"buckets": reports[0][mode]["buckets"], "ms": ms,
                                 "bit_equal": all(r[mode]["bit_equal"] for r in reports),
                                 "overlapped / sequential": ms["overlapped"] / ms["sequential"]}
        if mode == "owner":
            parts = max((r[mode]["parts_ms"] for r in reports), key=lambda p: sum(p[k] for k in PARTS))
            entry["parts_ms"] = parts
            entry["sum_of_parts_ms"] = sum(parts[k] for k in PARTS)
            for name in VARIANTS:
                entry[f"{name} / sum of parts"] = ms[name] / entry["sum_of_parts_ms"]
        result[mode] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, 1 step (the test's mode)")
    parser.add_argument("--preset", default="small", help="model preset (default small)")
    parser.add_argument("--tp", type=int, default=2, help="TP size = gloo processes (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (min is reported)")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    name, steps = ("tiny", 1) if args.quick else (args.preset, args.steps)
    cfg = preset(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp, "reports.json"))
        run_workers(worker, args.tp, name, steps, path)
        result = summarize(json.loads(Path(path).read_text()))
    print(f"{describe(cfg)}: every parameter shard, TP{args.tp}, gloo, one thread per rank; min of {steps} "
          f"steps, max over ranks; at most {result['max_in_flight']} gathers and scatters in flight")
    print(format_table(["mode", "buckets", "overlapped ms", "sequential ms", "overlapped/sequential", "bit-equal"],
                       [(m, result[m]["buckets"], result[m]["ms"]["overlapped"], result[m]["ms"]["sequential"],
                         result[m]["overlapped / sequential"], result[m]["bit_equal"]) for m in MODES]))
    owner = result["owner"]
    print(format_table([*PARTS, "sum of parts", "overlapped/sum", "sequential/sum"],
                       [(*(owner["parts_ms"][k] for k in PARTS), owner["sum_of_parts_ms"],
                         owner["overlapped / sum of parts"], owner["sequential / sum of parts"])]))
    path = write_result("overlap", {"quick": args.quick, "model": describe(cfg), "tp": args.tp, "steps": steps,
                                    **result}, args.out or RESULTS_DIR)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
