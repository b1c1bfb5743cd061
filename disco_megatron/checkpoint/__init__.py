"""Checkpoints: storage of training checkpoints (megatron dist_checkpointing) and conversion between
them, Megatron-LM's own checkpoints, HuggingFace Llama, legacy Megatron-LM torch checkpoints, and
other TP/PP layouts.

Modules: ``storage`` (TrainState, atomic save/load, the ``latest`` pointer), ``hf_llama`` (pure
name/tensor/config mapping), ``megatron_lm`` (Megatron-LM's args -> model config, its torch_dist
layout and resharding), ``legacy`` (reader of ``mp_rank_XX[_YYY]/model_optim_rng.pt``),
``convert`` (the operations), ``cli`` (``disco-convert``).
"""
from disco_megatron.checkpoint.storage import CheckpointError


class ConversionError(CheckpointError):
    """Input that cannot be converted; the message names the file or flag and the fix."""


__all__ = ["CheckpointError", "ConversionError"]
