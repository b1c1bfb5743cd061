"""Full (TP1/PP1) <-> local TP/PP shard mapping of megatron-core GPT parameters.

Which dim a parameter is split along and whether it is a gated ``linear_fc1`` come from the
naming table (:mod:`disco_megatron.models.naming`); this module does the arithmetic:

- a split tensor's TP rank r holds the r-th contiguous block along its partition dim;
- a gated ``linear_fc1`` (weight and bias) is ``[gate | up]`` and TP shard r is
  ``[gate_r | up_r]`` (each half chunked separately);
- pipeline stages number their ``decoder.layers.N.`` locally from 0; with an even split,
  global layer = stage * layers_per_stage + local; under the interleaved schedule (``vp_size``
  model chunks per stage) chunk v of stage p holds global layers from (v * pp + p) * layers_per_chunk,
  megatron's ``get_transformer_layer_offset``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from disco_megatron.models.naming import canonical_name, is_glu_fc1, layer_number, renumber_layer


def shard_full_tensor(name: str, full: Tensor, tp_rank: int, tp_size: int,
                      partition_dim: int | None, glu: bool) -> Tensor:
    """The local TP shard (a copy) of a full TP1 tensor, as megatron lays it out."""
    if partition_dim is None or tp_size == 1:
        return full.clone()
    if full.shape[partition_dim] % (2 * tp_size if is_glu_fc1(name, glu) else tp_size):
        raise ValueError(
            f"{name}: dim {partition_dim} of size {full.shape[partition_dim]} is not divisible by "
            f"--tensor-model-parallel-size {tp_size}; pick sizes divisible by TP"
        )
    if is_glu_fc1(name, glu):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]]).clone()
    return full.chunk(tp_size, dim=partition_dim)[tp_rank].clone()


def gather_full_tensor(name: str, shards: Sequence[Tensor], partition_dim: int | None,
                       glu: bool) -> Tensor:
    """Inverse of :func:`shard_full_tensor` given the shards of TP ranks 0..t-1 in order."""
    if partition_dim is None or len(shards) == 1:
        return shards[0].clone()
    if is_glu_fc1(name, glu):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(list(shards), dim=partition_dim)


def _layers_per_stage(num_layers: int, pp_size: int) -> int:
    if num_layers % pp_size:
        raise ValueError(
            f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size "
            f"{pp_size}; pick a layer count divisible by PP"
        )
    return num_layers // pp_size


def layer_to_stage(global_layer: int, num_layers: int, pp_size: int) -> tuple[int, int]:
    """(pp stage, local layer index) of a global layer index under an even PP split."""
    per_stage = _layers_per_stage(num_layers, pp_size)
    return divmod(global_layer, per_stage)


def stage_to_layer(pp_rank: int, local_layer: int, num_layers: int, pp_size: int,
                   vp_stage: int = 0, vp_size: int = 1) -> int:
    """Global layer index of local layer ``local_layer`` on stage ``pp_rank`` (its model chunk ``vp_stage``
    of ``vp_size`` under the interleaved schedule)."""
    per_chunk = _layers_per_stage(num_layers, pp_size * vp_size)
    return (vp_stage * pp_size + pp_rank) * per_chunk + local_layer


def global_param_name(name: str, pp_rank: int, num_layers: int, pp_size: int,
                      vp_stage: int = 0, vp_size: int = 1) -> str:
    """Rewrite a stage-local (chunk-local) ``decoder.layers.N.`` name to its global (PP1) layer number."""
    local = layer_number(name)
    if local is None:
        return canonical_name(name)
    return renumber_layer(name, stage_to_layer(pp_rank, local, num_layers, pp_size, vp_stage, vp_size))


def local_param_name(name: str, num_layers: int, pp_size: int) -> tuple[int | None, str]:
    """(stage, stage-local name) of a global name; stage None for non-layer parameters.

    Non-layer parameters live on the first (embedding) or last (final norm, output) stage;
    which one is the caller's knowledge (it depends on pre/post-process), so None is returned.
    """
    layer = layer_number(name)
    if layer is None:
        return None, canonical_name(name)
    stage, local = layer_to_stage(layer, num_layers, pp_size)
    return stage, renumber_layer(name, local)
