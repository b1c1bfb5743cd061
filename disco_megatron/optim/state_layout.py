"""Where this rank's Scion state lies in the global tensors a checkpoint stores: a pure plan.

A checkpoint stores one global tensor per logical matrix and state kind (momentum, fp32 master):
the matrix as the single-process reference sees it, the same under every TP/PP/DP layout and
both DP modes. A rank saves and loads blocks of those tensors: in ``replicated`` mode its TP
piece of every matrix of its parameters (DP replicas and TP-duplicated copies as non-main
replicas); in ``sharded`` mode only what it owns, a whole matrix or a row block of a TP piece.
``dist_checkpointing`` maps the blocks of one layout onto those of another, so a checkpoint
reloads into any layout and either mode.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from disco_megatron.optim.layout import LogicalMatrix, ParamLayout
from disco_megatron.optim.plan import ExchangePlan


@dataclass(frozen=True)
class StatePiece:
    """One block of a logical matrix's global state tensor held by this rank: this rank's TP piece
    (replicated), the whole matrix (a sharded owner) or a row block of a TP piece (sharded vocab
    rows), placed by ``global_offset`` and ``local_shape``. ``fragments``: the regular grid of the
    blocks (None: uneven row blocks). ``replica``: (TP copy, DP copy); a piece is saved from the
    rank whose replica is (0, 0).
    """

    param: int
    matrix: LogicalMatrix
    global_offset: tuple[int, ...]
    local_shape: tuple[int, ...]
    fragments: tuple[int, ...] | None
    replica: tuple[int, int]


def _split(matrix: LogicalMatrix, tp_size: int) -> int:
    """How many TP pieces make the matrix (1: whole on every TP rank)."""
    return 1 if matrix.local else tp_size


def _tp_piece(param: int, layout: ParamLayout, matrix: LogicalMatrix, tp_size: int, tp_rank: int,
              dp_rank: int) -> StatePiece:
    split = _split(matrix, tp_size)
    shape = list(matrix.shape)
    shape[matrix.concat_dim] //= split
    offset = [0] * len(shape)
    offset[matrix.concat_dim] = (tp_rank % split) * shape[matrix.concat_dim]
    fragments = [1] * len(shape)
    fragments[matrix.concat_dim] = split
    tp_copy = tp_rank if layout.partition_dim is None else 0
    return StatePiece(param, matrix, tuple(offset), tuple(shape), tuple(fragments), (tp_copy, dp_rank))


def state_pieces(plan: ExchangePlan, layouts: Sequence[ParamLayout], *, tp_rank: int, dp_rank: int,
                 slot: int) -> list[StatePiece]:
    """The blocks of state this rank holds (``slot``: its place in the plan's exchange group)."""
    if plan.dp_mode != "sharded":
        return [_tp_piece(i, layout, m, plan.tp_size, tp_rank, dp_rank)
                for i, layout in enumerate(layouts) for m in layout.matrices]
    pieces = []
    for bucket in plan.buckets:
        for entry, owner in zip(bucket.entries, bucket.owners):
            if owner == slot:
                m = entry.matrix
                pieces.append(StatePiece(entry.param, m, (0,) * len(m.shape), m.shape,
                                         (1,) * len(m.shape), (0, 0)))
    for blocks in plan.row_blocks:
        rows = blocks.rows_of(slot)
        if rows is None or rows[0] == rows[1]:
            continue
        m = blocks.entry.matrix
        piece_rows = m.shape[0] // _split(m, plan.tp_size)
        start = (tp_rank % _split(m, plan.tp_size)) * piece_rows + rows[0]
        pieces.append(StatePiece(blocks.entry.param, m, (start,) + (0,) * (len(m.shape) - 1),
                                 (rows[1] - rows[0], *m.shape[1:]), None, (0, 0)))
    return pieces

