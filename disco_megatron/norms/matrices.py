"""The matrices norms are measured on: the optimizer's logical matrices, in the reference's orientation.

A stored megatron tensor is not always one matrix: fused ``linear_qkv`` holds q, k and v, gated
``linear_fc1`` holds gate and up. The optimizer treats each as its own matrix, as the reference
models do (separate wq/wk/wv, w1/w3), so norms are measured per logical matrix, keyed
``<stored name>:<part>`` (``...linear_qkv.weight:q``) as :func:`~disco_megatron.optim.layout.build_layout`
names them; no norm of the fused tensor is logged. Embedding tables are stored ``[vocab, hidden]``
but act as the map from one-hot tokens, ``[d_out=hidden, d_in=vocab]``: they are measured
transposed, as the reference does (``need_T`` in rakkit/disco ``disco.py``). Everything else is
``[d_out, d_in]`` as stored; 1-D tensors stay whole.
"""
from __future__ import annotations

import torch

from disco_megatron.models.naming import param_group
from disco_megatron.optim.distributed import piece_of
from disco_megatron.optim.layout import ModelShape, build_layout, split_matrix_key

_TRANSPOSED_ROLES = frozenset({"embedding", "position_embedding"})


def param_name(key: str) -> str:
    """The stored parameter's name of a logical-matrix key (``name:part`` -> ``name``)."""
    return split_matrix_key(key)[0]


def matrix_group(key: str) -> str:
    """Norm-statistics group of a logical-matrix key: its parameter's group."""
    return param_group(param_name(key))


def logical_pieces(name: str, local: torch.Tensor, partition_dim: int | None, model_cfg: ModelShape,
                   tp_size: int, tp_rank: int) -> list[tuple[str, torch.Tensor, int | None]]:
    """``(key, this rank's piece, partition_dim of the piece)`` of every logical matrix of a shard.

    A piece of a row-sharded tensor is its rows of that matrix (a row permutation of the
    matrix's TP block, which no norm sees); a transposed embedding's pieces are column blocks.
    """
    layout = build_layout(name, tuple(local.shape), model_cfg, tp_size=tp_size, tp_rank=tp_rank, qkv_split="qkv")
    pieces = []
    for matrix in layout.matrices:
        piece = piece_of(local, matrix)
        pdim = partition_dim
        if layout.role in _TRANSPOSED_ROLES:
            piece, pdim = piece.t(), (None if partition_dim is None else 1 - partition_dim)
        pieces.append((matrix.key, piece, pdim))
    return pieces
