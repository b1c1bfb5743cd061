"""Optimizer step time (Scion owner vs duplicated vs megatron-core Adam), norm-tracker overhead,
and Newton–Schulz backend time by matrix size.

1. Two gloo processes (TP2, one thread each) build a real megatron-core GPTModel (local spec)
   in megatron DDP as the pretraining loop wraps it, and three optimizers on it exactly as
   ``disco-pretrain`` does (``builders.build_optimizer``): Scion
   ``--scion-tp-mode owner``, Scion ``duplicated``, and megatron-core's Adam
   (``get_megatron_optimizer``). Each repeat times, between barriers (so a time is the slowest
   rank's): one forward/backward through megatron's schedule (``get_forward_backward_func``,
   a random batch of the ``disco-pretrain`` default size), then one ``step()`` of each optimizer,
   interleaved. The owner step of each repeat is a norm-logging step:
   ``NormTracker.before_step`` / ``after_step`` (no writers) are timed around it, and those of
   a second tracker with ``--norm-condition-number`` (exact SVD of every matrix on its
   optimizer owner): the difference is the condition numbers' cost. Overhead = tracker time /
   owner step time, and / training step time (forward/backward + owner step); amortised at
   ``--norm-log-interval 10``: /10. ``--only tracker`` times the forward/backward,
   the owner step and the tracker only (no other optimizers, no Newton–Schulz section) and
   writes ``step_tracker.json``.
   The workers also check that the layouts ``comm.py``/``balance.py`` build from shapes equal
   the optimizer's layouts of this real model.
2. One process, one thread: ``orthogonalize`` (5 steps) per backend on Gaussian s×s and s×4s
   matrices; SVD is skipped above ``--svd-max-numel`` elements (minutes on a CPU core).

Medians of ``--repeats``; ratios come from the same run.

    python benchmarks/step.py [--quick] [--preset small|quickstart|...] [--repeats 5] [--only tracker] [--out DIR]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from disco_megatron.runtime.spawn import run_workers
from _common import describe, format_table, median, preset, stage_layouts, write_result
from disco_megatron.config import RunConfig
from disco_megatron.scion_options import NS_BACKENDS, ScionFlags

OPTIMIZERS = ("scion_owner", "scion_duplicated", "adam")
TRACKER_INTERVAL = RunConfig().norm_log_interval
BATCH = RunConfig()  # micro/global batch size of a disco-pretrain training step (DP 1 here)
# Timed per repeat around the owner step: the tracker's two halves, and a second tracker with
# --norm-condition-number (both halves together).
TRACKER_SAMPLES = ("tracker_before", "tracker_after", "tracker_condition")


def _build_optimizers(cfg, ddp, names: tuple[str, ...]) -> dict:
    """The optimizers ``names`` (of ``OPTIMIZERS``) as the pretraining loop builds them for ``--optimizer``."""
    from disco_megatron.builders import build_optimizer

    run_configs = {"scion_owner": RunConfig(model=cfg, scion=ScionFlags(tp_mode="owner")),
                   "scion_duplicated": RunConfig(model=cfg, scion=ScionFlags(tp_mode="duplicated")),
                   "adam": RunConfig(model=cfg, optimizer="adam")}
    return {name: build_optimizer(run_configs[name], [ddp]) for name in names}


def _forward_backward(cfg, ddp):
    """One training step's forward/backward (``BATCH``'s microbatches of random tokens) through
    megatron's schedule, as the pretraining loop runs it; returns a no-argument callable."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from disco_megatron.training.step import make_forward_step

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH.micro_batch_size, cfg.seq_length + 1), generator=gen)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(tokens[:, 1:].shape),
             "position_ids": torch.arange(cfg.seq_length).expand(BATCH.micro_batch_size, -1)}
    schedule = get_forward_backward_func()

    def run() -> None:
        ddp.zero_grad_buffer()
        schedule(forward_step_func=make_forward_step(), data_iterator=itertools.repeat(batch), model=[ddp],
                 num_microbatches=BATCH.num_microbatches(1), seq_length=cfg.seq_length,
                 micro_batch_size=BATCH.micro_batch_size, forward_only=False)

    return run


def step_worker(rank: int, world: int, preset_name: str, repeats: int, out: str, names: tuple[str, ...]) -> None:
    """Time forward/backward, the optimizers ``names`` and the tracker on TP=world; rank 0 writes the samples."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from disco_megatron.builders import group_lrs
    from disco_megatron.models import build_gpt_model, wrap_ddp
    from disco_megatron.models.sharding import global_param_name
    from disco_megatron.norms import NormTracker
    from disco_megatron.norms.owners import optimizer_svd_owners
    from disco_megatron.norms.steps import optimizer_step_source
    from disco_megatron.runtime import destroy_parallel, initialize_parallel

    def timed(fn) -> float:
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - start

    info = initialize_parallel(world, 1)
    try:
        cfg = preset(preset_name)
        model = build_gpt_model(cfg)
        (ddp,) = wrap_ddp([model])
        forward_backward = _forward_backward(cfg, ddp)
        forward_backward()
        opts = _build_optimizers(cfg, ddp, names)
        layouts_match = set(opts["scion_owner"].optimizer.layouts) == \
            set(stage_layouts(cfg, world, info.tp_rank).values())
        named = [(global_param_name(n, info.pp_rank, cfg.num_layers, info.pp), p) for n, p in model.named_parameters()]
        owner = opts["scion_owner"]
        trackers = [NormTracker(named, 1, ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
                                info.dp_rank, info.pp_rank, info.pp, writers=[], model_cfg=model.config,
                                step_source=optimizer_step_source(owner, [p for _, p in named]),
                                with_condition=with_condition, svd_owners=optimizer_svd_owners(owner, named))
                    for with_condition in (False, True)]
        samples: dict[str, list[float]] = {k: [] for k in (*names, "fwd_bwd", *TRACKER_SAMPLES)}

        def logging_step(step: int) -> tuple[float, ...]:
            """(before, before with condition numbers, owner step, after, after with condition numbers)."""
            order = trackers if step % 2 else trackers[::-1]  # alternate: neither always runs first
            befores = {id(t): timed(lambda t=t: t.before_step(step)) for t in order}
            stepped = timed(owner.step)
            afters = {id(t): timed(lambda t=t: t.after_step(step, tokens=0, loss=None, lrs=group_lrs(owner)))
                      for t in order}
            return *(befores[id(t)] for t in trackers), stepped, *(afters[id(t)] for t in trackers)

        cold = logging_step(0)  # also the owner's first step (momentum allocation)
        for name in names[1:]:
            opts[name].step()
        for rep in range(1, repeats + 1):
            samples["fwd_bwd"].append(timed(forward_backward))
            before, cond_before, stepped, after, cond_after = logging_step(rep)
            samples["tracker_before"].append(before)
            samples["scion_owner"].append(stepped)
            samples["tracker_after"].append(after)
            samples["tracker_condition"].append(cond_before + cond_after)
            for name in names[1:]:
                samples[name].append(timed(opts[name].step))
        report = {"samples": samples, "tracker_cold_s": cold[0] + cold[3], "layouts_match_model": layouts_match,
                  "params_per_rank": sum(p.numel() for p in model.parameters()),
                  "adam_class": None if "adam" not in opts else " + ".join(
                      f"{type(o).__name__}({type(o.optimizer).__name__})"
                      for o in getattr(opts["adam"], "chained_optimizers", [opts["adam"]]))}
        checks = [None] * world
        dist.all_gather_object(checks, layouts_match)
        report["layouts_match_model"] = all(checks)
        if rank == 0:
            Path(out).write_text(json.dumps(report))
    finally:
        destroy_parallel()


def ns_times(sizes: list[int], repeats: int, svd_max_numel: int) -> list[dict]:
    """Median seconds of ``orthogonalize`` per backend for s×s and s×4s Gaussian matrices."""
    import torch

    from disco_megatron.optim.newton_schulz import orthogonalize

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for m, n in [(s, s) for s in sizes] + [(s, 4 * s) for s in sizes]:
        G = torch.randn(m, n, generator=gen)
        backends = [b for b in NS_BACKENDS if b != "svd" or m * n <= svd_max_numel]
        times: dict[str, list[float]] = {b: [] for b in backends}
        for _ in range(repeats):  # backends interleaved: a load spike hits all of them alike
            for backend in backends:
                start = time.perf_counter()
                orthogonalize(G, backend, steps=5)
                times[backend].append(time.perf_counter() - start)
        rows.append({"shape": [m, n], **{b: median(times[b]) if b in times else None for b in NS_BACKENDS}})
    return rows


def summarize(report: dict) -> dict:
    """Medians, ratios and tracker overhead from the worker's samples (ratios of the optimizers timed)."""
    med = {k: median(v) for k, v in report["samples"].items()}
    tracker = med["tracker_before"] + med["tracker_after"]
    condition = med["tracker_condition"]
    train_step = med["fwd_bwd"] + med["scion_owner"]
    overhead = 100 * tracker / med["scion_owner"]
    of_train = 100 * tracker / train_step
    ratios = {f"owner_over_{k.removeprefix('scion_')}": med["scion_owner"] / med[k] for k in OPTIMIZERS[1:] if k in med}
    return {"median_s": {k: med[k] for k in OPTIMIZERS if k in med}, **ratios,
            "train_step_s": {"fwd_bwd": med["fwd_bwd"], "scion_owner": med["scion_owner"], "total": train_step,
                             "micro_batch_size": BATCH.micro_batch_size,
                             "num_microbatches": BATCH.num_microbatches(1)},
            "tracker": {"before_s": med["tracker_before"], "after_s": med["tracker_after"], "total_s": tracker,
                        "cold_s": report["tracker_cold_s"], "overhead_pct_of_owner_step": overhead,
                        f"amortised_pct_interval{TRACKER_INTERVAL}": overhead / TRACKER_INTERVAL,
                        "overhead_pct_of_train_step": of_train, "with_condition_s": condition,
                        "condition_number_extra_s": condition - tracker,
                        "condition_number_extra_pct_of_train_step": 100 * (condition - tracker) / train_step,
                        f"amortised_pct_of_train_step_interval{TRACKER_INTERVAL}": of_train / TRACKER_INTERVAL},
            "samples": report["samples"], "adam": report["adam_class"],
            "params_per_rank": report["params_per_rank"], "layouts_match_model": report["layouts_match_model"]}


def tracker_table(result: dict) -> str:
    """The tracker's times against the owner step and the training step (forward/backward + owner step)."""
    t, owner, train = result["tracker"], result["median_s"]["scion_owner"], result["train_step_s"]["total"]
    row = lambda label, s: (label, 1e3 * s, 100 * s / owner, 100 * s / train)  # noqa: E731
    return format_table(["norm tracker", "ms", "% of owner step", "% of train step"],
                        [row("before_step", t["before_s"]), row("after_step", t["after_s"]),
                         row("logging step (warm)", t["total_s"]), row("first logging step (cold)", t["cold_s"]),
                         row(f"amortised, interval {TRACKER_INTERVAL}", t["total_s"] / TRACKER_INTERVAL),
                         row("logging step, --norm-condition-number", t["with_condition_s"]),
                         row("  condition numbers' extra", t["condition_number_extra_s"])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 repeat, small matrices (the test's mode)")
    parser.add_argument("--preset", default=None, help="model preset (default small; --quick: tiny)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size (processes)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; --quick: 1)")
    parser.add_argument("--ns-sizes", type=int, nargs="+", default=None,
                        help="Newton–Schulz matrix sizes s (s×s and s×4s; default 256 512 1024 2048)")
    parser.add_argument("--svd-max-numel", type=int, default=2**22, help="skip SVD above this many elements")
    parser.add_argument("--only", choices=("tracker",), default=None,
                        help="tracker: time forward/backward, the owner step and the norm tracker only")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    name = args.preset or ("tiny" if args.quick else "small")
    cfg = preset(name)
    repeats = args.repeats or (1 if args.quick else 5)
    sizes = args.ns_sizes or ([32, 64] if args.quick else [256, 512, 1024, 2048])
    if repeats < 1 or args.tp < 1:
        sys.exit(f"--repeats {repeats} and --tp {args.tp} must be >= 1")
    names = OPTIMIZERS[:1] if args.only == "tracker" else OPTIMIZERS
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "step.json")
        run_workers(step_worker, args.tp, name, repeats, str(path), names)
        result = summarize(json.loads(path.read_text()))
    train = result["train_step_s"]
    header = (f"{name}: {describe(cfg)}; TP{args.tp} gloo, 1 thread/rank, fp32; {repeats} repeats (medians); "
              f"training step = forward/backward ({train['num_microbatches']} x {train['micro_batch_size']} x "
              f"{cfg.seq_length} tokens) {1e3 * train['fwd_bwd']:.1f} ms + owner step "
              f"{1e3 * train['scion_owner']:.1f} ms = {1e3 * train['total']:.1f} ms")
    settings = {"quick": args.quick, "preset": name, "model": describe(cfg), "tp": args.tp, "repeats": repeats,
                "threads_per_rank": 1, "dtype": "float32"}
    if args.only == "tracker":
        print(header)
        print(tracker_table(result))
        path = write_result("step_tracker", {**settings, "optimizer_step": result}, *([args.out] if args.out else []))
        print(f"wrote {path}")
        return 0
    ns_rows = ns_times(sizes, max(1, min(repeats, 3)), args.svd_max_numel)

    print(f"{header}; Adam = megatron-core {result['adam']}")
    med = result["median_s"]
    samples = result["samples"]
    print(format_table(["optimizer", "median ms", "min ms", "max ms", "/ scion_owner"],
                       [(k, 1e3 * med[k], 1e3 * min(samples[k]), 1e3 * max(samples[k]), med[k] / med["scion_owner"])
                        for k in OPTIMIZERS]))
    print(f"owner/duplicated {result['owner_over_duplicated']:.3f}  owner/adam {result['owner_over_adam']:.3f}")
    print(tracker_table(result))
    print("Newton–Schulz backends, 5 steps, fp32, 1 thread (ms; svd '-' = skipped)")
    ratio = lambda a, b: None if a is None or b is None else a / b  # noqa: E731
    print(format_table(["shape", "ns5", "polar_express", "svd", "pe/ns5", "svd/ns5"],
                       [("x".join(map(str, r["shape"])), 1e3 * r["ns5"], 1e3 * r["polar_express"],
                         None if r["svd"] is None else 1e3 * r["svd"], ratio(r["polar_express"], r["ns5"]),
                         ratio(r["svd"], r["ns5"])) for r in ns_rows]))
    assert all(math.isfinite(v) for v in med.values())
    path = write_result("step", {**settings, "optimizer_step": result, "newton_schulz": ns_rows},
                        *([args.out] if args.out else []))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
