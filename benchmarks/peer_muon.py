"""Ours against megatron-core Muon's Newton–Schulz, side by side in one run (optional peer).

The peer is emerging-optimizers 0.3.0 (``newton_schulz``, and ``newton_schulz_tp``, the
tensor-parallel Newton–Schulz behind megatron-core 0.16's ``TensorParallelMuon``). Two parts:

1. Single matrix: ``orthogonalize(G, "ns5")`` against the peer's ``newton_schulz(G, 5, "simple")``
   (the same (a, b, c) = (3.4445, −4.7750, 2.0315)), fp32, one thread, min of ``--repeats``
   interleaved runs (more for sub-millisecond shapes: at least 0.3 s of each), on the issue's
   shapes and the quickstart model's matrix shapes. Ours takes the Gram form on the wide ones
   (``optim/newton_schulz.py``), the peer its standard form. The max |ours − peer| is printed
   too (equal up to fp32 round-off).
2. Optimizer step of the hidden matrices of one GPT (``--layers`` 4, h512, 8 heads / 4 groups,
   SwiGLU ffn 2048), 5 NS5 steps, one world of t gloo processes per TP size (one thread each):
   our :class:`~disco_megatron.optim.distributed.DistributedDualizer` in ``owner`` and
   ``duplicated`` modes, QKV split ``qkv`` and ``fused``, against the peer's ``newton_schulz_tp``
   ``distributed`` and ``duplicated`` on megatron's shards (fused QKV and fc1 as megatron holds
   them). Min of ``--steps`` steps, max over ranks. The owner step is also split into its stages
   (gather, dualize, scatter; inside gather and scatter the ``all_to_all`` itself vs the copies
   around it) to show where the time goes.

Without emerging-optimizers it prints how to install it and exits 0 (``--quick`` then still
times ours on a tiny model: what ``tests/test_benchmarks.py`` runs).

    OMP_NUM_THREADS=1 python benchmarks/peer_muon.py [--quick] [--tp 2 4] [--repeats 5] [--steps 3] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from disco_megatron.config import ModelConfig
from disco_megatron.models.naming import tp_partition_dim
from disco_megatron.optim.newton_schulz import NS5_COEFFICIENTS, ns_flops, orthogonalize
from disco_megatron.runtime.spawn import run_workers
from _common import (PRESETS, RESULTS_DIR, describe, format_table, owner_stage_times, slowest_min, stage_layouts,
                     write_result)

NS_STEPS = 5
PEER_VERSION = "0.3.0"
# The issue's model (4 layers, h512, 8 heads in 4 groups, SwiGLU ffn 2048); vocab is irrelevant.
PEER_MODEL = ModelConfig(num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=4,
                         ffn_hidden_size=2048, vocab_size=1024, seq_length=64)
ISSUE_SHAPES = [(1024, 512), (2048, 512), (4096, 512), (512, 512)]
# examples/quickstart.sh's model: its logical matrices are the other single-matrix shapes.
QUICKSTART_MODEL = ModelConfig(num_layers=4, hidden_size=192, num_attention_heads=4, num_query_groups=2,
                               ffn_hidden_size=512, vocab_size=4096, seq_length=128)
QKV_SPLITS = ("qkv", "fused")
OUR_MODES = ("owner", "duplicated")
PEER_MODES = ("distributed", "duplicated")
INSTALL = f"""emerging-optimizers is not installed: the peer side of benchmarks/peer_muon.py is skipped.
It is an optional benchmark dependency (never a test one). Install it in a separate venv that
reuses this environment's torch and megatron-core (it declares Python >= 3.12 and needs no more
than typing.override, which peer_muon.py takes from typing_extensions on 3.11):

    python3 -m venv --system-site-packages /path/to/peer-venv
    /path/to/peer-venv/bin/pip install --ignore-requires-python --no-deps emerging-optimizers=={PEER_VERSION} absl-py
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 /path/to/peer-venv/bin/python benchmarks/peer_muon.py"""


def load_peer() -> types.ModuleType | None:
    """emerging-optimizers' ``muon_utils``, or None when it is not installed."""
    import typing

    import typing_extensions

    if not hasattr(typing, "override"):  # emerging-optimizers imports 3.12's typing.override
        typing.override = typing_extensions.override  # type: ignore[attr-defined]
    try:
        from emerging_optimizers.orthogonalized_optimizers import muon_utils
    except ImportError:
        return None
    return muon_utils


def hidden_matrices(cfg: ModelConfig) -> set[str]:
    """Names of the hidden 2-D weights (the matrices Muon orthogonalizes; not embedding/output)."""
    return {name for name, layout in stage_layouts(cfg, 1, 0).items()
            if layout.lmo == "spectral" and len(layout.local_shape) == 2}


def spectral_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """The distinct shapes of the logical matrices Scion orthogonalizes (TP1)."""
    return sorted({m.shape for layout in stage_layouts(cfg, 1, 0).values() if layout.lmo == "spectral"
                   for m in layout.matrices if len(m.shape) == 2})


def peer_flops(k: int, n: int) -> int:
    """Flops of the peer's NS5 on a k×n X (its standard form: X·Xᵀ, A·A, B·X each step)."""
    return NS_STEPS * (4 * k * k * n + 2 * k**3)


def flop_floors(cfg: ModelConfig, tp: int) -> dict[str, float]:
    """Ours over the peer in NS flops of the busiest rank at perfect balance: the best ratio
    the step can reach with equally fast kernels and free communication. Ours runs every
    logical matrix once, in the form our kernel takes (``ns_flops``: the Gram form for wide ones),
    spread over the TP ranks; the peer's ``distributed`` runs each rank's shard (transposed when
    split along dim 0, as ``newton_schulz_tp`` does; the k×k product A·A on every rank), its
    ``duplicated`` every whole megatron matrix on every rank."""
    full = {name: stage_layouts(cfg, 1, 0)[name].local_shape for name in hidden_matrices(cfg)}
    peer_distributed = 0
    for name, (rows, cols) in full.items():
        k, n = (cols, rows // tp) if tp_partition_dim(name) == 0 else (rows, cols // tp)
        peer_distributed += peer_flops(k, n)
    peer_duplicated = sum(peer_flops(min(shape), max(shape)) for shape in full.values())
    floors = {}
    for split in QKV_SPLITS:
        ours = sum(ns_flops(*m.shape, NS_STEPS) for name, layout in stage_layouts(cfg, 1, 0, split).items()
                   if name in full for m in layout.matrices) / tp
        floors |= {f"owner {split} / peer {mode}": ours / peer for mode, peer in
                   (("distributed", peer_distributed), ("duplicated", peer_duplicated))}
    return floors


# Sub-millisecond matrices get more runs: each implementation is timed for at least this long per
# shape, so that the min is not one lucky or unlucky sample among a handful.
MIN_SAMPLE_S = 0.3


def single_matrix_times(shapes: list[tuple[int, int]], repeats: int, peer: types.ModuleType | None,
                        min_sample_s: float = MIN_SAMPLE_S) -> list[dict]:
    """min ms of ours and the peer per shape over at least ``repeats`` runs and ``min_sample_s`` of
    each (more runs for small shapes), runs interleaved (fair under load)."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"ours": lambda G: orthogonalize(G, "ns5", NS_STEPS)}
    if peer is not None:
        assert peer._COEFFICIENT_SETS["simple"] == [NS5_COEFFICIENTS], "peer's 'simple' NS5 coefficients changed"
        impls["peer"] = lambda G: peer.newton_schulz(G, NS_STEPS, "simple")
    rows = []
    for shape in shapes:
        G = torch.randn(shape, generator=gen)
        outs = {name: fn(G) for name, fn in impls.items()}  # warm-up
        start = time.perf_counter()
        impls["ours"](G)
        runs = max(repeats, math.ceil(min_sample_s / (time.perf_counter() - start)))
        samples: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(runs):
            for name, fn in impls.items():
                start = time.perf_counter()
                fn(G)
                samples[name].append(time.perf_counter() - start)
        row: dict[str, Any] = {"shape": list(shape), "runs": runs,
                               **{f"{name}_ms": 1e3 * min(s) for name, s in samples.items()},
                               **{f"{name}_median_ms": 1e3 * statistics.median(s) for name, s in samples.items()}}
        if peer is not None:
            row["ours_over_peer"] = row["ours_ms"] / row["peer_ms"]
            row["max_abs_diff"] = float((outs["ours"] - outs["peer"]).abs().max())
        rows.append(row)
    return rows


def _owner_ops(dualizer: Any, momenta: list[torch.Tensor], top: int = 12) -> list[dict]:
    """One owner step under ``torch.profiler`` on this rank: the ``top`` aten ops by self CPU time
    (which copies — cat, stack, copy_, mul, reshape/contiguous — cost how much next to the products)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        dualizer(momenta)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in events[:top]]


def step_worker(rank: int, world: int, cfg: ModelConfig, steps: int, with_peer: bool, out: str) -> None:
    """Our dualizer (owner/duplicated × qkv/fused) and the peer's newton_schulz_tp on TP=world."""
    import torch.distributed as dist

    from disco_megatron.optim.distributed import DistributedDualizer, StageGroups
    from disco_megatron.optim.plan import build_exchange_plan

    torch.set_num_threads(1)
    singletons = [dist.new_group([r]) for r in range(world)]  # DP groups of a DP1 world
    groups = StageGroups(tp=None, dp=singletons[rank], tp_dp=None, world=None)
    hidden = sorted(hidden_matrices(cfg))
    gen = torch.Generator().manual_seed(rank)
    layouts = {split: stage_layouts(cfg, world, rank, split) for split in QKV_SPLITS}
    momenta = [torch.randn(layouts["qkv"][name].local_shape, generator=gen) for name in hidden]
    report: dict[str, Any] = {"ms": {}, "owner_stages_ms": {}}
    results = {}
    for split in QKV_SPLITS:
        for mode in OUR_MODES:
            plan = build_exchange_plan([layouts[split][name] for name in hidden], tp_size=world, tp_mode=mode,
                                       ns_backend="ns5", ns_steps=NS_STEPS, ns_dtype="fp32")
            dualizer = DistributedDualizer(plan, groups, torch.device("cpu"))
            report["ms"][f"ours {mode} {split}"] = 1e3 * slowest_min(lambda: dualizer(momenta), steps)
            results[(split, mode)] = dualizer(momenta)
            if mode == "owner":
                report["owner_stages_ms"][split] = {k: 1e3 * v for k, v in
                                                    owner_stage_times(dualizer, momenta, steps).items()}
                report.setdefault("plan_balance", {})[split] = plan.balance()
                report.setdefault("owner_ops", {})[split] = _owner_ops(dualizer, momenta)
    report["owner_vs_duplicated_max_abs_diff"] = max(
        float((a - b).abs().max()) for split in QKV_SPLITS
        for a, b in zip(results[(split, "owner")], results[(split, "duplicated")]))
    if with_peer:
        peer = load_peer()
        assert peer is not None
        group = dist.group.WORLD
        dims = [tp_partition_dim(name) for name in hidden]
        for mode in PEER_MODES:
            def peer_step(mode: str = mode) -> list[torch.Tensor]:
                return [peer.newton_schulz_tp(m, steps=NS_STEPS, coefficient_type="simple", tp_group=group,
                                              partition_dim=dim, tp_mode=mode) for m, dim in zip(momenta, dims)]
            report["ms"][f"peer {mode}"] = 1e3 * slowest_min(peer_step, steps)
    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        Path(out).write_text(json.dumps(reports))


def summarize_step(tp: int, reports: list[dict]) -> dict:
    """Times (identical on every rank: max over ranks already), owner stages of the slowest rank, ratios."""
    ms = reports[0]["ms"]
    result: dict[str, Any] = {"tp": tp, "ms": ms, "plan_balance": reports[0]["plan_balance"],
                              "owner_vs_duplicated_max_abs_diff": max(r["owner_vs_duplicated_max_abs_diff"]
                                                                      for r in reports)}
    stages = {}
    for split in QKV_SPLITS:
        per_rank = [r["owner_stages_ms"][split] for r in reports]
        slowest = max(per_rank, key=lambda s: sum(v for k, v in s.items() if k != "all_to_all"))
        stages[split] = {**slowest, "copies": slowest["gather_to_owners"] + slowest["scatter_to_shards"]
                         - slowest.get("all_to_all", 0.0)}
    result["owner_stages_ms"] = stages
    result["owner_ops_by_rank"] = [r["owner_ops"] for r in reports]
    if "peer distributed" in ms:
        result["ratios"] = {f"ours {mode} {split} / peer {peer_mode}": ms[f"ours {mode} {split}"] / ms[f"peer {peer_mode}"]
                            for split in QKV_SPLITS for mode in OUR_MODES for peer_mode in PEER_MODES}
    return result


def single_part(shapes: list[tuple[int, int]], repeats: int, peer: types.ModuleType | None,
                min_sample_s: float = MIN_SAMPLE_S) -> list[dict]:
    """Part 1: time and print the single-matrix table."""
    print(f"single matrix: NS5 {NS_STEPS} steps, fp32, one thread, min of >= {repeats} runs and >= {min_sample_s} s")
    single = single_matrix_times(shapes, repeats, peer, min_sample_s)
    print(format_table(["shape", "ours ms", "peer ms", "ours/peer", "max |diff|"],
                       [("x".join(map(str, r["shape"])), r["ours_ms"], r.get("peer_ms"), r.get("ours_over_peer"),
                         r.get("max_abs_diff")) for r in single]))
    return single


def step_part(cfg: ModelConfig, tps: list[int], steps: int, peer: types.ModuleType | None) -> list[dict]:
    """Part 2: one gloo world per TP size; print times, ratios, the owner step's stages and ops."""
    print(f"optimizer step of the hidden matrices: {describe(cfg)}; NS5 {NS_STEPS} steps fp32; gloo, one "
          f"thread per rank; min of {steps} steps, max over ranks")
    step_results = []
    with tempfile.TemporaryDirectory() as tmp:
        for tp in tps:
            path = str(Path(tmp, f"tp{tp}.json"))
            run_workers(step_worker, tp, cfg, steps, peer is not None, path)
            step_results.append({**summarize_step(tp, json.loads(Path(path).read_text())),
                                 "flop_floor": flop_floors(cfg, tp)})
    names = [f"ours {mode} {split}" for split in QKV_SPLITS for mode in OUR_MODES]
    names += [f"peer {mode}" for mode in PEER_MODES] if peer is not None else []
    print(format_table(["TP", *[f"{n} ms" for n in names]], [(r["tp"], *(r["ms"][n] for n in names))
                                                           for r in step_results]))
    ratio_names = [f"owner {s} / peer {p}" for s in QKV_SPLITS for p in PEER_MODES]
    if peer is not None:
        print("measured time ratios")
        print(format_table(["TP", *ratio_names], [(r["tp"], *(r["ratios"][f"ours {n}"] for n in ratio_names))
                                                  for r in step_results]))
    print("flop floors: the same ratios in NS flops of the busiest rank at perfect balance (equal kernels, free exchange)")
    print(format_table(["TP", *ratio_names], [(r["tp"], *(r["flop_floor"][n] for n in ratio_names))
                                              for r in step_results]))
    print("owner step by stage, slowest rank (ms): copies = gather + scatter - all_to_all")
    print(format_table(["TP", "qkv split", "gather_to_owners", "dualize", "scatter_to_shards", "all_to_all",
                        "copies", "plan max/mean"],
                       [(r["tp"], s, *(r["owner_stages_ms"][s].get(k) for k in
                                       ("gather_to_owners", "dualize", "scatter_to_shards", "all_to_all", "copies")),
                         r["plan_balance"][s]) for r in step_results for s in QKV_SPLITS]))
    for r in step_results:
        for split in QKV_SPLITS:
            ops = max(r["owner_ops_by_rank"], key=lambda ops: sum(o["self_ms"] for o in ops[split]))[split]
            print(f"TP{r['tp']} owner {split}, busiest rank, top aten ops by self CPU time (one step, profiled):")
            print(format_table(["op", "calls", "self ms"], [(o["op"], o["calls"], o["self_ms"]) for o in ops]))
    print("max |owner - duplicated| =", max(r["owner_vs_duplicated_max_abs_diff"] for r in step_results))
    return step_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and shapes, TP2, ours only (the test's mode; runs without the peer)")
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4], help="TP sizes of the step part (one world each)")
    parser.add_argument("--layers", type=int, default=PEER_MODEL.num_layers, help="layers of the step part's model")
    parser.add_argument("--repeats", type=int, default=5, help="single-matrix runs per shape (min is reported)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per implementation (min is reported)")
    parser.add_argument("--only", choices=("single", "step"), default=None,
                        help="run only the single-matrix or the optimizer-step part (default both); "
                             "writes peer_muon_<part>.json instead of peer_muon.json")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    peer = None if args.quick else load_peer()
    if peer is None:
        print(INSTALL)
        if not args.quick:
            return 0
    tiny = PRESETS["tiny"]
    cfg = tiny if args.quick else replace(PEER_MODEL, num_layers=args.layers)
    tps = [2] if args.quick else args.tp
    repeats, steps = (1, 1) if args.quick else (args.repeats, args.steps)
    shapes = spectral_shapes(tiny) if args.quick else ISSUE_SHAPES + [
        s for s in spectral_shapes(QUICKSTART_MODEL) if s not in ISSUE_SHAPES]
    single = single_part(shapes, repeats, peer, 0.0 if args.quick else MIN_SAMPLE_S) \
        if args.only in (None, "single") else None
    steps_result = step_part(cfg, tps, steps, peer) if args.only in (None, "step") else None
    name = "peer_muon" if args.only is None else f"peer_muon_{args.only}"  # a part alone keeps the full record
    path = write_result(name, {"quick": args.quick, "peer": f"emerging-optimizers {PEER_VERSION}"
                                      if peer is not None else None, "model": describe(cfg), "ns_steps": NS_STEPS,
                                      "repeats": repeats, "steps": steps, "single_matrix": single,
                                      "optimizer_step": steps_result}, args.out or RESULTS_DIR)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
