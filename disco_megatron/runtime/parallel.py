"""torch.distributed + megatron-core parallel_state initialisation for TP x PP x CP x DP runs."""
from __future__ import annotations

import datetime
import gc
import glob
import os
import random
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from disco_megatron.config import validate_world
from disco_megatron.runtime.cpu_shims import install_cpu_shims, seed_rng_tracker


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits in the TP x PP x CP x DP grid (``vpp``: model chunks per stage)."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp: int = 1
    cp_rank: int = 0
    vpp: int = 1

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


def init_process_group(timeout_s: float = 300.0, *, backend: Optional[str] = None,
                       store: Optional[torch.distributed.Store] = None, rank: Optional[int] = None,
                       world_size: Optional[int] = None) -> None:
    """Init torch.distributed (gloo on CPU, nccl on GPU): from torchrun's env vars, or from an
    explicit ``store``/``rank``/``world_size`` (a 1-process group when launched plainly).

    Imports megatron-core first: ``torch.distributed.fsdp`` (which megatron-core imports) binds
    ``dist.group.WORLD`` as a default argument at import time, so importing it after the default
    group exists pins that group, and its gloo threads, for the life of the process; see
    :func:`destroy_parallel`.
    """
    if torch.distributed.is_initialized():
        return
    import megatron.core.parallel_state  # noqa: F401  (before the default group exists; see above)

    if store is None:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                         store=store, rank=-1 if rank is None else rank,
                                         world_size=-1 if world_size is None else world_size)


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


def initialize_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: float = 300.0, *,
                        vpp: Optional[int] = None, cp: int = 1) -> ParallelInfo:
    """Init the process group (gloo on CPU, nccl on GPU), megatron parallel_state and seeds.

    ``vpp``: model chunks per pipeline stage (the interleaved schedule); ``cp``: context-parallel size.
    """
    install_cpu_shims()
    world = int(os.environ.get("WORLD_SIZE", "1")) if not torch.distributed.is_initialized() else torch.distributed.get_world_size()
    validate_world(world, tp, pp, cp)
    init_process_group(timeout_s)
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
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
        cp=ps.get_context_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        vpp=ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    )


def destroy_parallel(*, synchronize: bool = True) -> None:
    """Orderly teardown of megatron's parallel state and every process group (safe to call twice).

    Why it must be orderly: a gloo process group owns C++ threads (one ``gloo_tcp_loop`` device
    loop and two ``pt_gloo_runloop`` workers) that are joined only when the group object is freed,
    and ``destroy_process_group`` does not free it while Python still references it. A worker
    that drops the last reference to a finished collective's tensors after interpreter shutdown
    has begun must take the GIL; the finalising interpreter ends that thread, and the forced unwind
    through a ``noexcept`` destructor calls ``std::terminate`` ("terminate called without an
    active exception", SIGABRT) after all the work had succeeded. So: wait for every rank
    (``synchronize``; skip it on an error path, where a peer may never arrive), drop every
    reference megatron-core keeps (:func:`_release_megatron_state`), destroy the groups, and
    collect, so each group's destructor joins its threads while the interpreter is whole.
    """
    dist = torch.distributed
    if synchronize and dist.is_initialized():
        dist.barrier()
    _release_megatron_state()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def _release_megatron_state() -> None:
    """Drop the process groups and models megatron-core's module state still references.

    ``destroy_model_parallel`` (megatron-core 0.16.1) leaves some group globals set
    (``_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP[_GLOO]``, ``_HYBRID_DP_CP_GROUPS``,
    ``_HIERARCHICAL_CONTEXT_PARALLEL_GROUPS``): every module global of ``parallel_state`` that
    still holds a group afterwards is reset. RoPE's ``forward`` is an ``lru_cache`` keyed on
    ``self``, which keeps every model built in the process (and the ``cp_group`` it holds) alive.
    Only modules already imported are touched.
    """
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None:
        return
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    for name, value in list(vars(ps).items()):
        if name.startswith("_") and _holds_process_group(value):
            setattr(ps, name, type(value)() if isinstance(value, (dict, list)) else None)
    for module_name in ("megatron.core.models.common.embeddings.rotary_pos_embedding",
                        "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding"):
        module = sys.modules.get(module_name)
        for cls in vars(module).values() if module is not None else ():
            cached = getattr(getattr(cls, "forward", None), "cache_clear", None)
            if isinstance(cls, type) and cached is not None:
                cached()


def _holds_process_group(value: object) -> bool:
    values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
    return any(isinstance(v, torch.distributed.ProcessGroup) or
               (isinstance(v, (dict, list, tuple)) and _holds_process_group(v)) for v in values)


# Thread names of a gloo process group (ProcessGroupGloo workers, gloo's TCP device loop).
GLOO_THREAD_NAMES = ("pt_gloo_runloop", "gloo_tcp_loop")


def live_gloo_threads() -> list[str]:
    """Names of this process's gloo threads still running (Linux; elsewhere always empty).

    After :func:`destroy_parallel` this is empty unless something still references a group.
    """
    names = []
    for comm in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(comm) as f:
                name = f.read().strip()
        except OSError:  # the thread ended while we looked
            continue
        if name in GLOO_THREAD_NAMES:
            names.append(name)
    return sorted(names)
