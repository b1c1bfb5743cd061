"""Checkpoint conversion: disco_megatron and Megatron-LM (dist_checkpointing) <-> HuggingFace Llama,
legacy Megatron-LM torch checkpoints, and TP/PP resharding including optimizer state.

Modules: ``hf_llama`` (pure name/tensor/config mapping), ``megatron_lm`` (Megatron-LM's args ->
model config, its torch_dist layout and resharding), ``legacy`` (reader of
``mp_rank_XX[_YYY]/model_optim_rng.pt``), ``convert`` (the operations), ``cli`` (``disco-convert``).
"""
from disco_megatron.training.checkpointing import CheckpointError


class ConversionError(CheckpointError):
    """Input that cannot be converted; the message names the file or flag and the fix."""


__all__ = ["ConversionError"]
