"""Full (TP1/PP1) <-> local TP/PP shard mapping of megatron-core GPT parameters.

Megatron conventions this module encodes (the optimizer layout, the checkpoint converters and
the tests share them from here):

- ColumnParallel (``linear_qkv``, ``linear_fc1``, vocab-parallel ``word_embeddings`` and
  ``output_layer``, and their biases): partition dim 0, TP rank r holds the r-th contiguous
  row block. Fused QKV rows are ordered per query group ``[q heads | k | v]`` and TP ranks
  hold contiguous groups, so plain row blocks are right for it too.
- SwiGLU ``linear_fc1`` (weight and bias) is the exception: the full tensor is
  ``[gate | up]`` and TP shard r is ``[gate_r | up_r]`` (each half chunked separately).
- RowParallel (``linear_proj``, ``linear_fc2``) weights: partition dim 1 (column blocks);
  their biases, layer norms and position embeddings are replicated (partition dim None).
- Pipeline stages number their ``decoder.layers.N.`` locally from 0; with an even split,
  global layer = stage * layers_per_stage + local.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

_COLUMN_PARALLEL = ("linear_qkv.", "linear_fc1.", "word_embeddings.", "output_layer.")
_ROW_PARALLEL = ("linear_proj.", "linear_fc2.")
_LAYER_RE = re.compile(r"decoder\.layers\.(\d+)\.")


def canonical_name(name: str) -> str:
    """Strip wrapper prefixes (megatron DDP / Float16Module ``module.``) from a parameter name."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def tp_partition_dim(name: str) -> int | None:
    """Megatron TP partition dim of a GPT parameter: 0 (row blocks), 1 (column blocks) or None."""
    name = canonical_name(name)
    leaf = name.rsplit(".", 1)[-1]
    if "layer_norm" in leaf or "layernorm" in name:
        return None
    if any(part in name for part in _COLUMN_PARALLEL):
        return 0
    if any(part in name for part in _ROW_PARALLEL):
        return 1 if leaf == "weight" else None
    return None


def is_glu_fc1(name: str, glu: bool) -> bool:
    """True when the parameter is a gated ``linear_fc1`` weight/bias ([gate | up] halves)."""
    name = canonical_name(name)
    return glu and "linear_fc1." in name and name.rsplit(".", 1)[-1] in ("weight", "bias")


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


def stage_to_layer(pp_rank: int, local_layer: int, num_layers: int, pp_size: int) -> int:
    """Global layer index of local layer ``local_layer`` on stage ``pp_rank``."""
    return pp_rank * _layers_per_stage(num_layers, pp_size) + local_layer


def global_param_name(name: str, pp_rank: int, num_layers: int, pp_size: int) -> str:
    """Rewrite a stage-local ``decoder.layers.N.`` name to its global (PP1) layer number."""
    name = canonical_name(name)
    return _LAYER_RE.sub(
        lambda m: f"decoder.layers.{stage_to_layer(pp_rank, int(m.group(1)), num_layers, pp_size)}.",
        name,
    )


def local_param_name(name: str, num_layers: int, pp_size: int) -> tuple[int | None, str]:
    """(stage, stage-local name) of a global name; stage None for non-layer parameters.

    Non-layer parameters live on the first (embedding) or last (final norm, output) stage;
    which one is the caller's knowledge (it depends on pre/post-process), so None is returned.
    """
    name = canonical_name(name)
    match = _LAYER_RE.search(name)
    if match is None:
        return None, name
    stage, local = layer_to_stage(int(match.group(1)), num_layers, pp_size)
    return stage, _LAYER_RE.sub(f"decoder.layers.{local}.", name, count=1)
