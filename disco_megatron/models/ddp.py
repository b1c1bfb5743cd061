"""megatron-core DDP around a model stage, as the trainer and the checkpoint converter wrap it."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import MegatronModule


def wrap_ddp(model: "MegatronModule") -> "DistributedDataParallel":
    """megatron DDP around this stage (grads in ``main_grad``) and the schedule's grad hooks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                      use_distributed_optimizer=False),
        model,
    )
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp
