"""A megatron-named GQA + SwiGLU model from shapes alone, its shards, and Scion runs on it.

Shared by the distributed-Scion tests: the reference ``Scion`` on the full (TP1/PP1) tensors and
``DistributedScion`` on one rank's TP/PP shards, both configured from a :class:`ScionFlags`, with
parameters and gradients drawn from fixed seeds so every rank (and the reference) sees the same
model without communicating.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from disco_megatron.models.naming import tp_partition_dim
from disco_megatron.models.sharding import local_param_name, shard_full_tensor
from disco_megatron.optim.distributed import DistributedScion, StageGroups, StepResult
from disco_megatron.optim.layout import ParamLayout, build_layout, reference_row_splits
from disco_megatron.optim.scion import Scion
from disco_megatron.scion_options import ScionFlags

CFG = SimpleNamespace(hidden_size=64, num_attention_heads=8, num_query_groups=4, kv_channels=8,
                      ffn_hidden_size=96, gated_linear_unit=True, num_layers=2, vocab_size=128)
# Distinct per-group lr and radius, so a parameter stepped with another group's would show.
LR = {"embedding": 0.05, "hidden": 0.02, "output": 0.03, "gains": 0.01}
RADIUS = {"embedding": 2.0, "hidden": 1.0, "output": 3.0, "gains": 0.5}


def full_shapes(cfg: SimpleNamespace = CFG) -> dict[str, tuple[int, ...]]:
    """TP1/PP1 megatron parameter names and shapes (local spec, biases on QKV and fc1)."""
    h, kv, f = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * kv
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (cfg.vocab_size, h)}
    for layer in range(cfg.num_layers):
        p = f"decoder.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attention.linear_qkv.weight": (qkv_rows, h),
            p + "self_attention.linear_qkv.bias": (qkv_rows,),
            p + "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * kv),
            p + "pre_mlp_layernorm.weight": (h,),
            p + "mlp.linear_fc1.weight": (2 * f, h),
            p + "mlp.linear_fc1.bias": (2 * f,),
            p + "mlp.linear_fc2.weight": (h, f),
        }
    return shapes | {"decoder.final_layernorm.weight": (h,), "output_layer.weight": (cfg.vocab_size, h)}


def full_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in full_shapes().items()}


def stage_names(pp_rank: int, pp: int) -> dict[str, str]:
    """Global name -> stage-local name of the parameters on pipeline stage ``pp_rank``."""
    out = {}
    for name in full_shapes():
        stage, local = local_param_name(name, CFG.num_layers, pp)
        if stage is None:
            stage = 0 if name.startswith("embedding.") else pp - 1
        if stage == pp_rank:
            out[name] = local
    return out


def optimizer_options(flags: ScionFlags) -> dict[str, object]:
    """The settings of ``flags`` that both optimizers take as keyword arguments."""
    return dict(momentum=flags.momentum, constrained=flags.constrained, weight_decay=flags.weight_decay,
                ns_backend=flags.ns_backend, ns_steps=flags.ns_steps)


def reference_run(flags: ScionFlags, steps: int, grad_scales: list[float] | None = None) -> list[dict[str, torch.Tensor]]:
    """Full-model reference Scion: the parameters after each step (index 0: initial); step s's
    gradients are multiplied by ``grad_scales[s]`` when given."""
    params = {n: t.clone() for n, t in full_tensors(0).items()}
    groups: dict[tuple[str, str], list[torch.Tensor]] = {}
    row_splits = {}
    for name, p in params.items():
        layout = build_layout(name, p.shape, CFG, qkv_split=flags.qkv_split, output_lmo=flags.output_lmo)
        groups.setdefault((layout.lr_group, layout.lmo), []).append(p)
        splits = reference_row_splits(layout)
        if splits is not None:
            row_splits[p] = splits
    opt = Scion([{"params": ps, "lr": LR[g], "radius": RADIUS[g], "lmo": lmo} for (g, lmo), ps in groups.items()],
                row_splits=row_splits, **optimizer_options(flags))
    history = [{n: p.clone() for n, p in params.items()}]
    for step in range(steps):
        grads = full_tensors(100 + step)
        for name, p in params.items():
            p.grad = grads[name] if grad_scales is None else grads[name] * grad_scales[step]
        opt.step()
        history.append({n: p.clone() for n, p in params.items()})
    return history


class ShardedRun:
    """This rank's TP/PP shards of the model, stepped by ``DistributedScion`` configured by ``flags``."""

    def __init__(self, groups: StageGroups, tp: int, tp_rank: int, pp: int, pp_rank: int,
                 flags: ScionFlags, clip_grad: float = 0.0, device: torch.device | str = "cpu") -> None:
        self.tp, self.tp_rank, self.device = tp, tp_rank, torch.device(device)
        self.names = stage_names(pp_rank, pp)
        full = full_tensors(0)
        self.params = {g: self.shard(g, full[g]) for g in self.names}
        self.layouts: dict[torch.Tensor, ParamLayout] = {
            self.params[g]: build_layout(local, self.params[g].shape, CFG, tp_size=tp, tp_rank=tp_rank,
                                         qkv_split=flags.qkv_split, output_lmo=flags.output_lmo)
            for g, local in self.names.items()}
        by_group: dict[str, list[torch.Tensor]] = {}
        for p, layout in self.layouts.items():
            by_group.setdefault(layout.lr_group, []).append(p)
        self.opt = DistributedScion(
            [{"params": ps, "lr": LR[g], "radius": RADIUS[g]} for g, ps in by_group.items()], self.layouts, groups,
            tp_mode=flags.tp_mode, dp_mode=flags.dp_mode, clip_grad=clip_grad, ns_dtype=flags.ns_dtype,
            **optimizer_options(flags))

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a full (CPU) tensor, on the run's device."""
        return shard_full_tensor(name, full, self.tp_rank, self.tp, tp_partition_dim(name), True).to(self.device)

    def set_grads(self, step: int) -> None:
        grads = full_tensors(100 + step)
        for g, p in self.params.items():
            p.grad = self.shard(g, grads[g])

    def step(self, step: int) -> StepResult:
        self.set_grads(step)
        return self.opt.step()

    def change_errors(self, start: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
        """Relative error of this rank's parameter change since ``start`` vs the reference's change
        to ``after``, per name (the change, not the weights: a wrong direction cannot hide behind
        large weights)."""
        errors = {}
        for g, p in self.params.items():
            want = self.shard(g, after[g] - start[g])
            errors[g] = float((p - self.shard(g, start[g]) - want).norm() / want.norm())
        return errors


def full_grad_norm(step: int) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in full_tensors(100 + step).values()))
