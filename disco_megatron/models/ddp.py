"""megatron-core DDP around the model chunks of a stage, as the trainer and the checkpoint converter wrap them."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import MegatronModule


def wrap_ddp(chunks: list["MegatronModule"], *, overlap_grad_reduce: bool = False) -> list["DistributedDataParallel"]:
    """megatron DDP around each model chunk of this stage (grads in ``main_grad``) and the schedule's
    grad hooks on their config, as Megatron-LM's ``setup_model_and_optimizer`` sets them.

    ``overlap_grad_reduce``: each gradient bucket's all-reduce starts during the backward pass, as soon
    as its last gradient is ready (``no_sync`` holds it back until the last microbatch; the interleaved
    schedule starts a chunk's sync with ``grad_sync_func``); ``finalize_model_grads`` waits for them.
    Chunks after the first are one bucket each, like Megatron-LM (their reduce overlaps the others' compute).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
                                               use_distributed_optimizer=False)
    wrapped = [DistributedDataParallel(chunk.config, ddp_config, chunk, disable_bucketing=index > 0)
               for index, chunk in enumerate(chunks)]
    no_sync = [ddp.no_sync for ddp in wrapped]
    grad_sync = [ddp.start_grad_sync for ddp in wrapped]
    for chunk in chunks:
        chunk.config.no_sync_func = no_sync if len(wrapped) > 1 else no_sync[0]
        chunk.config.grad_sync_func = (grad_sync if len(wrapped) > 1 else grad_sync[0]) if overlap_grad_reduce else None
        chunk.config.finalize_model_grads_func = finalize_model_grads
    return wrapped
