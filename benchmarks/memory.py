"""Optimizer state held per rank: Scion's replicated vs DP-sharded mode, against 8·P/(TP·DP).

For each TP×DP layout (4 gloo processes, megatron's parallel state rebuilt per layout) every rank
builds its TP shards of a bf16 model from shapes (``_common.stage_layouts``) and the Scion state
``disco-pretrain --bf16`` would hold, then counts the bytes of the tensors actually held:
replicated (``--scion-dp-mode replicated``): an fp32 master of every local parameter (what
``ScionOptimizer`` keeps for bf16 params) plus the momentum ``DistributedScion.init_state``
allocates; sharded: the owners' fp32 momentum and master (``DistributedScion.owned``, gathered
from the bf16 parameters). Theory for sharded: 8 bytes per parameter over TP·DP ranks.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from disco_megatron.config import ConfigError, ModelConfig
from disco_megatron.runtime.spawn import run_workers
from _common import describe, format_table, preset, stage_layouts, write_result

WORLD = 4
LAYOUTS = ((1, 4), (2, 2), (4, 1))  # TP x DP, each on the WORLD processes
MODES = ("replicated", "sharded")
STATE_BYTES_PER_PARAM = 8  # fp32 momentum + fp32 master


def valid_layouts(cfg: ModelConfig) -> list[tuple[int, int]]:
    """The TP×DP layouts of ``LAYOUTS`` the model can be split into (query groups divisible by TP)."""
    valid = []
    for tp, dp in LAYOUTS:
        try:
            cfg.validate(tp, 1)
        except ConfigError:
            continue
        valid.append((tp, dp))
    return valid


def memory_worker(rank: int, world: int, preset_name: str, out: str) -> None:
    """Bytes of Scion state this rank holds in each DP mode at each TP×DP of ``LAYOUTS`` (one
    world, megatron's parallel state rebuilt per layout); rank 0 writes every rank's counts."""
    import torch
    import torch.distributed as dist

    from disco_megatron.optim.distributed import DistributedScion, StageGroups
    from disco_megatron.runtime import initialize_parallel

    by_layout = []
    for tp, _ in valid_layouts(preset(preset_name)):
        info = initialize_parallel(tp, 1)
        groups = StageGroups.from_megatron()
        layouts = stage_layouts(preset(preset_name), tp, info.tp_rank)
        params = {name: torch.zeros(layout.local_shape, dtype=torch.bfloat16) for name, layout in layouts.items()}
        report: dict = {}
        for mode in MODES:
            if mode == "replicated":
                masters = {name: p.float() for name, p in params.items()}
                opt = DistributedScion(list(masters.values()), {masters[n]: layouts[n] for n in layouts}, groups)
                opt.init_state()
                held = [t for st in opt.state.values() for t in st.values()] + list(masters.values())
            else:
                opt = DistributedScion(list(params.values()), {params[n]: layouts[n] for n in layouts}, groups,
                                       dp_mode="sharded")
                opt.init_state()
                held = [t for st in opt.owned.values() for t in st]
                report["planned_bytes"] = STATE_BYTES_PER_PARAM * opt.plan.owned_numel(opt.dualizer.me)
            report[mode] = sum(t.numel() * t.element_size() for t in held)
            del opt, held
        gathered = [None] * world
        dist.all_gather_object(gathered, report)
        by_layout.append(gathered)
    if rank == 0:
        Path(out).write_text(json.dumps(by_layout))


def summarize(tp: int, dp: int, total_params: int, reports: list[dict]) -> dict:
    """Mean and max bytes per rank of each mode, and the sharded mean/max against the theory."""
    theory = STATE_BYTES_PER_PARAM * total_params / (tp * dp)
    row: dict = {"tp": tp, "dp": dp, "params": total_params, "theory_sharded_bytes": theory}
    for mode in MODES:
        per_rank = [r[mode] for r in reports]
        row[mode] = {"per_rank": per_rank, "mean": sum(per_rank) / len(per_rank), "max": max(per_rank)}
    row["sharded_equals_plan"] = all(r["sharded"] == r["planned_bytes"] for r in reports)
    row["sharded_mean_over_theory"] = row["sharded"]["mean"] / theory
    row["sharded_max_over_theory"] = row["sharded"]["max"] / theory
    row["replicated_over_sharded"] = row["replicated"]["mean"] / row["sharded"]["mean"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model (the test's mode)")
    parser.add_argument("--preset", nargs="+", default=None,
                        help="model presets (default quickstart and gpt12, the 125M config; --quick: tiny)")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    names = args.preset or (["tiny"] if args.quick else ["quickstart", "gpt12"])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cfg = preset(name)
            path = str(Path(tmp, f"{name}.json"))
            run_workers(memory_worker, WORLD, name, path)
            skipped = sorted(set(LAYOUTS) - set(valid_layouts(cfg)))
            if skipped:
                print(f"{name}: TP×DP {skipped} skipped ({cfg.query_groups} query groups do not split over that TP)")
            for (tp, dp), reports in zip(valid_layouts(cfg), json.loads(Path(path).read_text())):
                total = sum(math.prod(m.shape) for layout in stage_layouts(cfg, tp, 0).values()
                            for m in layout.matrices)  # the model's parameters, vocab padded for this TP
                results.append({"preset": name, "model": describe(cfg), **summarize(tp, dp, total, reports)})
    mb = 1e6
    print("Scion optimizer state (fp32 momentum + fp32 master) held per rank, bf16 model; MB = 1e6 bytes")
    print(format_table(
        ["model", "TP", "DP", "params M", "replicated mean MB", "sharded mean MB", "sharded max MB",
         "theory 8P/(TP·DP) MB", "mean/theory", "max/theory", "replicated/sharded"],
        [(r["preset"], r["tp"], r["dp"], r["params"] / 1e6, r["replicated"]["mean"] / mb, r["sharded"]["mean"] / mb,
          r["sharded"]["max"] / mb, r["theory_sharded_bytes"] / mb, r["sharded_mean_over_theory"],
          r["sharded_max_over_theory"], r["replicated_over_sharded"]) for r in results]))
    path = write_result("memory", {"quick": args.quick, "presets": names, "dtype": "bfloat16", "results": results},
                        *([args.out] if args.out else []))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
