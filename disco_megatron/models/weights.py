"""Move whole-model (TP1/PP1) weights in and out of this rank's TP/PP shard of a GPTModel."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from disco_megatron.config import ModelConfig
from disco_megatron.models.sharding import gather_full_tensor, global_param_name, shard_full_tensor


def _local_params(model: torch.nn.Module, cfg: ModelConfig, pp_rank: int, pp_size: int):
    for name, param in model.named_parameters():
        yield global_param_name(name, pp_rank, cfg.num_layers, pp_size), param


def load_full_weights(model: torch.nn.Module, full: Mapping[str, Tensor], cfg: ModelConfig) -> None:
    """Copy this rank's shard of every parameter from a full (TP1/PP1-named) state dict."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    for name, param in _local_params(model, cfg, pp_rank, pp):
        if name not in full:
            raise KeyError(f"{name}: missing from the full weights (model shapes differ?)")
        dim = getattr(param, "partition_dim", None) if getattr(param, "tensor_model_parallel", False) else None
        shard = shard_full_tensor(name, full[name], tp_rank, tp, dim, cfg.swiglu)
        if shard.shape != param.shape:
            raise ValueError(f"{name}: full weight {tuple(full[name].shape)} shards to {tuple(shard.shape)} "
                             f"but the model holds {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(shard)


def gather_full_weights(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, Tensor]:
    """The full (TP1/PP1-named) weights of this stage, gathered over TP (a collective on the TP group)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    full = {}
    for name, param in _local_params(model, cfg, pp_rank, pp):
        dim = getattr(param, "partition_dim", None) if getattr(param, "tensor_model_parallel", False) else None
        shards = [torch.empty_like(param) for _ in range(tp)]
        torch.distributed.all_gather(shards, param.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
        full[name] = gather_full_tensor(name, shards, dim, cfg.swiglu)
    return full
