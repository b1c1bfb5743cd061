"""ScionConfig: megatron's OptimizerConfig plus the Scion knobs (field = CLI flag name).

It subclasses ``OptimizerConfig`` so megatron's wrapper code and ``OptimizerParamScheduler``
read the fields they expect (``lr``, ``min_lr``, ``weight_decay``, ``bf16``, ``timers``...).
``lr`` / ``min_lr`` are the hidden-layer (attention + mlp) learning rates; the embedding,
output and gains groups have their own peak lr (gains default to the hidden lr) and share
the hidden min/peak ratio, so one megatron schedule drives all four. Radii likewise (gains
default to the hidden radius). Weight decay is decoupled and, as in megatron, not applied to
1-D gains and biases (their ``wd_mult`` is 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron.core.optimizer.optimizer_config import OptimizerConfig

from disco_megatron.config import ScionFlags
from disco_megatron.optim.distributed import DP_MODES, TP_MODES
from disco_megatron.optim.layout import LR_GROUPS, OUTPUT_LMOS, QKV_SPLITS
from disco_megatron.optim.newton_schulz import BACKENDS


_FLAGS = ScionFlags()  # one set of defaults: the CLI's


@dataclass
class ScionConfig(OptimizerConfig):
    """Scion hyper-parameters and parallel modes; see the module docstring for the groups."""

    optimizer: str = "scion"
    clip_grad: float = 0.0
    weight_decay: float = 0.0
    scion_lr_embedding: Optional[float] = None
    scion_lr_output: Optional[float] = None
    scion_lr_gains: Optional[float] = None
    scion_momentum: float = _FLAGS.momentum
    scion_radius_embedding: float = _FLAGS.radius_embedding
    scion_radius_hidden: float = _FLAGS.radius_hidden
    scion_radius_output: float = _FLAGS.radius_output
    scion_radius_gains: Optional[float] = None
    scion_constrained: bool = _FLAGS.constrained
    scion_ns_backend: str = _FLAGS.ns_backend
    scion_ns_steps: int = _FLAGS.ns_steps
    scion_tp_mode: str = _FLAGS.tp_mode
    scion_dp_mode: str = _FLAGS.dp_mode
    scion_qkv_split: str = _FLAGS.qkv_split
    scion_output_lmo: str = _FLAGS.output_lmo

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate()

    def validate(self) -> None:
        """Raise one ValueError naming the flag and the fix for the first bad setting."""
        choices = {"--scion-tp-mode": (self.scion_tp_mode, TP_MODES),
                   "--scion-dp-mode": (self.scion_dp_mode, DP_MODES),
                   "--scion-qkv-split": (self.scion_qkv_split, QKV_SPLITS),
                   "--scion-output-lmo": (self.scion_output_lmo, OUTPUT_LMOS),
                   "--scion-ns-backend": (self.scion_ns_backend, BACKENDS)}
        for flag, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"unknown {flag} {value!r}; choose one of {', '.join(allowed)}")
        if self.lr is None:
            raise ValueError("--lr (the hidden-layer Scion learning rate) is required")
        for group in LR_GROUPS:
            if self.group_lr(group) < 0:
                raise ValueError(f"--scion-lr-{group} must be >= 0, got {self.group_lr(group)}")
            if self.group_radius(group) < 0:
                raise ValueError(f"--scion-radius-{group} must be >= 0, got {self.group_radius(group)}")
        if not 0.0 < self.scion_momentum <= 1.0:
            raise ValueError(
                f"--scion-momentum is the weight of the NEW gradient and must be in (0, 1], got "
                f"{self.scion_momentum} (0.1 matches a classical momentum of 0.9)")
        if self.scion_ns_steps < 1:
            raise ValueError(f"--scion-ns-steps must be >= 1, got {self.scion_ns_steps}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad > 0:
            raise ValueError("Scion does not clip gradients (its updates have a fixed norm); "
                             "set --clip-grad 0")
        if self.fp16:
            raise ValueError("Scion supports fp32 and --bf16 (fp32 master weights); --fp16 needs "
                             "loss scaling, which it does not implement: use --bf16")
        if self.use_distributed_optimizer:
            raise ValueError("Scion shards its own work (--scion-dp-mode sharded); drop "
                             "--use-distributed-optimizer")

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


def scion_config_from_flags(flags: Any, lr: float, min_lr: float = 0.0, bf16: bool = False) -> ScionConfig:
    """ScionConfig from the CLI's ``ScionFlags`` (``disco_megatron.config``) and ``--lr``/``--min-lr``.

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
        scion_ns_backend=flags.ns_backend, scion_ns_steps=flags.ns_steps,
        scion_tp_mode=flags.tp_mode, scion_dp_mode=flags.dp_mode, scion_qkv_split=flags.qkv_split,
        scion_output_lmo=flags.output_lmo, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
    )
