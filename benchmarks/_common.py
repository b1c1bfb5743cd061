"""Shared by the benchmarks: model presets, the optimizer's matrix list, tables, results.

The benchmarks build the optimizer's view of a model from shapes alone (megatron parameter
names from :func:`~disco_megatron.checkpoint.hf_llama.megatron_shapes`, layouts from
:func:`~disco_megatron.optim.layout.build_layout`), so the 12- and 24-layer models need no
model instance. Results go to ``benchmarks/results/<name>.json`` with the date and hardware,
because every number here depends on the machine it was measured on.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from disco_megatron.checkpoint.hf_llama import megatron_shapes
from disco_megatron.config import ModelConfig
from disco_megatron.models.naming import tp_partition_dim
from disco_megatron.optim.layout import ParamLayout, build_layout, needs_whole
from disco_megatron.optim.plan import ExchangePlan, build_exchange_plan
from disco_megatron.scion_options import DEFAULTS

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Llama-style GPTs (RMSNorm, SwiGLU, RoPE, GQA, untied output, no biases), as ModelConfig.
PRESETS: dict[str, ModelConfig] = {
    "gpt12": ModelConfig(num_layers=12, hidden_size=768, num_attention_heads=12, num_query_groups=4,
                         ffn_hidden_size=2048, vocab_size=32000, seq_length=1024),
    "gpt24": ModelConfig(num_layers=24, hidden_size=768, num_attention_heads=12, num_query_groups=4,
                         ffn_hidden_size=2048, vocab_size=32000, seq_length=1024),
    "small": ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                         ffn_hidden_size=704, vocab_size=8192, seq_length=128),
    # examples/quickstart.sh's model.
    "quickstart": ModelConfig(num_layers=4, hidden_size=192, num_attention_heads=4, num_query_groups=2,
                              ffn_hidden_size=512, vocab_size=4096, seq_length=128),
    "tiny": ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                        ffn_hidden_size=128, vocab_size=256, seq_length=32),
}
# The optimizer's defaults as the CLI (disco-pretrain) sets them.
QKV_SPLIT = DEFAULTS.qkv_split
OUTPUT_LMO = DEFAULTS.output_lmo


def describe(cfg: ModelConfig) -> str:
    """One line naming the model shape, e.g. ``12-layer GQA SwiGLU h768 heads12 groups4 ffn2048``."""
    kind = "GQA" if cfg.query_groups < cfg.num_attention_heads else "MHA"
    mlp = "SwiGLU" if cfg.swiglu else "GeLU"
    return (f"{cfg.num_layers}-layer {kind} {mlp} h{cfg.hidden_size} heads{cfg.num_attention_heads} "
            f"groups{cfg.query_groups} ffn{cfg.ffn_size} vocab{cfg.vocab_size}")


def preset(name: str) -> ModelConfig:
    """The preset ``name``; an unknown name exits with the list of presets."""
    if name not in PRESETS:
        sys.exit(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def model_shape(cfg: ModelConfig) -> SimpleNamespace:
    """The ``ModelShape`` fields ``build_layout`` reads, as ``models.gpt.transformer_config`` sets
    them (without importing megatron-core: seconds per process; ``step.py`` checks the layouts
    against a real GPTModel's)."""
    return SimpleNamespace(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                           num_query_groups=cfg.query_groups, kv_channels=cfg.hidden_size // cfg.num_attention_heads,
                           ffn_hidden_size=cfg.ffn_size, gated_linear_unit=cfg.swiglu)


def stage_layouts(cfg: ModelConfig, tp: int, tp_rank: int, qkv_split: str = QKV_SPLIT
                  ) -> dict[str, ParamLayout]:
    """Layouts of every parameter shard of TP rank ``tp_rank`` (PP1), as the optimizer builds them
    (vocab padded to ``--make-vocab-size-divisible-by`` × TP, as megatron pads it)."""
    cfg.validate(tp, 1)
    padded = replace(cfg, vocab_size=cfg.padded_vocab_size(tp))
    shape = model_shape(padded)
    layouts = {}
    for name, full in megatron_shapes(padded).items():
        local = list(full)
        dim = tp_partition_dim(name)
        if dim is not None:
            local[dim] //= tp
        layouts[name] = build_layout(name, tuple(local), shape, tp_size=tp, tp_rank=tp_rank,
                                     qkv_split=qkv_split, output_lmo=OUTPUT_LMO)
    return layouts


def stage_plan(cfg: ModelConfig, tp: int, dp: int, qkv_split: str = QKV_SPLIT) -> ExchangePlan:
    """The optimizer's exchange plan of TP rank 0 (PP1) at TP×DP, owner mode; DP > 1 shards the
    owners over TP×DP (``--scion-dp-mode sharded``). Every rank of the stage builds the same buckets."""
    layouts = list(stage_layouts(cfg, tp, 0, qkv_split).values())
    return build_exchange_plan(layouts, tp_size=tp, dp_size=dp, dp_mode="sharded" if dp > 1 else "replicated")


def whole_matrix_bytes(layouts: Iterable[ParamLayout], itemsize: int = 4) -> int:
    """Full bytes of the matrices that must be whole: the theory's "matrix bytes" of a TP group."""
    return sum(itemsize * math.prod(m.shape) for layout in layouts for m in layout.matrices
               if needs_whole(m, layout.lmo))


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table: floats to 4 significant digits, columns right-aligned."""
    cells = [[f"{v:#.4g}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in row]
             for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def hardware() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def write_result(name: str, payload: dict[str, Any], out_dir: Path | str = RESULTS_DIR) -> Path:
    """Write ``<out_dir>/<name>.json`` with the date, hardware and command line added."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    record = {"benchmark": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "hardware": hardware(), "command": " ".join(sys.argv), **payload}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def interleaved_min(fns: dict[str, Callable[[], Any]], steps: int) -> dict[str, float]:
    """Seconds per name: min over ``steps`` rounds (after one warm-up round) of each ``fns[name]()``
    timed between barriers, the rounds interleaving the names (load changes hit all alike); max over ranks."""
    import torch.distributed as dist

    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(steps + 1):
        for name, fn in fns.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            dist.barrier()
            if round_:
                times[name].append(time.perf_counter() - start)
    slowest = torch.tensor([min(t) for t in times.values()], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return dict(zip(fns, slowest.tolist()))


def slowest_min(fn: Callable[[], Any], steps: int) -> float:
    """min over ``steps`` runs (after one warm-up) of the time between barriers, max over ranks."""
    return interleaved_min({"fn": fn}, steps)["fn"]


class StageClock:
    """Wall time per named stage of one rank's owner step, summed per call of the step."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
        return timed


def owner_stage_times(dualizer: Any, momenta: list[torch.Tensor], steps: int) -> dict[str, float]:
    """Seconds per stage of this rank's fastest sequential owner step of ``steps``: gather_to_owners,
    dualize, scatter_to_shards, and the all_to_all calls inside gather + scatter."""
    from disco_megatron.optim import distributed

    # the sequential step's stage methods (each synchronous: its whole cost lies in its call) -> stage name
    stages = {"start_gather": "gather_to_owners", "dualize": "dualize", "start_scatter": "scatter_to_shards"}
    stage_names = tuple(stages.values())
    best: dict[str, float] = {}
    real_all_to_all = distributed.comm.all_to_all_single
    overlap, dualizer.overlap = dualizer.overlap, False
    try:
        for _ in range(steps):
            clock = StageClock()
            for method, name in stages.items():
                setattr(dualizer, method, clock.wrap(name, getattr(type(dualizer), method).__get__(dualizer)))
            distributed.comm.all_to_all_single = clock.wrap("all_to_all", real_all_to_all)
            dualizer(momenta)
            if not best or sum(clock.totals[n] for n in stage_names) < sum(best[n] for n in stage_names):
                best = clock.totals
    finally:
        distributed.comm.all_to_all_single = real_all_to_all
        dualizer.overlap = overlap
        for method in stages:
            dualizer.__dict__.pop(method, None)
    return best
