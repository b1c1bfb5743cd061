"""torch.distributed + megatron-core parallel_state initialisation for TP x PP x DP runs."""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from disco_megatron.config import validate_world
from disco_megatron.runtime.cpu_shims import install_cpu_shims, seed_rng_tracker


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits in the TP x PP x DP grid."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def layout(self) -> dict[str, int]:
        """``{"tp", "pp", "dp"}``: the layout a checkpoint records (RNG states reload only into the same)."""
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp}


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(timeout_s: float = 300.0) -> None:
    """Init torch.distributed from torchrun's env vars (a 1-process group when launched plainly)."""
    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(
        backend=default_backend(), timeout=datetime.timedelta(seconds=timeout_s)
    )


def set_seeds(seed: int, tp_rank: int, pp_rank: int) -> None:
    """Seed python/numpy/torch (offset per PP stage like Megatron-LM) and the model-parallel tracker."""
    stage_seed = seed + 100 * pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    else:
        seed_rng_tracker(stage_seed, tp_rank)


def initialize_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: float = 300.0) -> ParallelInfo:
    """Init the process group (gloo on CPU, nccl on GPU), megatron parallel_state and seeds."""
    install_cpu_shims()
    world = int(os.environ.get("WORLD_SIZE", "1")) if not torch.distributed.is_initialized() else torch.distributed.get_world_size()
    validate_world(world, tp, pp)
    init_process_group(timeout_s)
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
    )
    info = current_parallel_info()
    set_seeds(seed, info.tp_rank, info.pp_rank)
    return info


def current_parallel_info() -> ParallelInfo:
    from megatron.core import parallel_state as ps

    return ParallelInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def destroy_parallel() -> None:
    """Tear down parallel_state and the process group (safe to call twice)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
