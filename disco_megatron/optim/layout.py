"""Megatron parameter -> role, norm group, LMO and logical matrices (storage layout).

A megatron tensor is not always one matrix for the optimizer: fused ``linear_qkv`` holds per
query group ``[q heads | k | v]`` rows and SwiGLU ``linear_fc1`` holds ``[gate | up]``, and TP
splits each of them. :func:`build_layout` says, for the shard this rank holds, which local
rows belong to which logical matrix and how the TP pieces of that matrix concatenate. At TP1
the same function gives the row index sets the reference ``Scion`` takes as ``row_splits``
(:func:`reference_row_splits`), so the distributed step and the reference cannot disagree on
what a matrix is.

A parameter's role, norm group, lr group, TP dim and GLU halves come from the naming table
(:mod:`disco_megatron.models.naming`); gains use the hidden lr / radius unless configured
separately (see ``ScionConfig``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from disco_megatron.models.naming import canonical_name, lr_group, param_rule, qkv_group_layout
from disco_megatron.scion_options import DEFAULTS, check_option

# LMOs whose result on a row block only needs that block (concatenation along dim 0 is exact),
# and those that only need a column block (concatenation along dim 1).
_ROW_LOCAL_LMOS = frozenset({"rownorm", "embedding", "sign"})
_COL_LOCAL_LMOS = frozenset({"colnorm"})


class ModelShape(Protocol):
    """The TransformerConfig fields the layout needs (megatron's TransformerConfig has them)."""

    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None
    kv_channels: int | None
    ffn_hidden_size: int | None
    gated_linear_unit: bool


@dataclass(frozen=True)
class LogicalMatrix:
    """One matrix (or vector) the LMO sees whole, and where this rank's piece of it lies.

    ``local_rows`` are (start, stop) ranges on dim 0 of this rank's shard; concatenated they
    are this rank's piece. The full matrix is the TP pieces of ranks 0..t-1 concatenated along
    ``concat_dim``. ``local`` means the piece already is the whole matrix (no TP peers).
    1-D tensors are one vector each (QKV / GLU splits apply to weights only); a sharded GLU
    ``linear_fc1.bias`` then concatenates to a row permutation of the TP1 vector, which its
    permutation-invariant ``bias_rms`` LMO does not see.
    """

    key: str
    shape: tuple[int, ...]
    local_rows: tuple[tuple[int, int], ...]
    concat_dim: int
    local: bool


@dataclass(frozen=True)
class ParamLayout:
    """Storage layout of one parameter shard plus the optimizer's choices for it."""

    name: str
    role: str
    group: str
    lmo: str
    partition_dim: int | None
    local_shape: tuple[int, ...]
    matrices: tuple[LogicalMatrix, ...]

    @property
    def lr_group(self) -> str:
        return lr_group(self.group)


def row_blockable(matrix: LogicalMatrix, lmo: str) -> bool:
    """True when the LMO of ``matrix`` works row by row on this rank's piece (a row-local map on
    a whole or row-sharded matrix): any block of the piece's rows is dualized on its own."""
    return lmo in _ROW_LOCAL_LMOS and (matrix.local or matrix.concat_dim == 0)


def matrix_key(name: str, part: str = "") -> str:
    """A logical matrix's key: its parameter's name, plus ``:part`` (q, k, v; gate, up) when the
    parameter holds several matrices."""
    return f"{name}:{part}" if part else name


def split_matrix_key(key: str) -> tuple[str, str]:
    """``(parameter name, part)`` of a :func:`matrix_key` (part ``""`` for a whole tensor)."""
    name, _, part = key.partition(":")
    return name, part


def needs_whole(matrix: LogicalMatrix, lmo: str) -> bool:
    """True when dualizing ``matrix`` needs its TP pieces together (communication)."""
    if matrix.local:
        return False
    if lmo in _ROW_LOCAL_LMOS:
        return matrix.concat_dim != 0
    if lmo in _COL_LOCAL_LMOS:
        return matrix.concat_dim != 1
    return True


def _lmo(role: str, output_lmo: str, shared_embedding: bool) -> str:
    if role in ("gain", "bias"):
        return "bias_rms"
    if role in ("embedding", "position_embedding") or (role == "output" and shared_embedding):
        return "embedding"
    if role == "output":
        return output_lmo
    return "spectral"


def _qkv_dims(cfg: ModelShape, tp_size: int) -> tuple[int, int, int]:
    """(q heads per group, kv_channels, query groups per TP rank) of a fused QKV weight."""
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    if heads % groups or groups % tp_size:
        raise ValueError(
            f"--num-attention-heads {heads} must be divisible by --num-query-groups {groups}, and "
            f"query groups by --tensor-model-parallel-size {tp_size}"
        )
    return heads // groups, cfg.kv_channels or cfg.hidden_size // heads, groups // tp_size


def _qkv_row_blocks(cfg: ModelShape, tp_size: int, tp_rank: int, qkv_split: str
                    ) -> list[tuple[str, list[tuple[int, int]], int, bool]]:
    """(suffix, local row ranges, full rows, local?) of each logical matrix of a QKV shard."""
    q_per_group, kv, local_groups = _qkv_dims(cfg, tp_size)
    groups = local_groups * tp_size
    parts = qkv_group_layout(q_per_group, kv)
    group_rows = parts[-1][2]
    if qkv_split == "fused":
        return [("", [(0, local_groups * group_rows)], groups * group_rows, tp_size == 1)]
    if qkv_split == "qkv":
        return [
            (part, [(g * group_rows + a, g * group_rows + b) for g in range(local_groups)],
             groups * (b - a), tp_size == 1)
            for part, a, b in parts
        ]
    blocks = []
    for g in range(local_groups):
        global_group, base = tp_rank * local_groups + g, g * group_rows
        for part, a, b in parts:
            heads = (b - a) // kv
            blocks += [(f"{part}{global_group * heads + h}", [(base + a + h * kv, base + a + (h + 1) * kv)], kv, True)
                       for h in range(heads)]
    return blocks


def build_layout(
    name: str,
    local_shape: tuple[int, ...] | torch.Size,
    model_cfg: ModelShape,
    *,
    tp_size: int = 1,
    tp_rank: int = 0,
    qkv_split: str = DEFAULTS.qkv_split,
    output_lmo: str = DEFAULTS.output_lmo,
    shared_embedding: bool = False,
) -> ParamLayout:
    """Layout of the local shard of parameter ``name`` (shape ``local_shape``) on ``tp_rank``.

    ``shared_embedding``: the last stage's ``output_layer.weight`` tied to the embedding
    (megatron's ``param.shared_embedding``) gets the embedding's LMO so both copies stay equal.
    """
    check_option("qkv_split", qkv_split)
    check_option("output_lmo", output_lmo)
    name = canonical_name(name)
    local_shape = tuple(int(s) for s in local_shape)
    if len(local_shape) not in (1, 2):
        raise ValueError(f"{name}: Scion handles 1-D and 2-D parameters, got shape {local_shape}")
    rule = param_rule(name)
    role, pdim = rule.role, rule.tp_dim
    if (role in ("gain", "bias")) != (len(local_shape) == 1):
        raise ValueError(f"{name}: a {role} parameter of shape {local_shape}; expected "
                         f"{'1-D' if role in ('gain', 'bias') else '2-D'}")
    lmo = _lmo(role, output_lmo, shared_embedding)
    whole = tp_size == 1 or pdim is None
    full_shape = list(local_shape)
    if pdim is not None:
        full_shape[pdim] *= tp_size
    rows = local_shape[0]
    concat_dim = pdim if pdim is not None else 0

    def matrix(suffix: str, ranges: list[tuple[int, int]], full_rows: int, local: bool) -> LogicalMatrix:
        return LogicalMatrix(key=matrix_key(name, suffix), shape=(full_rows, *full_shape[1:]),
                             local_rows=tuple(ranges), concat_dim=concat_dim, local=local)

    if role == "qkv":
        q_per_group, kv, local_groups = _qkv_dims(model_cfg, tp_size)
        expected = local_groups * qkv_group_layout(q_per_group, kv)[-1][2]
        if rows != expected:
            raise ValueError(f"{name}: {rows} local rows, expected {expected} from the model config")
        blocks = _qkv_row_blocks(model_cfg, tp_size, tp_rank, qkv_split)
        matrices = tuple(matrix(s, r, m, local) for s, r, m, local in blocks)
    elif rule.glu and role == "fc1" and model_cfg.gated_linear_unit:
        if rows % 2:
            raise ValueError(f"{name}: gated linear_fc1 needs an even number of rows, got {rows}")
        half = rows // 2
        matrices = (matrix("gate", [(0, half)], half * tp_size, whole),
                    matrix("up", [(half, rows)], half * tp_size, whole))
    else:
        full_rows = rows * tp_size if pdim == 0 else rows
        matrices = (matrix("", [(0, rows)], full_rows, whole),)
    return ParamLayout(name=name, role=role, group=rule.group, lmo=lmo, partition_dim=pdim,
                       local_shape=local_shape, matrices=matrices)


def reference_row_splits(layout: ParamLayout) -> list[torch.Tensor] | None:
    """Row index sets of a TP1 layout for the reference ``Scion(row_splits=...)``; None if whole."""
    if len(layout.matrices) == 1:
        return None
    return [torch.cat([torch.arange(a, b) for a, b in m.local_rows]) for m in layout.matrices]
