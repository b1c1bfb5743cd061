"""Scion's options: every default, every choice, their flags and their validation (a leaf: stdlib only).

``disco-pretrain``'s command line (``disco_megatron.config``), the Megatron-LM plug-in
(``integrations/megatron_lm.py``) and ``ScionConfig`` (``optim/config.py``) take their flags,
defaults and checks from here, and the optimizer modules take their choice tuples from here, so
each of these facts is written once. A field ``x_y`` of :class:`ScionFlags` is the flag
``--scion-x-y``. Every check raises one ``ValueError`` that names the flag and the fix.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Optional

TP_MODES: tuple[str, ...] = ("owner", "duplicated", "local")
DP_MODES: tuple[str, ...] = ("replicated", "sharded")
QKV_SPLITS: tuple[str, ...] = ("fused", "qkv", "head")
OUTPUT_LMOS: tuple[str, ...] = ("rownorm", "sign")
NS_BACKENDS: tuple[str, ...] = ("ns5", "polar_express", "svd")
NS_DTYPES: tuple[str, ...] = ("bf16", "fp32")
# --scion-ns-dtype left unset: bf16 on CUDA (tensor cores; docs/newton_schulz_precision.md measures
# what it costs in accuracy), fp32 elsewhere (bf16 matmuls are slow on CPU and the CPU twins compare at fp32).
NS_DTYPE_CUDA, NS_DTYPE_OTHER = "bf16", "fp32"
NS_DTYPE_DEFAULT_TEXT = f"{NS_DTYPE_CUDA} on CUDA, {NS_DTYPE_OTHER} on CPU"


@dataclass
class ScionFlags:
    """Scion's settings as the flags give them; the defaults are the CLI's (and ``ScionConfig``'s).

    ``lr_*`` left at None take the run's ``--lr``. The parallel modes (``tp_mode``, ``dp_mode``) and
    ``qkv_split``/``output_lmo`` choose how the distributed step cuts and exchanges matrices.
    """

    lr_embedding: Optional[float] = None
    lr_hidden: Optional[float] = None
    lr_output: Optional[float] = None
    momentum: float = 0.1
    radius_embedding: float = 1.0
    radius_hidden: float = 3.0
    radius_output: float = 10.0
    constrained: bool = False
    weight_decay: float = 0.0
    ns_backend: str = "ns5"
    ns_steps: int = 5
    ns_dtype: Optional[str] = None
    tp_mode: str = "owner"
    dp_mode: str = "replicated"
    qkv_split: str = "qkv"
    output_lmo: str = "rownorm"


DEFAULTS = ScionFlags()

# Defaults of a param group of the torch-level optimizers (reference Scion, DistributedScion): the
# CLI's momentum / update rule, and lr / radius of 1e-3 / 1 where a group names none.
GROUP_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3, "momentum": DEFAULTS.momentum, "radius": 1.0, "constrained": DEFAULTS.constrained,
    "weight_decay": DEFAULTS.weight_decay,
}

# --clip-grad (megatron's flag, shared with Adam) for Scion: off by default, as the Scion paper
# trains (Pethick et al. 2025, "Training Deep Learning Models with Norm-Constrained LMOs",
# arXiv:2502.07529): an LMO step has a fixed norm whatever the gradient's size. Megatron-LM's
# own default (1.0) is honoured when the plug-in runs inside Megatron-LM.
CLIP_GRAD_DEFAULT: float = 0.0
CLIP_GRAD_HELP = ("clip the global gradient norm (all ranks, TP-replicated tensors counted once) to this "
                  "before the update, as megatron-core does (0: off; Scion's default, as in the Scion paper)")

CHOICES: dict[str, tuple[str, ...]] = {
    "ns_backend": NS_BACKENDS, "ns_dtype": NS_DTYPES, "tp_mode": TP_MODES, "dp_mode": DP_MODES, "qkv_split": QKV_SPLITS,
    "output_lmo": OUTPUT_LMOS,
}

# field -> (flag, type, help); a bool field is a switch.
SCION_FLAGS: dict[str, tuple[str, type, str]] = {
    "lr_embedding": ("--scion-lr-embedding", float, "lr of the embedding group"),
    "lr_hidden": ("--scion-lr-hidden", float, "lr of hidden matrices and gains"),
    "lr_output": ("--scion-lr-output", float, "lr of the output layer"),
    "momentum": ("--scion-momentum", float, "alpha, the weight of the NEW gradient: d <- (1-alpha) d + alpha g"),
    "radius_embedding": ("--scion-radius-embedding", float, "radius (scale) of the embedding LMO"),
    "radius_hidden": ("--scion-radius-hidden", float, "radius of the hidden (spectral) LMO and gains"),
    "radius_output": ("--scion-radius-output", float, "radius of the output LMO"),
    "constrained": ("--scion-constrained", bool,
                    "constrained update W <- (1-lr) W - lr radius lmo(d) instead of W <- W - lr radius lmo(d)"),
    "weight_decay": ("--scion-weight-decay", float, "decoupled weight decay W <- W (1 - lr wd)"),
    "ns_backend": ("--scion-ns-backend", str, "orthogonalisation of hidden matrices (svd: exact, slow)"),
    "ns_steps": ("--scion-ns-steps", int, "Newton-Schulz iterations"),
    "ns_dtype": ("--scion-ns-dtype", str, "Newton-Schulz compute precision"),
    "tp_mode": ("--scion-tp-mode", str,
                "owner (exact, each matrix orthogonalised once), duplicated (all-gather baseline) or local "
                "(shard-local approximation)"),
    "dp_mode": ("--scion-dp-mode", str, "replicated (every DP replica holds all optimizer state and computes) or "
                "sharded (one owner per logical matrix over TP×DP holds its momentum and fp32 master)"),
    "qkv_split": ("--scion-qkv-split", str, "logical matrices of a fused QKV weight: one (fused), Q/K/V (qkv) or one per head (head)"),
    "output_lmo": ("--scion-output-lmo", str, "LMO of the output layer"),
}


def add_scion_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, dest_prefix: str, *,
                        argparse_choices: bool) -> None:
    """Add every Scion flag (dest ``dest_prefix + field``, default from :data:`DEFAULTS`).

    ``argparse_choices``: let argparse reject a bad choice (Megatron-LM's parser); without it the
    choices are only shown in the help and :func:`validate` reports them (``disco-pretrain``, whose
    errors are one line naming the flag and value).
    """
    for name, (flag, typ, text) in SCION_FLAGS.items():
        default = getattr(DEFAULTS, name)
        if typ is bool:
            parser.add_argument(flag, dest=dest_prefix + name, action="store_true", default=default,
                                help=f"{text} (default: {'on' if default else 'off'})")
            continue
        choices = CHOICES.get(name)
        parser.add_argument(flag, dest=dest_prefix + name, type=typ, default=default,
                            choices=choices if argparse_choices else None,
                            metavar="{" + ",".join(choices) + "}" if choices else name.upper(),
                            help=f"{text} (default: {_default_text(name, default)})")


def _default_text(name: str, default: Any) -> str:
    if name == "ns_dtype":
        return NS_DTYPE_DEFAULT_TEXT
    return "--lr" if default is None else str(default)


def ns_dtype_for(ns_dtype: Optional[str], device_type: str) -> str:
    """The Newton-Schulz precision: ``--scion-ns-dtype``, else bf16 on CUDA and fp32 elsewhere."""
    if ns_dtype is not None:
        return ns_dtype
    return NS_DTYPE_CUDA if device_type == "cuda" else NS_DTYPE_OTHER


def check_option(name: str, value: Any) -> None:
    """Raise a ValueError naming ``--scion-<name>`` and the fix if ``value`` is not allowed for it."""
    flag = SCION_FLAGS[name][0]
    if name == "ns_dtype" and value is None:
        return  # by device: ns_dtype_for
    if name in CHOICES:
        if value not in CHOICES[name]:
            raise ValueError(f"{flag} {value}: choose one of {', '.join(CHOICES[name])}")
    elif name == "momentum":
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{flag} {value}: must be in (0, 1]; it is alpha, the weight of the NEW gradient "
                             "(d <- (1-alpha) d + alpha g), so 0.1 matches a classical momentum of 0.9")
    elif name == "ns_steps":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} {value!r}: Newton-Schulz steps must be a positive integer (default "
                             f"{DEFAULTS.ns_steps})")
    elif name == "constrained":
        if not isinstance(value, bool):
            raise ValueError(f"{flag}: must be a switch (True/False), got {value!r}")
    elif value is None and name.startswith("lr_"):
        return  # takes the run's --lr
    elif not 0 <= value < math.inf:  # `not` also rejects NaN
        raise ValueError(f"{flag} {value}: must be a finite number >= 0")


def check_parallel_modes(tp_mode: str, dp_mode: str) -> None:
    """Both modes are choices, and ``sharded`` (owners over TP×DP) comes with ``owner``."""
    check_option("tp_mode", tp_mode)
    check_option("dp_mode", dp_mode)
    if dp_mode == "sharded" and tp_mode != "owner":
        raise ValueError(f"--scion-dp-mode sharded spreads matrix owners over TP×DP and needs --scion-tp-mode "
                         f"owner (got {tp_mode}); use --scion-dp-mode replicated")


def check_clip_grad(value: float) -> None:
    """``--clip-grad`` must be a finite number >= 0 (0: no clipping)."""
    if not 0 <= value < math.inf:  # `not` also rejects NaN
        raise ValueError(f"--clip-grad {value}: must be a finite number >= 0 (0 turns clipping off, "
                         f"Scion's default)")


def dp_mode_for(dp_mode: str, use_distributed_optimizer: bool) -> str:
    """Scion's DP mode under megatron's ``--use-distributed-optimizer``: ``sharded``.

    Megatron's flag asks to split the optimizer's work and state over DP; Scion's ``sharded``
    mode does that (owners of the orthogonalisations spread over TP×DP), so the flag maps to it
    instead of being refused. The DDP grads must then stay all-reduced (Scion reads whole grads).
    """
    return "sharded" if use_distributed_optimizer else dp_mode


def validate(flags: ScionFlags) -> None:
    """Check every field of ``flags`` (first bad one raises) and the combination of the modes."""
    for name in SCION_FLAGS:
        check_option(name, getattr(flags, name))
    check_parallel_modes(flags.tp_mode, flags.dp_mode)
