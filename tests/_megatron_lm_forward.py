"""Megatron-LM's own forward of its checkpoints (a test helper), run like ``pretrain_gpt.py``.

``torchrun tests/_megatron_lm_cpu.py tests/_megatron_lm_forward.py FLAGS`` with ``FORWARD_LOADS``
(checkpoint directories, ``os.pathsep``-separated), ``FORWARD_TOKENS`` (a saved ``[batch, seq]``
tensor) and ``FORWARD_OUT``: builds the GPT exactly as ``pretrain_gpt.py`` does (its
``model_provider`` and ``gpt_builder``), loads each directory with Megatron-LM's own
``load_checkpoint`` (``--finetune``: weights only, either format) and saves the list of logits
(gathered over the vocab-parallel ranks).
"""
from __future__ import annotations

import os
from functools import partial

import torch

if __name__ == "__main__":
    from gpt_builders import gpt_builder
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron.training import get_args, training
    from megatron.training.checkpointing import load_checkpoint
    from model_provider import model_provider

    training.initialize_megatron(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    model = training.get_model(partial(model_provider, gpt_builder), wrap_with_ddp=False)
    args = get_args()
    tokens = torch.load(os.environ["FORWARD_TOKENS"])
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = []
    for load in os.environ["FORWARD_LOADS"].split(os.pathsep):
        args.load, args.finetune = load, True
        load_checkpoint(model, None, None)
        model[0].eval()
        with torch.no_grad():
            logits.append(gather_from_tensor_model_parallel_region(model[0](tokens, positions, None)))
    if torch.distributed.get_rank() == 0:
        torch.save(logits, os.environ["FORWARD_OUT"])
