"""Reader of Megatron-LM legacy torch checkpoints -> the full (TP1/PP1) megatron state.

Layout read (Megatron-LM ``--ckpt-format torch``)::

    LOAD/latest_checkpointed_iteration.txt            an iteration number or "release"
    LOAD/iter_0000100/mp_rank_TT/model_optim_rng.pt    (PP 1) or mp_rank_TT_PPP/ (PP > 1)

Each file is a pickled dict with ``args`` (the run's argparse Namespace), ``iteration``,
``checkpoint_version`` and ``model``: this rank's state dict, with megatron-core names
(``embedding.word_embeddings.weight``, ``decoder.layers.N....``, TransformerEngine's fused
``linear_qkv.layer_norm_weight`` or the local spec's ``input_layernorm.weight``) or the older
nested ``language_model`` names. Layer numbers are stage-local in both. Only trusted files should
be read: legacy checkpoints are pickles.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from disco_megatron.checkpoint import ConversionError
from disco_megatron.checkpoint.megatron_lm import model_config_from_args, saved_layout
from disco_megatron.checkpoint.storage import RELEASE, checkpoint_dir, read_latest_iteration, require_saved_iteration
from disco_megatron.config import ModelConfig
from disco_megatron.models.naming import local_spec_name, tp_partition_dim
from disco_megatron.models.sharding import gather_full_tensor, global_param_name

LEGACY_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


@dataclass
class LegacyCheckpoint:
    """What a legacy checkpoint holds that a disco_megatron checkpoint needs."""

    model_config: ModelConfig
    full_state: dict[str, Tensor]  # TP1/PP1 names, vocab rows padded as the run padded them
    iteration: int


def legacy_iteration_dir(load: str, iteration: Optional[int]) -> str:
    """``LOAD/iter_N`` (the pointer's iteration unless given) or ``LOAD/release``."""
    if iteration is not None:
        return require_saved_iteration(load, iteration)
    pointed = read_latest_iteration(load, release_ok=True)
    return os.path.join(load, RELEASE) if pointed == RELEASE else checkpoint_dir(load, pointed)


def rank_files(ckpt_dir: str) -> dict[tuple[int, int], str]:
    """``{(tp_rank, pp_rank): path of model_optim_rng.pt}`` under one iteration directory."""
    files = {}
    for entry in sorted(os.listdir(ckpt_dir)):
        match = _RANK_DIR.match(entry)
        path = os.path.join(ckpt_dir, entry, LEGACY_FILE)
        if match and os.path.isfile(path):
            files[(int(match.group(1)), int(match.group(2) or 0))] = path
    if not files:
        raise ConversionError(f"--load {ckpt_dir}: no mp_rank_XX[_YYY]/{LEGACY_FILE} files "
                              "(not a Megatron-LM legacy torch checkpoint)")
    return files


def flatten(state: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested state dicts (old ``language_model`` format) -> dotted names."""
    flat: dict[str, object] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def canonical_legacy_name(name: str, source: str) -> Optional[str]:
    """megatron-core local-spec name of a legacy tensor name; None for non-parameters to drop."""
    if name.endswith("_extra_state") or name.endswith("inv_freq"):
        return None
    try:
        return local_spec_name(name)
    except ValueError as exc:
        raise ConversionError(f"{source}: {exc}") from exc


def _load_rank_file(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # legacy files pickle an argparse Namespace
    except Exception as exc:
        raise ConversionError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc


def read_legacy_checkpoint(load: str, iteration: Optional[int] = None,
                           vocab_size: Optional[int] = None) -> LegacyCheckpoint:
    """Gather every TP/PP rank file of a legacy checkpoint into the full model state."""
    ckpt_dir = legacy_iteration_dir(load, iteration)
    files = rank_files(ckpt_dir)
    first = _load_rank_file(files[min(files)])
    if "args" not in first or "model" not in first:
        hint = " (virtual pipeline 'model0' ... is not supported)" if "model0" in first else ""
        raise ConversionError(f"{files[min(files)]}: no 'args'/'model' entries{hint}")
    args = first["args"]
    if float(first.get("checkpoint_version", 3.0)) < 3.0:
        raise ConversionError(f"{files[min(files)]}: checkpoint_version {first['checkpoint_version']} < 3 orders "
                              "QKV differently; re-save it with a recent Megatron-LM first")
    if getattr(args, "virtual_pipeline_model_parallel_size", None) is not None:
        raise ConversionError(f"{files[min(files)]}: virtual pipeline stages are not supported in legacy checkpoints")
    if vocab_size is None and getattr(args, "vocab_size", None) is None:
        raise ConversionError(f"{files[min(files)]}: args have no vocab_size (only the padded size); pass "
                              "--tokenizer-model the sentencepiece model the run used")
    tp, pp = saved_layout(args)
    expected = {(t, p) for t in range(tp) for p in range(pp)}
    if set(files) != expected:
        raise ConversionError(f"{ckpt_dir}: args say TP {tp} x PP {pp} but rank files "
                              f"{sorted(files)} are present; the checkpoint is incomplete")
    cfg = model_config_from_args(args, files[min(files)], vocab_size)
    shards: dict[str, dict[int, Tensor]] = {}
    for (tp_rank, pp_rank), path in sorted(files.items()):
        state = first if (tp_rank, pp_rank) == min(files) else _load_rank_file(path)
        for raw, value in flatten(state["model"]).items():
            name = canonical_legacy_name(raw, path)
            if name is None:
                continue
            if not isinstance(value, Tensor):
                raise ConversionError(f"{path}: model entry {raw} is a {type(value).__name__}, not a tensor")
            name = global_param_name(name, pp_rank, cfg.num_layers, pp)
            if name == "output_layer.weight" and not cfg.untie_embeddings_and_output_weights:
                continue  # the last stage's copy of the tied embedding
            if tp_rank in shards.setdefault(name, {}):
                raise ConversionError(f"{path}: {name} appears on two pipeline stages")
            shards[name][tp_rank] = value
    full = {}
    for name, by_rank in shards.items():
        if len(by_rank) != tp:
            raise ConversionError(f"{ckpt_dir}: {name} is on TP ranks {sorted(by_rank)} only, expected 0..{tp - 1}")
        full[name] = gather_full_tensor(name, [by_rank[r] for r in range(tp)], tp_partition_dim(name), cfg.swiglu)
    return LegacyCheckpoint(cfg, full, int(first.get("iteration", 0)))
