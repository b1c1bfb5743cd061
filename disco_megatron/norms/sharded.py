"""Norms of a TP-sharded tensor from this rank's shard, without gathering it (DESIGN.md section 4).

A tensor is split over the TP group along ``partition_dim``: 0 (row blocks: ColumnParallel,
vocab-parallel embedding/output), 1 (column blocks: RowParallel) or None (replicated, every
rank holds all of it). Shards are equal-sized and in TP-rank order, as megatron lays them out.
The statistics of :class:`~disco_megatron.norms.definitions.MatrixStats` reduce over TP:

- norms along the sharded dim (row norms of a row-sharded matrix) are whole on each rank:
  local max, then all-reduce MAX; norms across it (its column norms) are partial sums of
  squares: all-reduce SUM of the vector, then max. Sum of squares: SUM; max|w|: MAX.
- σ_max from vector all-reduces only, on the row-sharded view ``A`` (``W``, or ``Wᵀ`` for
  partition_dim 1): a vector ``v`` over A's unsharded dim is replicated, ``u_r = A_r v`` is
  this rank's slice of ``A v``, and ``AᵀA v = Σ_r A_rᵀ u_r`` is one all-reduce per iteration.
  The iteration is Lanczos (Krylov-accelerated power iteration: same products, same
  communication, the Rayleigh–Ritz value of all of them instead of the last one; on random
  Gaussian matrices 30 iterations reach ~1e-5 relative where plain power iteration is ~1e-2
  off). ``v`` is thus W's right singular vector for partition_dim 0/None and its left one for
  partition_dim 1. The estimate never exceeds σ_max; :class:`PowerIterationState` keeps ``v``
  per tensor so later calls warm-start and few iterations suffice while the matrix changes
  slowly.
- ``with_condition=True`` needs σ_min, which power iteration does not give cheaply: the
  matrix is all-gathered over TP and both σ_max and σ_min come from an exact SVD (opt-in,
  costs a whole matrix per rank and an SVD).

Fused tensors (QKV, SwiGLU ``[gate | up]``) are measured as stored: every norm here is
invariant to the row order megatron uses for their shards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from disco_megatron.norms.definitions import (
    MatrixStats,
    VectorStats,
    matrix_norms_from_stats,
    vector_norms_from_stats,
)

_START_SEED = 20251003
_EXHAUSTED = 1e-4  # relative residual below which fp32 Lanczos stops growing its basis


@dataclass
class PowerIterationState:
    """Warm start for σ_max: the last replicated singular vector of each tensor, by key.

    The iteration is Lanczos (see :func:`top_singular_value`), power iteration's Krylov form.

    ``first_iters`` iterations run from a fixed random start (identical on every TP rank), then
    ``iters`` per call from the stored vector.
    """

    iters: int = 5
    first_iters: int = 30
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.iters < 1 or self.first_iters < 1:
            raise ValueError(f"power iterations must be >= 1 (got iters={self.iters}, "
                             f"first_iters={self.first_iters})")

    def start(self, key: str, n: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """The start vector for ``key`` (length ``n``) and how many iterations to run from it."""
        v = self.vectors.get(key)
        if v is not None and v.numel() == n and v.device == device:
            return v, self.iters
        v = torch.randn(n, generator=torch.Generator().manual_seed(_START_SEED), dtype=torch.float32)
        return (v / v.norm()).to(device), self.first_iters


def param_partition_dim(param: torch.Tensor) -> int | None:
    """Megatron's TP partition dim of a parameter; None when it is not TP-split."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def _world(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def global_numel(local: torch.Tensor, partition_dim: int | None, group: dist.ProcessGroup | None) -> int:
    """Entry count of the whole tensor (equal shards)."""
    return local.numel() * (_world(group) if partition_dim is not None else 1)


def top_singular_value(A_local: torch.Tensor, v: torch.Tensor, iters: int,
                       group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_max estimate, its right singular vector estimate) of the row-sharded ``A``.

    ``A_local`` is this rank's row block; ``v`` (length ``A.size(1)``, unit norm) is replicated
    over ``group``. Lanczos on ``AᵀA`` from ``v``: each iteration is one product
    ``AᵀA·v = Σ_r A_rᵀ(A_r v)`` (one all-reduce of a vector), as in power iteration, but the
    estimate is the Rayleigh–Ritz value of the whole Krylov space the products span, which
    converges far faster when the top singular values are close (random matrices). The
    Krylov basis is fully re-orthogonalised and the Ritz value is computed from the
    projection ``Vᵀ(AᵀA V)`` itself, so it stays a lower bound of σ_max² even when the space
    is exhausted early. No host synchronisation inside the loop; tensors are returned.
    """
    basis, products = [v], []
    for step in range(iters):
        w = _all_reduce(A_local.t() @ (A_local @ basis[-1]), dist.ReduceOp.SUM, group)
        products.append(w)
        if step == iters - 1:
            break
        V = torch.stack(basis, dim=1)
        residual = w
        for _ in range(2):
            residual = residual - V @ (V.t() @ residual)
        beta = torch.linalg.vector_norm(residual)
        # A residual at round-off level cannot be orthonormalised: the Krylov space is exhausted
        # (or converged); continue with zero vectors, which add only zero rows to the projection.
        alive = beta > _EXHAUSTED * torch.linalg.vector_norm(w)
        basis.append(torch.where(alive, residual / beta.clamp_min(torch.finfo(w.dtype).tiny),
                                 torch.zeros_like(residual)))
    V = torch.stack(basis, dim=1)
    H = (V.t() @ torch.stack(products, dim=1)).double().cpu()
    theta, Y = torch.linalg.eigh((H + H.t()) / 2)
    ritz = V @ Y[:, -1].to(V)
    return theta[-1].clamp_min(0).sqrt().to(A_local), ritz / torch.linalg.vector_norm(ritz).clamp_min(
        torch.finfo(ritz.dtype).tiny)


def _gather_full(x: torch.Tensor, partition_dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    if _world(group) == 1:
        return x
    shards = [torch.empty_like(x) for _ in range(_world(group))]
    dist.all_gather(shards, x.contiguous(), group=group)
    return torch.cat(shards, dim=partition_dim)


def _sharded_vector_norms(x: torch.Tensor, partition_dim: int | None,
                          group: dist.ProcessGroup | None) -> dict[str, float]:
    g = group if partition_dim is not None else None
    sum_sq = _all_reduce(torch.linalg.vector_norm(x).square(), dist.ReduceOp.SUM, g)
    max_abs = _all_reduce(torch.linalg.vector_norm(x, ord=math.inf), dist.ReduceOp.MAX, g)
    return vector_norms_from_stats(VectorStats(global_numel(x, partition_dim, group), float(sum_sq),
                                               float(max_abs)))


def sharded_norms(local: torch.Tensor, partition_dim: int | None,
                  group: dist.ProcessGroup | None = None, *, state: PowerIterationState | None = None,
                  key: str = "", with_condition: bool = False) -> dict[str, float]:
    """The norms of :mod:`~disco_megatron.norms.definitions` of the whole tensor, from its shard.

    Every rank of ``group`` must call this (same order, same ``partition_dim``) for a split
    tensor; a replicated one (``partition_dim`` None) needs no communication. ``state``
    warm-starts σ_max under ``key`` (a cold start each call without it).
    """
    x = local.detach().float()
    if x.dim() == 1:
        return _sharded_vector_norms(x, partition_dim, group)
    if x.dim() != 2:
        raise ValueError(f"norms need a 1-D or 2-D tensor, got shape {tuple(x.shape)} for {key!r}")
    if partition_dim not in (None, 0, 1):
        raise ValueError(f"partition_dim must be 0, 1 or None, got {partition_dim!r} for {key!r}")
    g = group if partition_dim is not None else None
    t = _world(g)
    d_out, d_in = x.shape
    if partition_dim == 0:
        d_out *= t
    elif partition_dim == 1:
        d_in *= t
    A = x.t() if partition_dim == 1 else x
    a_rows_sq = torch.linalg.vector_norm(A, dim=1).square()
    # One SUM (A's partial column norms², then the sum of squares) and one MAX all-reduce.
    sums = _all_reduce(torch.cat([torch.linalg.vector_norm(A, dim=0).square(), a_rows_sq.sum().view(1)]),
                       dist.ReduceOp.SUM, g)
    maxes = _all_reduce(torch.stack([a_rows_sq.max(), torch.linalg.vector_norm(A, ord=math.inf)]),
                        dist.ReduceOp.MAX, g)
    sigma_max, sigma_min = _extreme_singular_values(x, A, partition_dim, g, state, key, with_condition)
    values = torch.stack([sigma_max, maxes[0], sums[:-1].max(), sums[-1], maxes[1]]).tolist()
    a_row, a_col = values[1], values[2]
    max_row_sq, max_col_sq = (a_col, a_row) if partition_dim == 1 else (a_row, a_col)
    return matrix_norms_from_stats(MatrixStats(
        d_out=d_out, d_in=d_in, sigma_max=values[0], max_row_sq=max_row_sq, max_col_sq=max_col_sq,
        sum_sq=values[3], max_abs=values[4], sigma_min=None if sigma_min is None else float(sigma_min)))


def _extreme_singular_values(x: torch.Tensor, A: torch.Tensor, partition_dim: int | None,
                             group: dist.ProcessGroup | None, state: PowerIterationState | None, key: str,
                             with_condition: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(σ_max, σ_min or None): exact from the gathered matrix with the condition number, else Lanczos."""
    if with_condition:
        singular = torch.linalg.svdvals(_gather_full(x, partition_dim or 0, group))
        return singular[0], singular[-1]
    state = state if state is not None else PowerIterationState()
    v, iters = state.start(key, A.size(1), A.device)
    sigma_max, v = top_singular_value(A, v, iters, group)
    if float(sigma_max) > 0:
        state.vectors[key] = v
    else:
        state.vectors.pop(key, None)  # a zero or non-finite matrix leaves no useful direction
    return sigma_max, None
