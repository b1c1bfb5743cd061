"""Norms of TP-sharded tensors from this rank's shards, without gathering them (docs/design.md §2).

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

Collectives are latency-bound (the vectors are small), so :func:`sharded_norms_many` batches
them over all tensors of a call: one SUM all-reduce (every partial column-norm² vector and sum
of squares, concatenated), one MAX all-reduce, and one all-reduce per Lanczos iteration of the
products of every matrix still iterating (each keeps its own basis and iteration count): 2 +
the largest iteration count in all, instead of 2 + iterations per tensor.
:func:`sharded_norms` is its one-tensor case.

Fused tensors (QKV, SwiGLU ``[gate | up]``) are measured as stored: every norm here is
invariant to the row order megatron uses for their shards.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
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

    The iteration is Lanczos (see :class:`_Lanczos`), power iteration's Krylov form.

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
        # Drawn on ``device`` by a generator of that device: the same vector on every rank of a
        # group (one seed, one device type), and no host->device copy.
        generator = torch.Generator(device=device).manual_seed(_START_SEED)
        v = torch.randn(n, generator=generator, dtype=torch.float32, device=device)
        return v / v.norm(), self.first_iters


def param_partition_dim(param: torch.Tensor) -> int | None:
    """Megatron's TP partition dim of a parameter; None when it is not TP-split."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def _world(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _all_reduce_parts(parts: Sequence[torch.Tensor], op: dist.ReduceOp,
                      group: dist.ProcessGroup | None) -> tuple[torch.Tensor, ...]:
    """``parts`` reduced elementwise over ``group`` with one collective (concatenated, then split)."""
    return _all_reduce(torch.cat(parts), op, group).split([p.numel() for p in parts])


def global_numel(local: torch.Tensor, partition_dim: int | None, group: dist.ProcessGroup | None) -> int:
    """Entry count of the whole tensor (equal shards)."""
    return local.numel() * (_world(group) if partition_dim is not None else 1)


class _Lanczos:
    """σ_max of one row-sharded ``A`` by Lanczos on ``AᵀA``, one product at a time.

    ``A_local`` is this rank's row block; ``v`` (length ``A.size(1)``, unit norm) is replicated
    over the TP group. Each iteration is one product ``AᵀA·v = Σ_r A_rᵀ(A_r v)``: this rank's
    term comes from :meth:`next_product_local`, the caller all-reduces it (for many matrices at
    once, :func:`_run_lanczos`) and hands the sum to :meth:`absorb`. As in power iteration, but the
    estimate is the Rayleigh–Ritz value of the whole Krylov space the products span, which
    converges far faster when the top singular values are close (random matrices). The Krylov
    basis is fully re-orthogonalised and the Ritz value is computed from the projection
    ``Vᵀ(AᵀA V)`` itself, so it stays a lower bound of σ_max² even when the space is exhausted
    early. No host synchronisation before :meth:`result`; tensors are returned.
    """

    def __init__(self, A_local: torch.Tensor, v: torch.Tensor, iters: int) -> None:
        self.A_local, self.iters = A_local, iters
        self.basis, self.products = [v], []

    @property
    def running(self) -> bool:
        return len(self.products) < self.iters

    def next_product_local(self) -> torch.Tensor:
        """This rank's term ``A_rᵀ(A_r v)`` of the next product, ``v`` the newest basis vector."""
        return self.A_local.t() @ (self.A_local @ self.basis[-1])

    def absorb(self, w: torch.Tensor) -> None:
        """Take the reduced product ``AᵀA v`` and, unless this was the last, extend the basis by it."""
        self.products.append(w)
        if not self.running:
            return
        V = torch.stack(self.basis, dim=1)
        residual = w
        for _ in range(2):
            residual = residual - V @ (V.t() @ residual)
        beta = torch.linalg.vector_norm(residual)
        # A residual at round-off level cannot be orthonormalised: the Krylov space is exhausted
        # (or converged); continue with zero vectors, which add only zero rows to the projection.
        alive = beta > _EXHAUSTED * torch.linalg.vector_norm(w)
        self.basis.append(torch.where(alive, residual / beta.clamp_min(torch.finfo(w.dtype).tiny),
                                      torch.zeros_like(residual)))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ_max estimate, its right singular vector estimate of ``A``, unit norm)."""
        V = torch.stack(self.basis, dim=1)
        H = (V.t() @ torch.stack(self.products, dim=1)).double().cpu()
        theta, Y = torch.linalg.eigh((H + H.t()) / 2)
        ritz = V @ Y[:, -1].to(V)
        return theta[-1].clamp_min(0).sqrt().to(self.A_local), ritz / torch.linalg.vector_norm(ritz).clamp_min(
            torch.finfo(ritz.dtype).tiny)


def _run_lanczos(solvers: Sequence[_Lanczos], group: dist.ProcessGroup | None) -> None:
    """Iterate every solver to its own count in lockstep: one all-reduce per iteration for all of
    them (the local products of those still running, concatenated). Every rank of ``group`` must
    pass the same matrices' solvers in the same order with the same counts."""
    while running := [s for s in solvers if s.running]:
        for solver, w in zip(running, _all_reduce_parts([s.next_product_local() for s in running],
                                                        dist.ReduceOp.SUM, group)):
            solver.absorb(w)


def _gather_full(x: torch.Tensor, partition_dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    if _world(group) == 1:
        return x
    shards = [torch.empty_like(x) for _ in range(_world(group))]
    dist.all_gather(shards, x.contiguous(), group=group)
    return torch.cat(shards, dim=partition_dim)


def _checked(key: str, local: torch.Tensor, partition_dim: int | None) -> torch.Tensor:
    """``local`` as fp32, after the checks (before any collective, so a bad input cannot hang)."""
    x = local.detach().float()
    if x.dim() not in (1, 2):
        raise ValueError(f"norms need a 1-D or 2-D tensor, got shape {tuple(x.shape)} for {key!r}")
    if x.dim() == 2 and partition_dim not in (None, 0, 1):
        raise ValueError(f"partition_dim must be 0, 1 or None, got {partition_dim!r} for {key!r}")
    return x


def sharded_norms(local: torch.Tensor, partition_dim: int | None,
                  group: dist.ProcessGroup | None = None, *, state: PowerIterationState | None = None,
                  key: str = "", with_condition: bool = False) -> dict[str, float]:
    """The norms of :mod:`~disco_megatron.norms.definitions` of the whole tensor, from its shard.

    Every rank of ``group`` must call this (same order, same ``partition_dim``) for a split
    tensor; a replicated one (``partition_dim`` None) needs no communication. ``state``
    warm-starts σ_max under ``key`` (a cold start each call without it). The one-tensor case of
    :func:`sharded_norms_many`.
    """
    return sharded_norms_many([(key, local, partition_dim)], group, state=state, with_condition=with_condition)[key]


def sharded_norms_many(items: Sequence[tuple[str, torch.Tensor, int | None]], group: dist.ProcessGroup | None,
                       *, state: PowerIterationState | None = None,
                       with_condition: bool = False) -> dict[str, dict[str, float]]:
    """:func:`sharded_norms` of every ``(key, local shard, partition_dim)``, by key, in order.

    The split tensors (partition_dim 0/1) share one SUM all-reduce, one MAX all-reduce and one
    all-reduce per Lanczos iteration over ``group``: every rank of it must pass the same split
    tensors in the same order (their replicated ones may differ: those need no communication).
    ``state`` warm-starts σ_max under each key. ``with_condition`` all-gathers each split matrix
    (exact SVD), one collective per matrix.
    """
    keys = [key for key, _, _ in items]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"sharded_norms_many: duplicate keys {duplicates}; each tensor needs its own key")
    checked = [(key, _checked(key, local, pdim), pdim) for key, local, pdim in items]
    state = state if state is not None else PowerIterationState()
    norms = {**_batch_norms([c for c in checked if c[2] is None], None, state, with_condition),
             **_batch_norms([c for c in checked if c[2] is not None], group, state, with_condition)}
    return {key: norms[key] for key in keys}


def _batch_norms(items: list[tuple[str, torch.Tensor, int | None]], group: dist.ProcessGroup | None,
                 state: PowerIterationState, with_condition: bool) -> dict[str, dict[str, float]]:
    """Norms of checked fp32 ``items``, every one reduced over ``group`` (None: no communication)."""
    if not items:
        return {}
    # A: the row-sharded view of each matrix (Wᵀ for partition_dim 1); a vector is its own view.
    views = [x.t() if x.dim() == 2 and pdim == 1 else x for _, x, pdim in items]
    sums, maxes = [], []
    for A in views:
        if A.dim() == 1:
            sums.append(torch.linalg.vector_norm(A).square().view(1))
            maxes.append(torch.linalg.vector_norm(A, ord=math.inf).view(1))
        else:
            # square().sum(0) and abs().amax(): vector_norm across rows or with ord=inf is ~5x slower on CPU.
            a_rows_sq = torch.linalg.vector_norm(A, dim=1).square()
            sums.append(torch.cat([A.square().sum(dim=0), a_rows_sq.sum().view(1)]))
            maxes.append(torch.stack([a_rows_sq.max(), A.abs().amax()]))
    sums = _all_reduce_parts(sums, dist.ReduceOp.SUM, group)
    maxes = _all_reduce_parts(maxes, dist.ReduceOp.MAX, group)
    matrices = [i for i, A in enumerate(views) if A.dim() == 2]
    extremes = dict(zip(matrices, _extreme_singular_values(
        [(items[i][0], items[i][1], views[i], items[i][2]) for i in matrices], group, state, with_condition)))
    rows = [[sums[i][0], maxes[i][0]] if A.dim() == 1 else
            [extremes[i][0], maxes[i][0], sums[i][:-1].max(), sums[i][-1], maxes[i][1], *extremes[i][1:]]
            for i, A in enumerate(views)]
    flat = iter(torch.stack([s for row in rows for s in row]).tolist())  # the one host transfer of values
    return {key: _norms_from_values(x, pdim, group, [next(flat) for _ in row])
            for (key, x, pdim), row in zip(items, rows)}


def _extreme_singular_values(matrices: list[tuple[str, torch.Tensor, torch.Tensor, int | None]],
                             group: dist.ProcessGroup | None, state: PowerIterationState,
                             with_condition: bool) -> list[list[torch.Tensor]]:
    """``[σ_max]`` of each ``(key, W shard, A shard, partition_dim)`` by Lanczos (warm-started from
    and saved to ``state``), or ``[σ_max, σ_min]`` exact from the gathered matrix with the
    condition number."""
    if with_condition:
        singular = [torch.linalg.svdvals(_gather_full(x, pdim or 0, group)) for _, x, _, pdim in matrices]
        return [[s[0], s[-1]] for s in singular]
    solvers = [_Lanczos(A, *state.start(key, A.size(1), A.device)) for key, _, A, _ in matrices]
    _run_lanczos(solvers, group)
    out = []
    for (key, *_), solver in zip(matrices, solvers):
        sigma_max, v = solver.result()
        if float(sigma_max) > 0:
            state.vectors[key] = v
        else:
            state.vectors.pop(key, None)  # a zero or non-finite matrix leaves no useful direction
        out.append([sigma_max])
    return out


def _norms_from_values(x: torch.Tensor, partition_dim: int | None, group: dist.ProcessGroup | None,
                       values: list[float]) -> dict[str, float]:
    """The norms of the whole tensor from its reduced statistics (``values``, as ``_batch_norms`` rows them)."""
    if x.dim() == 1:
        return vector_norms_from_stats(VectorStats(global_numel(x, partition_dim, group), values[0], values[1]))
    d_out, d_in = x.shape
    if partition_dim == 0:
        d_out *= _world(group)
    elif partition_dim == 1:
        d_in *= _world(group)
    sigma_max, a_row, a_col, sum_sq, max_abs, *sigma_min = values
    max_row_sq, max_col_sq = (a_col, a_row) if partition_dim == 1 else (a_row, a_col)
    return matrix_norms_from_stats(MatrixStats(
        d_out=d_out, d_in=d_in, sigma_max=sigma_max, max_row_sq=max_row_sq, max_col_sq=max_col_sq,
        sum_sq=sum_sq, max_abs=max_abs, sigma_min=sigma_min[0] if sigma_min else None))
