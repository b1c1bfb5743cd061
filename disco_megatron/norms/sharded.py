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
  communication, the Rayleigh–Ritz value of all of them instead of the last one), run until
  its residual bound is at most ``PowerIterationState.tol`` (default 1e-4; capped at
  ``max_iters`` products); the achieved bound is returned as ``sigma_max_rel_bound``. The
  residual bounds the distance to the *nearest* singular value: when the top of the spectrum is
  flat (a spectral-LMO update, all singular values near 1) an estimate can meet a bound of 1e-3
  and still be 1e-3 below σ_max, hence a default 10x tighter than the 1e-3 accuracy asked of it.
  ``v`` is W's right singular vector for partition_dim 0/None and its left one for
  partition_dim 1. The estimate never exceeds σ_max;
  :class:`PowerIterationState` keeps ``v`` per tensor so later calls warm-start and few
  iterations suffice while the matrix changes slowly.
- Small matrices (smaller dim ≤ ``PowerIterationState.exact_max_dim``, default 512) and, with
  ``with_condition=True`` (σ_min, which Lanczos on the top end does not give), every matrix are
  exact instead: each is gathered to one TP rank only, its owner (the rank the optimizer's
  plan has dualize it, :mod:`~disco_megatron.norms.owners`), which runs its SVD; one
  all-reduce (2 values per matrix, all matrices at once) shares the results.

Collectives are latency-bound (the vectors are small), so :func:`sharded_norms_many` batches
them over all tensors of a call: one SUM all-reduce (every partial column-norm² vector and sum
of squares, concatenated), one MAX all-reduce, and one all-reduce per Lanczos iteration of the
products of every matrix still iterating (each keeps its own basis and iteration count): 2 +
the largest iteration count in all, instead of 2 + iterations per tensor; exact matrices add
one all_to_all (every owner's pieces) and one all-reduce in all.
:func:`sharded_norms` is its one-tensor case.

Every norm here is invariant to the row order of the shards' concatenation, so a logical
matrix's piece (the rows of q, k or v of a fused QKV shard, :mod:`~disco_megatron.norms.matrices`)
is measured like any row-sharded tensor.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from disco_megatron.norms.definitions import (
    SIGMA_BOUND,
    MatrixStats,
    VectorStats,
    matrix_norms_from_stats,
    vector_norms_from_stats,
)
from disco_megatron.norms.owners import svd_owners

_START_SEED = 20251003
_EXHAUSTED = 1e-4  # relative residual below which fp32 Lanczos stops growing its basis


@dataclass
class PowerIterationState:
    """σ_max accuracy and warm starts: the last replicated singular vector of each tensor, by key.

    A matrix whose smaller full dim is at most ``exact_max_dim`` gets an exact SVD on one TP rank
    (:func:`_exact_extremes`): cheaper than Lanczos there, whose cost is iterations (up to
    ``max_iters``, each with a host synchronisation), and a spectral-LMO update's flat spectrum
    needs many. Larger ones run Lanczos (see :class:`_Lanczos`), power iteration's Krylov form,
    until its residual bound on σ_max is at most ``tol`` (relative), or ``max_iters`` products; a
    tensor seen before starts from its stored vector, a new one from a fixed random start
    (identical on every TP rank).
    """

    tol: float = 1e-4
    max_iters: int = 100
    exact_max_dim: int = 512
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.tol < 1 or self.max_iters < 1:
            raise ValueError(f"need 0 < tol < 1 and max_iters >= 1 (got tol={self.tol}, max_iters={self.max_iters})")

    def start(self, key: str, n: int, device: torch.device) -> torch.Tensor:
        """The start vector for ``key`` (length ``n``)."""
        v = self.vectors.get(key)
        if v is not None and v.numel() == n and v.device == device:
            return v
        # Drawn on ``device`` by a generator of that device: the same vector on every rank of a
        # group (one seed, one device type), and no host->device copy.
        generator = torch.Generator(device=device).manual_seed(_START_SEED)
        v = torch.randn(n, generator=generator, dtype=torch.float32, device=device)
        return v / v.norm()


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
    """σ_max of one row-sharded ``A`` by Lanczos on ``AᵀA``, one product at a time, to a tolerance.

    ``A_local`` is this rank's row block; ``v`` (length ``A.size(1)``, unit norm) is replicated
    over the TP group. Each iteration is one product ``AᵀA·v = Σ_r A_rᵀ(A_r v)``: this rank's
    term comes from :meth:`next_product_local`, the caller all-reduces it (for many matrices at
    once, :func:`_run_lanczos`) and hands the sum to :meth:`absorb`. The estimate is the largest
    Rayleigh–Ritz value θ of the Krylov space the products span (fully re-orthogonalised basis
    V, products P = AᵀA·V, projection VᵀP), a lower bound of σ_max². Its residual
    ``r = ‖P y − θ V y‖`` (y: θ's Ritz coefficients) bounds the distance from θ to an eigenvalue
    of AᵀA: ``|λ − θ| ≤ r``, hence ``|σ − √θ| ≤ r/√θ``; iteration stops once that relative bound
    ``r/θ`` is at most ``tol``, after ``max_iters`` products, or when the Krylov space is
    exhausted (then r is round-off). Every rank computes the same replicated values, so all
    stop together. One host synchronisation per product (the small eigenproblem).
    """

    def __init__(self, A_local: torch.Tensor, v: torch.Tensor, tol: float, max_iters: int) -> None:
        self.A_local, self.tol, self.max_iters = A_local, tol, max_iters
        self.basis, self.products = [v], []
        self.running = True
        self.theta, self.bound, self.ritz = 0.0, math.inf, v

    def next_product_local(self) -> torch.Tensor:
        """This rank's term ``A_rᵀ(A_r v)`` of the next product, ``v`` the newest basis vector."""
        return self.A_local.t() @ (self.A_local @ self.basis[-1])

    def absorb(self, w: torch.Tensor) -> None:
        """Take the reduced product ``AᵀA v``, update the estimate and its bound, extend the basis."""
        self.products.append(w)
        V, P = torch.stack(self.basis, dim=1), torch.stack(self.products, dim=1)
        H = (V.t() @ P).double().cpu()
        theta, Y = torch.linalg.eigh((H + H.t()) / 2)
        y = Y[:, -1].to(V)
        self.theta = max(float(theta[-1]), 0.0)
        ritz = V @ y
        self.ritz = ritz / torch.linalg.vector_norm(ritz).clamp_min(torch.finfo(ritz.dtype).tiny)
        residual_norm = float(torch.linalg.vector_norm(P @ y - self.theta * ritz))
        self.bound = residual_norm / self.theta if self.theta > 0 else 0.0
        if self.bound <= self.tol or len(self.products) >= self.max_iters:
            self.running = False
            return
        residual = w
        for _ in range(2):
            residual = residual - V @ (V.t() @ residual)
        beta = torch.linalg.vector_norm(residual)
        if float(beta) <= _EXHAUSTED * float(torch.linalg.vector_norm(w)):
            self.running = False  # the Krylov space is exhausted: θ is exact up to round-off
            return
        self.basis.append(residual / beta)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(σ_max estimate, its right singular vector estimate of ``A``, relative error bound)."""
        return torch.tensor(math.sqrt(self.theta), dtype=self.A_local.dtype, device=self.A_local.device), \
            self.ritz, self.bound


def _run_lanczos(solvers: Sequence[_Lanczos], group: dist.ProcessGroup | None) -> None:
    """Iterate every solver to its own count in lockstep: one all-reduce per iteration for all of
    them (the local products of those still running, concatenated). Every rank of ``group`` must
    pass the same matrices' solvers in the same order with the same counts."""
    while running := [s for s in solvers if s.running]:
        for solver, w in zip(running, _all_reduce_parts([s.next_product_local() for s in running],
                                                        dist.ReduceOp.SUM, group)):
            solver.absorb(w)


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
                       with_condition: bool = False, owners: Mapping[str, int] | None = None
                       ) -> dict[str, dict[str, float]]:
    """:func:`sharded_norms` of every ``(key, local shard, partition_dim)``, by key, in order.

    The split tensors (partition_dim 0/1) share one SUM all-reduce, one MAX all-reduce and one
    all-reduce per Lanczos iteration over ``group``: every rank of it must pass the same split
    tensors in the same order (their replicated ones may differ: those need no communication).
    ``state`` warm-starts σ_max under each key and sets its tolerance. ``with_condition``: exact
    σ_max and σ_min of every matrix. An exact split matrix's SVD runs on one TP rank:
    ``owners[key]`` (the optimizer's owner, :mod:`~disco_megatron.norms.owners`), else one
    :func:`~disco_megatron.norms.owners.svd_owners` picks by the plan's balancing rule.
    """
    keys = [key for key, _, _ in items]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"sharded_norms_many: duplicate keys {duplicates}; each tensor needs its own key")
    checked = [(key, _checked(key, local, pdim), pdim) for key, local, pdim in items]
    state = state if state is not None else PowerIterationState()
    owners = owners if owners is not None else {}
    norms = {**_batch_norms([c for c in checked if c[2] is None], None, state, with_condition, owners),
             **_batch_norms([c for c in checked if c[2] is not None], group, state, with_condition, owners)}
    return {key: norms[key] for key in keys}


def _batch_norms(items: list[tuple[str, torch.Tensor, int | None]], group: dist.ProcessGroup | None,
                 state: PowerIterationState, with_condition: bool,
                 owners: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """Norms of checked fp32 ``items``, every one reduced over ``group`` (None: no communication)."""
    if not items:
        return {}
    # A: the row-sharded view of each matrix (Wᵀ for partition_dim 1); a vector is its own view.
    views = [x.t() if x.dim() == 2 and pdim == 1 else x for _, x, pdim in items]
    sums, maxes = [], []
    for A in views:
        if A.dim() == 1:
            sums.append(torch.linalg.vector_norm(A).square().view(1))
            # min|b| for diag(b)'s condition number rides the MAX all-reduce as -min|b|.
            maxes.append(torch.stack([A.abs().amax(), -A.abs().amin()]) if with_condition else A.abs().amax().view(1))
        else:
            # square().sum(0) and abs().amax(): vector_norm across rows or with ord=inf is ~5x slower on CPU.
            a_rows_sq = torch.linalg.vector_norm(A, dim=1).square()
            sums.append(torch.cat([A.square().sum(dim=0), a_rows_sq.sum().view(1)]))
            maxes.append(torch.stack([a_rows_sq.max(), A.abs().amax()]))
    sums = _all_reduce_parts(sums, dist.ReduceOp.SUM, group)
    maxes = _all_reduce_parts(maxes, dist.ReduceOp.MAX, group)
    matrices = [i for i, A in enumerate(views) if A.dim() == 2]
    extremes = dict(zip(matrices, _extreme_singular_values(
        [(items[i][0], items[i][1], views[i], items[i][2]) for i in matrices], group, state, with_condition,
        owners)))
    rows = [[sums[i][0], *maxes[i]] if A.dim() == 1 else
            [maxes[i][0], sums[i][:-1].max(), sums[i][-1], maxes[i][1], *extremes[i]]
            for i, A in enumerate(views)]
    flat = iter(torch.stack([s for row in rows for s in row]).tolist())  # the one host transfer of values
    return {key: _norms_from_values(x, pdim, group, [next(flat) for _ in row])
            for (key, x, pdim), row in zip(items, rows)}


def _extreme_singular_values(matrices: list[tuple[str, torch.Tensor, torch.Tensor, int | None]],
                             group: dist.ProcessGroup | None, state: PowerIterationState,
                             with_condition: bool, owners: Mapping[str, int]) -> list[list[torch.Tensor]]:
    """``[σ_max, its relative error bound]`` of each ``(key, W shard, A shard, partition_dim)``: by
    Lanczos (warm-started from and saved to ``state``), or exact (bound 0, :func:`_exact_extremes`)
    for a matrix no larger than ``state.exact_max_dim`` in its smaller dim; with the condition
    number every matrix is exact and gets ``σ_min`` appended. ``owners``: the planned SVD rank of
    split matrices (the others are balanced by :func:`~disco_megatron.norms.owners.svd_owners`)."""
    world = _world(group)
    exact = [i for i, (_, _, A, pdim) in enumerate(matrices)
             if with_condition or min(A.size(0) * (world if pdim is not None else 1), A.size(1)) <= state.exact_max_dim]
    out = {i: values if with_condition else values[:2]
           for i, values in zip(exact, _exact_extremes([matrices[i] for i in exact], group, svd_owners(
               [(matrices[i][0], matrices[i][2].size(0) * world, matrices[i][2].size(1)) for i in exact],
               owners, world), with_condition))}
    iterated = [i for i in range(len(matrices)) if i not in out]
    solvers = [_Lanczos(matrices[i][2], state.start(matrices[i][0], matrices[i][2].size(1), matrices[i][2].device),
                        state.tol, state.max_iters) for i in iterated]
    _run_lanczos(solvers, group)
    for i, solver in zip(iterated, solvers):
        sigma_max, v, bound = solver.result()
        if float(sigma_max) > 0:
            state.vectors[matrices[i][0]] = v
        else:
            state.vectors.pop(matrices[i][0], None)  # a zero or non-finite matrix leaves no useful direction
        out[i] = [sigma_max, torch.tensor(bound, dtype=sigma_max.dtype, device=sigma_max.device)]
    return [out[i] for i in range(len(matrices))]


def _exact_extremes(matrices: list[tuple[str, torch.Tensor, torch.Tensor, int | None]],
                    group: dist.ProcessGroup | None, owners: Mapping[str, int],
                    with_condition: bool) -> list[list[torch.Tensor]]:
    """Exact ``[σ_max, 0, σ_min]`` of each matrix, each SVD on its owner only (:mod:`~disco_megatron.norms.owners`).

    One ``all_to_all`` brings every owner the pieces of its matrices (nothing goes to any other
    rank), each owner runs one SVD per matrix it owns, and one SUM all-reduce of the 2 values per
    matrix (zeros from non-owners) gives every rank all of them: 2 collectives per call whatever
    the matrix count. Without ``group`` every matrix is whole here (its SVD runs here).
    ``with_condition``: the SVD runs in float64, since fp32's error on σ_min is ~1e-7·σ_max, i.e.
    ~1e-7·κ relative (1.5e-4 measured on a κ≈1e4 matrix of a 4-step run); σ_max alone is accurate in fp32.
    """
    if not matrices:
        return []
    world = _world(group)
    rank = dist.get_rank(group) if world > 1 else 0
    owner = [owners[key] for key, _, _, _ in matrices]
    views = [A.contiguous() for _, _, A, _ in matrices]
    mine = [i for i in range(len(matrices)) if owner[i] == rank]
    if world > 1:
        by_owner = sorted(range(len(views)), key=owner.__getitem__)  # grouped by destination, in order
        send_counts = [sum(views[i].numel() for i in by_owner if owner[i] == r) for r in range(world)]
        numel = sum(views[i].numel() for i in mine)
        received = views[0].new_empty(world * numel)
        dist.all_to_all_single(received, torch.cat([views[i].reshape(-1) for i in by_owner]), [numel] * world,
                               send_counts, group=group)
        by_rank = [r.split([views[i].numel() for i in mine]) for r in received.split([numel] * world)]
        wholes = {i: torch.cat([by_rank[r][j].view(views[i].shape) for r in range(world)])
                  for j, i in enumerate(mine)}
    else:
        wholes = {i: views[i] for i in mine}
    dtype = torch.float64 if with_condition else views[0].dtype
    values = [torch.zeros(2, dtype=dtype, device=A.device) for A in views]
    for i, W in wholes.items():
        singular = torch.linalg.svdvals(W.to(dtype))
        values[i] = torch.stack([singular[0], singular[-1]])
    values = _all_reduce_parts(values, dist.ReduceOp.SUM, group)
    return [[v[0], torch.zeros_like(v[0]), v[1]] for v in values]


def _norms_from_values(x: torch.Tensor, partition_dim: int | None, group: dist.ProcessGroup | None,
                       values: list[float]) -> dict[str, float]:
    """The norms of the whole tensor from its reduced statistics (``values``, as ``_batch_norms`` rows them).

    A matrix's norms include ``sigma_max_rel_bound``: the bound on σ_max's relative error (0 when exact).
    """
    if x.dim() == 1:
        sum_sq, max_abs, *neg_min = values
        return vector_norms_from_stats(VectorStats(global_numel(x, partition_dim, group), sum_sq, max_abs,
                                                   -neg_min[0] if neg_min else None))
    d_out, d_in = x.shape
    if partition_dim == 0:
        d_out *= _world(group)
    elif partition_dim == 1:
        d_in *= _world(group)
    a_row, a_col, sum_sq, max_abs, sigma_max, bound, *sigma_min = values
    max_row_sq, max_col_sq = (a_col, a_row) if partition_dim == 1 else (a_row, a_col)
    norms = matrix_norms_from_stats(MatrixStats(
        d_out=d_out, d_in=d_in, sigma_max=sigma_max, max_row_sq=max_row_sq, max_col_sq=max_col_sq,
        sum_sq=sum_sq, max_abs=max_abs, sigma_min=sigma_min[0] if sigma_min else None))
    return {**norms, SIGMA_BOUND: bound}
