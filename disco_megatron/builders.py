"""Optimizer and lr scheduler for a run: Scion (ours) or megatron-core's Adam baseline.

Built from the run's RunConfig for the trainer and for the checkpoint converter's reshard,
which must rebuild exactly what training built for the optimizer state to fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from disco_megatron.config import RunConfig
from disco_megatron.models import build_gpt_model, wrap_ddp
from disco_megatron.models.init import initialize_weights


@dataclass
class Trainable:
    """This rank's model chunks (one per stage, or ``--virtual-pipeline-model-parallel-size`` under the
    interleaved schedule), their DDP wrappers the schedules run, the optimizer and the lr scheduler."""

    model: list
    ddp: list
    optimizer: Any
    scheduler: Any


def build_trainable(cfg: RunConfig) -> Trainable:
    """Model chunks (``--init-method``'s weights, before DDP and the optimizer copy them), DDP, optimizer
    and scheduler of ``cfg`` (megatron parallel_state initialised)."""
    vp_stages = range(cfg.virtual_pipeline_model_parallel_size) if cfg.virtual_pipeline_model_parallel_size else [None]
    model = [build_gpt_model(cfg.model, sequence_parallel=cfg.sequence_parallel, vp_stage=v) for v in vp_stages]
    for vp_stage, chunk in enumerate(model):
        initialize_weights(chunk, cfg.model, method=cfg.init_method, seed=cfg.seed, output_lmo=cfg.scion.output_lmo,
                           vp_stage=vp_stage, vp_size=len(model))
    ddp = wrap_ddp(model, overlap_grad_reduce=cfg.overlap_grad_reduce)
    optimizer = build_optimizer(cfg, ddp)
    return Trainable(model, ddp, optimizer, build_scheduler(cfg, optimizer))


def build_optimizer(cfg: RunConfig, model_chunks: list):
    """A ``MegatronOptimizer`` for ``--optimizer``: distributed Scion or megatron-core Adam.

    Either way ``step()`` returns ``(False, None, None)`` on every rank when some gradient is
    non-finite, and the caller skips the step on that answer alone.
    """
    if cfg.optimizer == "scion":
        from disco_megatron.optim.config import scion_config_from_flags
        from disco_megatron.optim.megatron import get_scion_optimizer

        config = scion_config_from_flags(cfg.scion, cfg.lr, cfg.min_lr, bf16=cfg.model.bf16, clip_grad=cfg.clip_grad)
        return get_scion_optimizer(config, model_chunks)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=cfg.model.bf16,
        params_dtype=torch.bfloat16 if cfg.model.bf16 else torch.float32,
    )
    return _skip_non_finite(get_megatron_optimizer(config, model_chunks))


def _skip_non_finite(optimizer):
    """Make megatron's Adam skip a step whose gradients are not all finite, as Scion does.

    megatron-core's fp32 optimizer (and bf16 without a loss scale) never checks its gradients.
    ``prepare_grads`` is where megatron's ``step()`` asks whether inf/nan was found, so this
    instance's is extended by one all-reduce (MAX) over the optimizer's grad-stats group (TP x PP:
    DP replicas hold the same, already reduced, gradients).
    """
    prepare = optimizer.prepare_grads

    def prepare_and_check() -> bool:
        found_inf = prepare()  # copies main_grad into the grads the optimizer steps with
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        found = torch.tensor([float(found_inf)], device=grads[0].device if grads else None)
        if grads:
            found += torch.stack([torch.isfinite(g).logical_not().any() for g in grads]).any()
        torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX,
                                     group=optimizer.get_grad_stats_parallel_group())
        return found.item() > 0

    optimizer.prepare_grads = prepare_and_check
    return optimizer


def build_scheduler(cfg: RunConfig, optimizer):
    """megatron-core's OptimizerParamScheduler, counted in samples like Megatron-LM."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_iters = cfg.lr_decay_iters or cfg.train_iters
    weight_decay = cfg.scion.weight_decay if cfg.optimizer == "scion" else cfg.weight_decay
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters * cfg.global_batch_size,
        lr_decay_steps=decay_iters * cfg.global_batch_size,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=cfg.train_iters * cfg.global_batch_size,
        wd_incr_style="constant",
        wsd_decay_steps=(decay_iters * cfg.global_batch_size) // 10 if cfg.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if cfg.lr_decay_style == "WSD" else None,
    )


def group_lrs(optimizer) -> dict[str, float]:
    """Current lr per named param group (Scion: embedding/hidden/output/gains; Adam: one per group)."""
    lrs: dict[str, float] = {}
    for index, group in enumerate(optimizer.param_groups):
        lrs.setdefault(group.get("name") or f"group{index}", float(group["lr"]))
    return lrs
