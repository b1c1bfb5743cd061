"""Optimizer and lr scheduler for a run: Scion (ours) or megatron-core's Adam baseline."""
from __future__ import annotations

import torch

from disco_megatron.config import RunConfig


def build_optimizer(cfg: RunConfig, model_chunks: list):
    """A ``MegatronOptimizer`` for ``--optimizer``: distributed Scion or megatron-core Adam."""
    if cfg.optimizer == "scion":
        from disco_megatron.optim.config import scion_config_from_flags
        from disco_megatron.optim.megatron import get_scion_optimizer

        config = scion_config_from_flags(cfg.scion, cfg.lr, cfg.min_lr, bf16=cfg.model.bf16)
        return get_scion_optimizer(config, model_chunks)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=cfg.model.bf16,
        params_dtype=torch.bfloat16 if cfg.model.bf16 else torch.float32,
    )
    return get_megatron_optimizer(config, model_chunks)


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
