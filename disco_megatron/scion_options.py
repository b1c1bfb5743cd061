"""Scion's options: every default, every choice, their flags and their validation (a leaf: stdlib only).

``disco-pretrain``'s command line (``disco_megatron.config``), the Megatron-LM plug-in
(``integrations/megatron_lm.py``) and ``ScionConfig`` (``optim/config.py``) take their flags,
defaults and checks from here, and the optimizer modules take their choice tuples from here, so
each of these facts is written once. A field ``x_y`` of :class:`ScionFlags` is the flag
``--scion-x-y``. Every check raises one ``ValueError`` that names the flag and the fix.

Every default cites its source in :data:`SOURCES` (rendered into docs/defaults.md by
:func:`defaults_table`). ``--scion-preset NAME`` sets a reference's whole configuration
(:data:`PRESETS`); flags given on the command line override it (:func:`resolve_preset`).
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
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
    ``preset`` names the preset given (recorded with the run); its values are already in the
    other fields once :func:`resolve_preset` has run.
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
    preset: Optional[str] = None


DEFAULTS = ScionFlags()

# References cited below (commits of the snapshots read):
DISCO = "rakkit/disco@d18ea04"  # the reference implementation of arXiv:2510.03871
SCION = "LIONS-EPFL/scion@f58a393"  # the code of the Scion paper, Pethick et al. 2025, arXiv:2502.07529
SHALLOW = f"{SCION} examples/shallow-nanogpt"

# Where each default comes from: a paper, a reference code line, or a benchmark of this repo.
SOURCES: dict[str, str] = {
    "lr_embedding": f"one lr for every group, as {DISCO} example.py L53/L63/L69 (1e-2 for all three groups)",
    "lr_hidden": f"one lr for every group, as {DISCO} example.py L53/L63/L69; disco-pretrain's --lr 0.02 is Scion's "
                 "best lr in benchmarks/convergence.py (benchmarks/results/convergence.json)",
    "lr_output": f"one lr for every group, as {DISCO} example.py L53/L63/L69",
    "momentum": f"{SCION} README.md L16 (\"A good default is 0.1\"); {DISCO} example.py L54 (0.1); "
                f"{SHALLOW}/mup_examples/.../scion_full/run.sh L36 (beta1 0.9 -> momentum 1 - 0.9)",
    "radius_embedding": f"{SHALLOW}/model.py L331-363, configure_optimizers 'Mixed': embedding scale 1.0",
    "radius_hidden": f"{SHALLOW}/model.py L357: hidden Spectral scale 3.0",
    "radius_output": f"{SHALLOW}/model.py L363: lm_head scale 10.0 (for Sign, whose rows have the same "
                     "RMS->inf norm as RowNorm's)",
    "constrained": f"{SHALLOW}/mup_examples/.../scion_full/run.sh L42 (--scion_unconstrained=True); {DISCO} "
                   "disco.py L140 (weight_decay 0 = unconstrained)",
    "weight_decay": f"{DISCO} example.py L52 (0.0); {SCION} examples/modded-nanogpt/train_gpt_scion.py L353 (0)",
    "ns_backend": f"{SCION} examples/modded-nanogpt/train_gpt_scion.py L40 (a, b, c) = (3.4445, -4.7750, 2.0315); "
                  f"{DISCO} example.py L58 (newtonschulz5)",
    "ns_steps": f"{SCION} examples/modded-nanogpt/train_gpt_scion.py L419 (steps 5); {DISCO} example.py L59",
    "ns_dtype": "this repo: benchmarks/ns_precision.py, docs/newton_schulz_precision.md (bf16 error vs fp32)",
    "tp_mode": "this repo: exact (equals the single-process Scion), docs/design.md section 3",
    "dp_mode": "this repo: docs/design.md section 3 (sharded only with --use-distributed-optimizer)",
    "qkv_split": f"Q, K, V as separate matrices, as in the reference models: {DISCO} abstract_disco.py L181 "
                 f"(no fused matrices; TorchTitan's wq/wk/wv), {SCION} examples/modded-nanogpt/train_gpt_scion.py "
                 "L166-168 (c_q, c_k, c_v)",
    "output_lmo": f"{DISCO} example.py L70 (unembed_sqrt: row_j / (√d_in ‖row_j‖₂), abstract_disco.py L131)",
    "preset": "none: the defaults above",
    "clip_grad": f"{SHALLOW}/mup_examples/.../scion_full/run.sh L37 (--grad_clip=0.0); no clipping in {DISCO} "
                 "example.py",
}


@dataclass(frozen=True)
class Preset:
    """A reference's configuration: ScionFlags field -> value, and where it comes from."""

    values: Mapping[str, Any]
    source: str


# --scion-preset: each reproduces a reference's configuration in one flag. The lrs are the group
# lrs (--scion-lr-*); an explicit --lr replaces them (every group then follows --lr).
PRESETS: dict[str, Preset] = {
    "disco": Preset(
        {"lr_embedding": 1e-2, "lr_hidden": 1e-2, "lr_output": 1e-2, "momentum": 0.1, "radius_embedding": 1.0,
         "radius_hidden": 1.0, "radius_output": 1.0, "constrained": False, "weight_decay": 0.0,
         "ns_backend": "ns5", "ns_steps": 5, "qkv_split": "qkv", "output_lmo": "rownorm"},
        f"{DISCO} example.py L50-76: lr 1e-2 for every group, momentum 0.1, weight_decay 0.0, "
        "newtonschulz5 x 5; norm_factor spectral / embed_sqrt / unembed_sqrt (scale 1 each)"),
}
LR_FIELDS: tuple[str, ...] = ("lr_embedding", "lr_hidden", "lr_output")
# Parsed namespaces record which Scion flags were given on the command line under this attribute.
GIVEN_ATTR = "scion_flags_given"

# Defaults of a param group of the torch-level optimizers (reference Scion, DistributedScion): the
# CLI's momentum / update rule, and lr / radius of 1e-3 / 1 where a group names none, as the Scion
# paper's optimizer (LIONS-EPFL/scion examples/modded-nanogpt/train_gpt_scion.py L90: lr=1e-3, scale=1.0).
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
    "output_lmo": OUTPUT_LMOS, "preset": tuple(PRESETS),
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
    "preset": ("--scion-preset", str,
               "a reference's whole configuration in one flag; flags given on the command line override it "
               "(--lr overrides its group lrs): " + "; ".join(
                   f"{name} = " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in p.values.items()) + f" ({p.source})"
                   for name, p in PRESETS.items())),
}


def _recording(base: type[argparse.Action]) -> type[argparse.Action]:
    """``base`` that also adds its dest to the namespace's :data:`GIVEN_ATTR` set (given on the command line)."""

    class Recording(base):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            setattr(namespace, GIVEN_ATTR, set(getattr(namespace, GIVEN_ATTR, ())) | {self.dest})

    return Recording


_STORE, _SWITCH = _recording(argparse._StoreAction), _recording(argparse._StoreTrueAction)


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
            parser.add_argument(flag, dest=dest_prefix + name, action=_SWITCH, default=default,
                                help=f"{text} (default: {_default_text(name, default)})")
            continue
        choices = CHOICES.get(name)
        parser.add_argument(flag, dest=dest_prefix + name, action=_STORE, type=typ, default=default,
                            choices=choices if argparse_choices else None,
                            metavar="{" + ",".join(choices) + "}" if choices else name.upper(),
                            help=f"{text} (default: {_default_text(name, default)})")


def _default_text(name: str, default: Any) -> str:
    if name == "ns_dtype":
        return NS_DTYPE_DEFAULT_TEXT
    if default is None:
        return "--lr" if name in LR_FIELDS else "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def given_fields(values: Mapping[str, Any], dest_prefix: str) -> set[str]:
    """The ScionFlags fields given on the command line, from a parsed namespace's ``vars``."""
    return {dest[len(dest_prefix):] for dest in values.get(GIVEN_ATTR, ()) if dest.startswith(dest_prefix)}


def flag_given(argv: Sequence[str], flag: str) -> bool:
    """Whether ``flag`` (e.g. ``--lr``) is on the command line ``argv``, as ``--flag V`` or ``--flag=V``."""
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def resolve_preset(flags: ScionFlags, given: Collection[str], lr_given: bool) -> ScionFlags:
    """``flags`` with the preset's values, when ``--scion-preset`` is among the ``given`` fields.

    Precedence, highest first: a flag given on the command line; ``--lr`` given on the command
    line (for the group lrs, which then follow it); the preset; the recorded run (``--config``) or
    the defaults. A preset recorded by ``--config`` and not given again is already resolved.
    """
    if "preset" not in given or flags.preset not in PRESETS:
        return flags  # an unknown name is reported by validate()
    skip = set(given) | (set(LR_FIELDS) if lr_given else set())
    return replace(flags, **{k: v for k, v in PRESETS[flags.preset].values.items() if k not in skip})


def flags_from_values(values: Mapping[str, Any], dest_prefix: str, lr_given: bool) -> ScionFlags:
    """ScionFlags from a parsed namespace's ``vars`` (dests ``dest_prefix + field``), preset resolved."""
    flags = ScionFlags(**{name: values[dest_prefix + name] for name in SCION_FLAGS})
    return resolve_preset(flags, given_fields(values, dest_prefix), lr_given)


def defaults_table() -> str:
    """The markdown table of every default and its source (docs/defaults.md holds it verbatim)."""
    rows = ["| flag | default | source |", "|---|---|---|"]
    for name in SCION_FLAGS:
        rows.append(f"| `{SCION_FLAGS[name][0]}` | {_default_text(name, getattr(DEFAULTS, name))} | {SOURCES[name]} |")
    rows.append(f"| `--clip-grad` | {CLIP_GRAD_DEFAULT:g} | {SOURCES['clip_grad']} |")
    return "\n".join(rows) + "\n"


def ns_dtype_for(ns_dtype: Optional[str], device_type: str) -> str:
    """The Newton-Schulz precision: ``--scion-ns-dtype``, else bf16 on CUDA and fp32 elsewhere."""
    if ns_dtype is not None:
        return ns_dtype
    return NS_DTYPE_CUDA if device_type == "cuda" else NS_DTYPE_OTHER


def check_option(name: str, value: Any) -> None:
    """Raise a ValueError naming ``--scion-<name>`` and the fix if ``value`` is not allowed for it."""
    flag = SCION_FLAGS[name][0]
    if name in ("ns_dtype", "preset") and value is None:
        return  # ns_dtype by device (ns_dtype_for); no preset
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
