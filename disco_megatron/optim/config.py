"""ScionConfig: megatron's OptimizerConfig plus the Scion knobs (field = CLI flag name).

It subclasses ``OptimizerConfig`` so megatron's wrapper code and ``OptimizerParamScheduler``
read the fields they expect (``lr``, ``min_lr``, ``weight_decay``, ``bf16``, ``timers``...).
``lr`` / ``min_lr`` are the hidden-layer (attention + mlp) learning rates; the embedding,
output and gains groups have their own peak lr (gains default to the hidden lr) and share
the hidden min/peak ratio, so one megatron schedule drives all four. Radii likewise (gains
default to the hidden radius). Weight decay is decoupled and, as in megatron, not applied to
1-D gains and biases (their ``wd_mult`` is 0). ``clip_grad`` > 0 clips the global grad norm
before the momentum update (off by default); ``use_distributed_optimizer`` selects Scion's own
DP-sharded mode (``scion_dp_mode = "sharded"``) and is then cleared, so no megatron code treats
Scion as megatron's DistributedOptimizer.
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from megatron.core.optimizer.optimizer_config import OptimizerConfig

from disco_megatron import scion_options
from disco_megatron.scion_options import CLIP_GRAD_DEFAULT, DEFAULTS, ScionFlags, dp_mode_for

logger = logging.getLogger(__name__)


@dataclass
class ScionConfig(OptimizerConfig):
    """Scion hyper-parameters and parallel modes; see the module docstring for the groups."""

    optimizer: str = "scion"
    clip_grad: float = CLIP_GRAD_DEFAULT
    weight_decay: float = 0.0
    scion_lr_embedding: Optional[float] = None
    scion_lr_output: Optional[float] = None
    scion_lr_gains: Optional[float] = None
    scion_momentum: float = DEFAULTS.momentum
    scion_radius_embedding: float = DEFAULTS.radius_embedding
    scion_radius_hidden: float = DEFAULTS.radius_hidden
    scion_radius_output: float = DEFAULTS.radius_output
    scion_radius_gains: Optional[float] = None
    scion_constrained: bool = DEFAULTS.constrained
    scion_ns_backend: str = DEFAULTS.ns_backend
    scion_ns_steps: int = DEFAULTS.ns_steps
    scion_ns_dtype: Optional[str] = DEFAULTS.ns_dtype
    scion_tp_mode: str = DEFAULTS.tp_mode
    scion_dp_mode: str = DEFAULTS.dp_mode
    scion_qkv_split: str = DEFAULTS.qkv_split
    scion_output_lmo: str = DEFAULTS.output_lmo

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scion_dp_mode = scion_options.dp_mode_for(self.scion_dp_mode, self.use_distributed_optimizer)
        self.use_distributed_optimizer = False
        self.validate()

    def validate(self) -> None:
        """Raise one ValueError naming the flag and the fix for the first bad setting.

        The Scion settings go through ``scion_options.validate`` (as the CLI's do); then what only a
        megatron optimizer config has: the gains group, clipping, fp16.
        """
        if self.lr is None:
            raise ValueError("--lr (the hidden-layer Scion learning rate) is required")
        scion_options.validate(self.as_flags())
        for name, value in (("lr", self.scion_lr_gains), ("radius", self.scion_radius_gains)):
            if value is not None and not 0 <= value < math.inf:
                raise ValueError(f"scion_{name}_gains {value}: must be a finite number >= 0 (or None: the "
                                 "hidden group's)")
        scion_options.check_clip_grad(self.clip_grad)
        if self.fp16:
            raise ValueError("Scion supports fp32 and --bf16 (fp32 master weights); --fp16 needs "
                             "loss scaling, which it does not implement: use --bf16")

    def as_flags(self) -> ScionFlags:
        """The Scion settings as the flags name them (``lr`` is the hidden lr, ``weight_decay`` Scion's)."""
        return ScionFlags(
            lr_embedding=self.scion_lr_embedding, lr_hidden=self.lr, lr_output=self.scion_lr_output,
            momentum=self.scion_momentum, radius_embedding=self.scion_radius_embedding,
            radius_hidden=self.scion_radius_hidden, radius_output=self.scion_radius_output,
            constrained=self.scion_constrained, weight_decay=self.weight_decay, ns_backend=self.scion_ns_backend,
            ns_steps=self.scion_ns_steps, ns_dtype=self.scion_ns_dtype, tp_mode=self.scion_tp_mode, dp_mode=self.scion_dp_mode,
            qkv_split=self.scion_qkv_split, output_lmo=self.scion_output_lmo)

    def group_lr(self, group: str) -> float:
        """Peak lr of an lr group (embedding, hidden, output, gains)."""
        value = {"embedding": self.scion_lr_embedding, "output": self.scion_lr_output,
                 "gains": self.scion_lr_gains}.get(group)
        return float(self.lr if value is None else value)

    def group_min_lr(self, group: str) -> float:
        """Min lr of an lr group: the hidden min/peak ratio applied to the group's peak lr."""
        if not self.lr or not self.min_lr:
            return 0.0
        return self.group_lr(group) * self.min_lr / self.lr

    def group_radius(self, group: str) -> float:
        value = {"embedding": self.scion_radius_embedding, "hidden": self.scion_radius_hidden,
                 "output": self.scion_radius_output, "gains": self.scion_radius_gains}[group]
        return float(self.scion_radius_hidden if value is None else value)


def scion_config_from_flags(flags: ScionFlags, lr: float, min_lr: float = 0.0, bf16: bool = False,
                            clip_grad: float = CLIP_GRAD_DEFAULT) -> ScionConfig:
    """ScionConfig from ``ScionFlags`` (the CLI's or the Megatron-LM plug-in's), ``--lr``/``--min-lr``
    and ``--clip-grad``.

    Every ``--scion-lr-*`` defaults to ``--lr``; gains follow the hidden lr and radius. The
    hidden group's min lr keeps the ``--min-lr``/``--lr`` ratio (so does every group).
    """
    hidden_lr = flags.lr_hidden if flags.lr_hidden is not None else lr
    return ScionConfig(
        lr=hidden_lr, min_lr=min_lr * hidden_lr / lr if lr else 0.0,
        scion_lr_embedding=flags.lr_embedding if flags.lr_embedding is not None else lr,
        scion_lr_output=flags.lr_output if flags.lr_output is not None else lr,
        scion_momentum=flags.momentum, scion_radius_embedding=flags.radius_embedding,
        scion_radius_hidden=flags.radius_hidden, scion_radius_output=flags.radius_output,
        scion_constrained=flags.constrained, weight_decay=flags.weight_decay,
        scion_ns_backend=flags.ns_backend, scion_ns_steps=flags.ns_steps, scion_ns_dtype=flags.ns_dtype,
        scion_tp_mode=flags.tp_mode, scion_dp_mode=flags.dp_mode, scion_qkv_split=flags.qkv_split,
        scion_output_lmo=flags.output_lmo, bf16=bf16, clip_grad=clip_grad,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


def scion_config_from_args(args: argparse.Namespace) -> ScionConfig:
    """A validated ``ScionConfig`` from Megatron-LM's parsed arguments (with the plug-in's Scion flags).

    Used by the Megatron-LM plug-in to build the optimizer and by the checkpoint converter to
    rebuild it from a saved run's ``args``. ``--use-distributed-optimizer`` selects Scion's
    DP-sharded mode; ``--clip-grad`` clips before the momentum update, as megatron-core clips.
    """
    flags = scion_options.flags_from_values(vars(args), "scion_", lr_given=args.lr is not None)
    flags.dp_mode = dp_mode_for(flags.dp_mode, getattr(args, "use_distributed_optimizer", False))
    config = scion_config_from_flags(flags, args.lr, args.min_lr or 0.0, bf16=args.bf16,
                                     clip_grad=getattr(args, "clip_grad", 0.0) or 0.0)
    return replace(config, fp16=args.fp16, log_num_zeros_in_grad=args.log_num_zeros_in_grad,
                   barrier_with_L1_time=args.barrier_with_L1_time)
