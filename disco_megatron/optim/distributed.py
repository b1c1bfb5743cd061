"""The distributed Scion step: storage layout -> compute layout -> storage layout.

Each rank holds its parameters' shards (storage layout, what megatron gave us) and a momentum
buffer with exactly the same sharding (fp32), updated locally (element-wise). To dualize, a
logical matrix must be in compute layout (whole) only for LMOs that are not local to its shard
(spectral always; bias_rms on a TP-sharded bias); row-wise maps (rownorm, sign, embedding) on
row-sharded vocab-parallel tensors are exact on the shard, so they and every replicated tensor
are dualized in place with zero communication.

The :class:`~disco_megatron.optim.plan.ExchangePlan` (pure, built by every rank alike) lists
the buckets of equal (lmo, shape, concat dim) matrices, so Newton–Schulz runs batched.
:class:`DistributedDualizer` checks once that every rank built the same plan, then runs it per
bucket in named stages. ``tp_mode``:

- ``owner`` (default, exact): :meth:`~DistributedDualizer.gather_to_owners` (one
  ``all_to_all`` brings each owner the TP pieces of its matrices) -> the owner dualizes each
  matrix once -> :meth:`~DistributedDualizer.scatter_to_shards` (a second ``all_to_all`` sends
  every rank back only its piece). Bytes per rank, averaged over the TP group: 2·(t−1)/t² of
  the matrices' bytes.
- ``duplicated`` (exact, the usual baseline): :meth:`~DistributedDualizer.start_all_gather`
  (one ``all_gather`` of the pieces) -> every TP rank dualizes every matrix ->
  :meth:`~DistributedDualizer.keep_own_pieces`. Bytes per rank: (t−1)/t of the matrices' bytes.
- ``local`` (approximation): every piece is dualized on its own, no communication. The
  spectral map of a row block is not the row block of the spectral map, so this is NOT
  Scion; it exists to measure what exactness costs.

``dp_mode``: ``replicated`` (each DP replica runs the above on momentum sharded like its
parameter; megatron DDP already all-reduced the grads, so replicas compute the same) or
``sharded`` (needs ``tp_mode=owner``): every logical matrix of the stage has one owner among its
TP×DP ranks, which alone holds the matrix's fp32 momentum and fp32 master (8 bytes per
parameter over TP·DP ranks, whatever the model dtypes). A step: check grads -> per bucket,
:meth:`~DistributedDualizer.gather_to_owners` on the GRADIENT pieces (from the owner replica's
TP ranks) -> the owner updates momentum, dualizes and steps its master -> one ``all_to_all``
over TP×DP sends every rank its piece of the new parameter in the model's dtype. Vocab rows
(row-local LMOs) are split into row blocks owned by the DP replicas of their TP rank: no gather,
then :meth:`~DistributedDualizer.share_row_blocks`. The arithmetic is the replicated mode's,
element for element, so both modes give bit-identical parameters.

Overlap (``overlap=True``, the default; :func:`overlap_buckets`): every stage that communicates
is split into ``start_*`` (copy the send buffer, issue the collective with ``async_op=True``,
return a :class:`Pending`) and :meth:`Pending.wait` (block, then unpack the received buffer).
Bucket i+1's gather is issued before bucket i's Newton–Schulz runs, and bucket i's scatter is
waited for only when ``MAX_IN_FLIGHT`` (2) newer scatters would be in flight, or at the end of
the step: the exchange of one bucket runs while another computes, and no rank holds more than
2 buckets' gathers and 2 buckets' scatters at once. Every rank issues the same collectives in the
same order as the sequential loop (``overlap=False``) and the arithmetic is unchanged, so both
give bit-identical results. In-place groups and row blocks stay synchronous.
Pipeline stages plan only their own parameters: no cross-stage communication.
"""
from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from disco_megatron.optim import comm
from disco_megatron.optim.comm import CommCounter
from disco_megatron.optim.layout import LogicalMatrix, ParamLayout
from disco_megatron.optim.lmo import dualize_many
from disco_megatron.optim.newton_schulz import NS_TORCH_DTYPES
from disco_megatron.optim.plan import Bucket, ExchangePlan, InPlace, PlannedMatrix, RowBlocks, build_exchange_plan
from disco_megatron.optim.scion import apply_update_, clip_coefficient, update_momentum_
from disco_megatron.scion_options import (
    CLIP_GRAD_DEFAULT,
    DEFAULTS,
    GROUP_DEFAULTS,
    check_clip_grad,
    check_option,
    ns_dtype_for,
)

# Momentum buffers and every exchanged tensor: fp32 whatever the parameters' dtype.
STATE_DTYPE = torch.float32
# Overlapped mode: buckets whose gather (and, apart, whose scatter) is issued and not yet waited for.
# Bounds the exchange buffers a rank holds at once; 2 lets one bucket's exchange run during another's NS.
MAX_IN_FLIGHT = 2

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class StageGroups:
    """Process groups this rank's optimizer talks over (None = the default world group).

    ``tp``: TP peers; ``dp``: DP replicas of this rank; ``tp_dp``: TP×DP ranks of this
    pipeline stage; ``world``: every rank of the job (grad checks must agree everywhere).
    """

    tp: dist.ProcessGroup | None = None
    dp: dist.ProcessGroup | None = None
    tp_dp: dist.ProcessGroup | None = None
    world: dist.ProcessGroup | None = None

    @classmethod
    def from_megatron(cls) -> "StageGroups":
        """The groups of megatron-core's ``parallel_state`` (must be initialised). Context-parallel ranks
        hold the same parameters and, after DDP's reduce over DP x CP, the same gradients: for the
        optimizer they are DP replicas, as for megatron's own optimizers."""
        from megatron.core import parallel_state as ps

        return cls(tp=ps.get_tensor_model_parallel_group(), dp=ps.get_data_parallel_group(with_context_parallel=True),
                   tp_dp=ps.get_tensor_and_data_parallel_group(with_context_parallel=True), world=dist.group.WORLD)


class GradCheck(NamedTuple):
    """Whether every rank's grads are finite, and the global grad norm (nan when not)."""

    finite: bool
    grad_norm: float


class StepResult(NamedTuple):
    """Whether the step was taken (False: skipped for a non-finite grad), and the grad norm."""

    stepped: bool
    grad_norm: float | None


def _common_device(params: Sequence[Tensor]) -> torch.device:
    """The one device of ``params``: every buffer and collective of the step lives there."""
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(f"DistributedScion: the parameters must share one device (the collectives run "
                         f"there), got {sorted(map(str, devices)) or 'no parameters'}; move the model "
                         "to one device before building the optimizer")
    return devices.pop()


def piece_of(tensor: Tensor, matrix: LogicalMatrix) -> Tensor:
    """This rank's piece of ``matrix``: its local row ranges of ``tensor``, concatenated."""
    parts = [tensor[a:b] for a, b in matrix.local_rows]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def write_piece(tensor: Tensor, matrix: LogicalMatrix, piece: Tensor, start: int = 0) -> None:
    """Write ``piece`` as rows [start, start + len(piece)) of this rank's piece of ``matrix``."""
    offset, stop = 0, start + piece.shape[0]
    for a, b in matrix.local_rows:
        lo, hi = max(start, offset), min(stop, offset + b - a)
        if lo < hi:
            tensor[a + lo - offset:a + hi - offset].copy_(piece[lo - start:hi - start])
        offset += b - a


def _bucket_dtype(bucket: Bucket, tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype a bucket's pieces of ``tensors`` travel in: promoted over its parameters' dtypes."""
    return functools.reduce(torch.promote_types, {tensors[e.param].dtype for e in bucket.entries})


class Pending(Generic[T]):
    """A stage whose collective may still be in flight: :meth:`wait` blocks on it, then unpacks the
    received buffers. Synchronous (``work`` None): unpacked at once, so the stage's whole cost lies
    in the call that started it."""

    def __init__(self, work: dist.Work | None, unpack: Callable[[], T]) -> None:
        self._work = work
        self._unpack = unpack
        self._value: tuple[T] | None = None if work is not None else (unpack(),)

    def then(self, fn: Callable[[T], U]) -> "Pending[U]":
        """The same collective, its result passed through ``fn`` once received."""
        if self._value is not None:
            value = fn(self._value[0])
            return Pending(None, lambda: value)
        return Pending(self._work, lambda: fn(self._unpack()))

    def wait(self) -> T:
        if self._value is None:
            assert self._work is not None
            self._work.wait()
            self._value = (self._unpack(),)
        return self._value[0]


def overlap_buckets(buckets: Sequence[Bucket], start_gather: Callable[[Bucket], Pending[list[Tensor]]],
                    compute: Callable[[Bucket, list[Tensor]], list[Tensor]],
                    start_scatter: Callable[[Bucket, list[Tensor]], Pending[None]]) -> None:
    """gather -> compute -> scatter of every bucket, pipelined: bucket i+1's gather is issued before
    bucket i computes, and a scatter is waited for only when ``MAX_IN_FLIGHT`` newer ones would be in
    flight, or at the end. Every rank issues the same collectives in the same order as the sequential
    loop and the arithmetic is the same: the results are bit-identical."""
    gathers: deque[Pending[list[Tensor]]] = deque()
    scatters: deque[Pending[None]] = deque()
    issued = 0
    for bucket in buckets:
        while len(gathers) < MAX_IN_FLIGHT and issued < len(buckets):
            gathers.append(start_gather(buckets[issued]))
            issued += 1
        results = compute(bucket, gathers.popleft().wait())
        if len(scatters) == MAX_IN_FLIGHT:
            scatters.popleft().wait()
        scatters.append(start_scatter(bucket, results))
    for pending in scatters:
        pending.wait()


class OwnedState(NamedTuple):
    """Sharded mode: what the owner of a logical matrix (or row block) holds, both fp32."""

    momentum: Tensor
    master: Tensor


class DistributedDualizer:
    """Runs an :class:`ExchangePlan`: dualize(momentum) of every parameter shard of this rank.

    Construction does one small ``all_gather`` over the stage's TP×DP ranks to check that all
    of them built the same plan (and to learn which group rank is which (TP, DP) coordinate);
    after that every call is collective over the exchange group (TP, or TP×DP when sharded).
    ``overlap``: the buckets' exchanges run asynchronously beside the other buckets' compute
    (:func:`overlap_buckets`); off, each stage finishes before the next starts (same results).
    """

    def __init__(self, plan: ExchangePlan, groups: StageGroups, device: torch.device,
                 counter: CommCounter | None = None, overlap: bool = True) -> None:
        if dist.get_world_size(groups.tp) != plan.tp_size:
            raise ValueError(f"the exchange plan is for TP {plan.tp_size}, the TP group has "
                             f"{dist.get_world_size(groups.tp)} ranks")
        self.plan = plan
        self.groups = groups
        self.device = device
        self.ns_dtype = NS_TORCH_DTYPES[plan.ns_dtype]
        self.counter = counter if counter is not None else CommCounter()
        self.overlap = overlap
        self.tp_rank = dist.get_rank(groups.tp)
        self.dp_rank = dist.get_rank(groups.dp)
        self._group = groups.tp_dp if plan.dp_mode == "sharded" else groups.tp
        self._slot_coords = self._verify_plan()
        self._me = dist.get_rank(self._group)

    def _verify_plan(self) -> list[tuple[int, int]]:
        """All-gather (fingerprint, tp rank, dp rank) over the stage; fail on any disagreement.

        Returns the (tp rank, dp rank) of each rank of the exchange group, by group rank.
        """
        mine = torch.tensor([self.plan.fingerprint, self.tp_rank, self.dp_rank], dtype=torch.int64,
                            device=self.device)
        gathered = comm.all_gather(self.counter, mine, self.groups.tp_dp)
        by_print: dict[int, list[int]] = {}
        for group_rank, t in enumerate(gathered):
            by_print.setdefault(int(t[0]), []).append(group_rank)
        if len(by_print) != 1:
            raise ValueError(
                "Scion optimizer schedules differ across the TP×DP ranks of this pipeline stage "
                f"(group ranks by fingerprint: {by_print}); every rank must build the same model "
                "config and the same --scion-* flags"
            )
        if self._group is self.groups.tp:
            return [(r, self.dp_rank) for r in range(self.plan.tp_size)]
        coords = [(int(t[1]), int(t[2])) for t in gathered]
        expected = [(s % self.plan.tp_size, s // self.plan.tp_size) for s in range(len(coords))]
        if coords != expected:
            raise ValueError(f"--scion-dp-mode sharded expects the TP×DP group in megatron's order (TP fastest), "
                             f"got (tp, dp) ranks {coords}; build the groups with megatron's parallel_state")
        return coords

    @property
    def me(self) -> int:
        """This rank's slot in the exchange group."""
        return self._me

    def owned_entries(self, bucket: Bucket) -> list[PlannedMatrix]:
        """The matrices of ``bucket`` this rank owns, in bucket order."""
        return [e for e, o in zip(bucket.entries, bucket.owners) if o == self._me]

    def __call__(self, momenta: Sequence[Tensor]) -> list[Tensor]:
        """Directions dualize(d), one per parameter, each in storage layout (shaped like its momentum)."""
        directions = [torch.zeros_like(m) for m in momenta]
        for group in self.plan.in_place:
            self.dualize_in_place(group, momenta, directions)
        compute = lambda bucket, wholes: self.dualize(bucket.lmo, wholes)  # noqa: E731
        if self.plan.tp_mode == "owner":
            self.run_buckets(lambda b: self.start_gather(b, momenta), compute,
                             lambda b, results: self.start_scatter(b, results, directions))
        else:
            self.run_buckets(lambda b: self.start_all_gather(b, momenta), compute,
                             lambda b, results: Pending(None, lambda: self.keep_own_pieces(b, results, directions)))
        return directions

    def run_buckets(self, start_gather: Callable[[Bucket], Pending[list[Tensor]]],
                    compute: Callable[[Bucket, list[Tensor]], list[Tensor]],
                    start_scatter: Callable[[Bucket, list[Tensor]], Pending[None]]) -> None:
        """Every bucket of the plan through gather -> compute -> scatter: pipelined with ``overlap``,
        else one stage after the other."""
        if self.overlap:
            overlap_buckets(self.plan.buckets, start_gather, compute, start_scatter)
            return
        for bucket in self.plan.buckets:
            start_scatter(bucket, compute(bucket, start_gather(bucket).wait())).wait()

    def dualize(self, lmo: str, matrices: list[Tensor]) -> list[Tensor]:
        """The LMO of each matrix (same-shape spectral ones batched), with the plan's NS settings."""
        return dualize_many(lmo, matrices, ns_backend=self.plan.ns_backend, ns_steps=self.plan.ns_steps,
                            ns_dtype=self.ns_dtype)

    def dualize_in_place(self, group: InPlace, momenta: Sequence[Tensor], directions: list[Tensor]) -> None:
        """Matrices whose piece is all their LMO needs: no communication."""
        results = self.dualize(group.lmo, [piece_of(momenta[e.param], e.matrix) for e in group.entries])
        for entry, result in zip(group.entries, results):
            write_piece(directions[entry.param], entry.matrix, result)

    def gather_to_owners(self, bucket: Bucket, tensors: Sequence[Tensor]) -> list[Tensor]:
        """:meth:`start_gather`, waited for."""
        return self.start_gather(bucket, tensors).wait()

    def start_gather(self, bucket: Bucket, tensors: Sequence[Tensor]) -> Pending[list[Tensor]]:
        """Storage -> compute layout: the whole matrices this rank owns, in bucket order.

        Each rank of the owner's replica sends the owner its piece of ``tensors`` (momenta, or
        in sharded mode grads and params; one ``all_to_all``); none when the bucket's matrices
        are whole on every TP rank.
        """
        if bucket.split == 1:
            owned = [piece_of(tensors[e.param], e.matrix) for e in self.owned_entries(bucket)]
            return Pending(None, lambda: owned)
        t, me, slots = bucket.split, self._me, self._slot_coords
        piece_shape = bucket.piece_shape
        numel = math.prod(piece_shape)
        my_dp = slots[me][1]
        sends: list[list[Tensor]] = [[] for _ in slots]
        for entry, owner in zip(bucket.entries, bucket.owners):
            if slots[owner][1] == my_dp:
                sends[owner].append(piece_of(tensors[entry.param], entry.matrix).reshape(-1))
        owned = bucket.owners.count(me)
        peers = [s for s, (_, dp) in enumerate(slots) if dp == my_dp]
        dtype = _bucket_dtype(bucket, tensors)
        received = self._all_to_all(sends, [owned * numel if s in peers else 0 for s in range(len(slots))], dtype)

        def wholes(parts: list[Tensor]) -> list[Tensor]:
            pieces_by_tp = {slots[s][0]: parts[s].view(owned, *piece_shape) for s in peers}
            return [torch.cat([pieces_by_tp[r][j] for r in range(t)], dim=bucket.concat_dim) for j in range(owned)]
        return received.then(wholes)

    def scatter_to_shards(self, bucket: Bucket, results: list[Tensor], targets: Sequence[Tensor]) -> None:
        """:meth:`start_scatter`, waited for."""
        self.start_scatter(bucket, results, targets).wait()

    def start_scatter(self, bucket: Bucket, results: list[Tensor], targets: Sequence[Tensor]) -> Pending[None]:
        """Compute -> storage layout: each owner sends every rank of the exchange group its piece
        of each result (one ``all_to_all``), written into that rank's ``targets`` (directions,
        or in sharded mode the parameters; in the targets' dtype, promoted over the bucket)."""
        slots = self._slot_coords
        piece_shape = bucket.piece_shape
        numel = math.prod(piece_shape)
        chunks = [r.chunk(bucket.split, dim=bucket.concat_dim) for r in results]
        sends = [[c[tp % bucket.split].reshape(-1) for c in chunks] for tp, _ in slots]
        dtype = _bucket_dtype(bucket, targets)
        received = self._all_to_all(sends, [bucket.owners.count(s) * numel for s in range(len(slots))], dtype)

        def write(parts: list[Tensor]) -> None:
            taken = [0] * len(slots)
            for entry, owner in zip(bucket.entries, bucket.owners):
                piece = parts[owner][taken[owner] * numel:(taken[owner] + 1) * numel]
                taken[owner] += 1
                write_piece(targets[entry.param], entry.matrix, piece.view(piece_shape))
        return received.then(write)

    def share_row_blocks(self, blocks: RowBlocks, mine: Tensor | None, targets: Sequence[Tensor]) -> None:
        """Sharded mode: the owners of a row-blocked matrix's piece send each other their block
        (``mine``, None where this rank owns none), written into ``targets`` (one ``all_to_all``
        over TP×DP; ranks of other TP pieces exchange their own blocks in the same call)."""
        entry, bounds = blocks.entry, blocks.bounds
        target = targets[entry.param]
        row_numel = math.prod(entry.matrix.shape[1:])
        sends = [[mine.reshape(-1)] if mine is not None and s in blocks.owners else []
                 for s in range(len(self._slot_coords))]
        counts = [0] * len(self._slot_coords)
        for j, owner in enumerate(blocks.owners):
            counts[owner] = (bounds[j + 1] - bounds[j]) * row_numel
        received = self._all_to_all(sends, counts, target.dtype).wait()
        for j, owner in enumerate(blocks.owners):
            write_piece(target, entry.matrix, received[owner].view(-1, *entry.matrix.shape[1:]), bounds[j])

    def start_all_gather(self, bucket: Bucket, momenta: Sequence[Tensor]) -> Pending[list[Tensor]]:
        """Storage -> compute layout on every TP rank: every whole matrix of the bucket (one ``all_gather``)."""
        piece_shape = bucket.piece_shape
        mine = torch.cat([piece_of(momenta[e.param], e.matrix).reshape(-1) for e in bucket.entries])
        gathered, work = comm.all_gather_start(self.counter, mine, self.groups.tp, async_op=self.overlap)

        def wholes() -> list[Tensor]:
            pieces = [g.view(len(bucket.entries), *piece_shape) for g in gathered]
            return [torch.cat([g[j] for g in pieces], dim=bucket.concat_dim) for j in range(len(bucket.entries))]
        return Pending(work, wholes)

    def keep_own_pieces(self, bucket: Bucket, results: list[Tensor], directions: list[Tensor]) -> None:
        """Compute -> storage layout without communication: this rank's piece of every result."""
        for entry, result in zip(bucket.entries, results):
            write_piece(directions[entry.param], entry.matrix,
                         result.chunk(self.plan.tp_size, dim=bucket.concat_dim)[self.tp_rank])

    def _all_to_all(self, sends: list[list[Tensor]], recv_counts: list[int],
                    dtype: torch.dtype) -> Pending[list[Tensor]]:
        """One all_to_all of ``dtype`` (asynchronous with ``overlap``): ``sends[d]`` goes to group
        rank d; once waited for, what each rank sent us. The send buffer is a fresh copy, so the
        caller may change ``sends``' sources while it is in flight."""
        pieces = [t.to(dtype) for s in sends for t in s]
        inp = torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype, device=self.device)
        out = torch.empty(sum(recv_counts), dtype=dtype, device=self.device)
        send_counts = [sum(t.numel() for t in s) for s in sends]
        work = comm.all_to_all_single(self.counter, out, inp, recv_counts, send_counts, self._group,
                                      async_op=self.overlap)
        return Pending(work, lambda: list(out.split(recv_counts)))


class DistributedScion(torch.optim.Optimizer):
    """Scion over parameter shards; equals the reference ``Scion`` on the unsharded model.

    Param-group keys: ``lr``, ``momentum`` (α, the weight of the new gradient), ``radius``,
    ``constrained``, ``weight_decay`` (other keys, e.g. megatron's ``max_lr``, are kept).
    The LMO of each parameter comes from its :class:`ParamLayout`. :meth:`step` is the one
    entry point (``ScionOptimizer`` wraps it for megatron). In sharded DP mode the parameters may
    be of any dtypes (the owners keep fp32 masters, ``owned``) and ``self.state`` stays empty.
    ``overlap``: pipeline the buckets' exchanges with their Newton–Schulz (same results; off only
    to measure what overlap saves, as ``benchmarks/overlap.py`` does).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 layouts: Mapping[Tensor, ParamLayout], groups: StageGroups, *,
                 tp_mode: str = DEFAULTS.tp_mode, dp_mode: str = DEFAULTS.dp_mode,
                 ns_backend: str = DEFAULTS.ns_backend, ns_steps: int = DEFAULTS.ns_steps,
                 ns_dtype: str | None = DEFAULTS.ns_dtype, clip_grad: float = CLIP_GRAD_DEFAULT, norm_mask: Mapping[Tensor, bool] | None = None,
                 overlap: bool = True, **defaults: Any) -> None:
        super().__init__(params, {**GROUP_DEFAULTS, **defaults})
        check_clip_grad(clip_grad)
        check_option("ns_dtype", ns_dtype)
        self.clip_grad = clip_grad
        self._params = [p for g in self.param_groups for p in g["params"]]
        self.device = _common_device(self._params)
        missing = [tuple(p.shape) for p in self._params if p not in layouts]
        if missing:
            raise ValueError(f"DistributedScion: no layout for parameter(s) of shape {missing}")
        self.layouts = [layouts[p] for p in self._params]
        for p, layout in zip(self._params, self.layouts):
            if tuple(p.shape) != layout.local_shape:
                raise ValueError(f"{layout.name}: parameter shape {tuple(p.shape)} does not match "
                                 f"its layout {layout.local_shape}")
        self.groups = groups
        self.counter = CommCounter()
        self.sharded = dp_mode == "sharded"
        self.plan = build_exchange_plan(self.layouts, tp_size=dist.get_world_size(groups.tp),
                                        dp_size=dist.get_world_size(groups.dp), tp_rank=dist.get_rank(groups.tp),
                                        tp_mode=tp_mode, dp_mode=dp_mode,
                                        ns_backend=ns_backend, ns_steps=ns_steps,
                                        ns_dtype=ns_dtype_for(ns_dtype, self.device.type))
        self.dualizer = DistributedDualizer(self.plan, groups, self.device, self.counter, overlap=overlap)
        self._group_of = [g for g in self.param_groups for _ in g["params"]]
        self.owned: dict[str, OwnedState] = {}  # sharded mode: matrix key -> this owner's state
        self._owned_ready = False
        tp_rank = dist.get_rank(groups.tp)
        self._norm_mask = [
            norm_mask[p] if norm_mask is not None else (layout.partition_dim is not None or tp_rank == 0)
            for p, layout in zip(self._params, self.layouts)
        ]

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor | None] | None = None) -> StepResult:  # type: ignore[override]
        """One Scion step: check grads -> clip -> momentum -> exchange -> update.

        ``grads``: one per parameter (default: each parameter's ``.grad``; megatron's fp32
        ``main_grad`` of a bf16 parameter comes this way in sharded mode).

        The skip rule: a non-finite grad on any rank skips the step on every rank (parameters and
        momentum unchanged, ``stepped`` False); a missing grad raises on every rank. With
        ``clip_grad`` > 0 the gradients enter the momentum scaled as megatron-core's
        ``clip_grad_by_total_norm_fp32`` scales them (the grads themselves are left as they are);
        the returned grad norm is the one before clipping, as megatron reports it.
        """
        self.counter.start_step()
        grads = [p.grad for p in self._params] if grads is None else list(grads)
        check = self.check_grads(grads)
        if not check.finite:
            return StepResult(False, None)
        scale = clip_coefficient(check.grad_norm, self.clip_grad)
        if self.sharded:
            self.step_owners(grads, scale)
        else:
            self.update_params(self.dualizer(self.update_momenta(grads, scale)))
        return StepResult(True, check.grad_norm)

    def step_owners(self, grads: Sequence[Tensor], grad_scale: float) -> None:
        """Sharded mode, bucket by bucket: grads to owners -> owners update -> new param pieces to every rank."""
        self.init_state()
        dualizer = self.dualizer
        dualizer.run_buckets(
            lambda b: dualizer.start_gather(b, grads),
            lambda b, owned_grads: self._update_owned(b.lmo, dualizer.owned_entries(b), owned_grads, grad_scale),
            lambda b, new: dualizer.start_scatter(b, new, self._params))
        for blocks in self.plan.row_blocks:
            rows = blocks.rows_of(self.dualizer.me)
            new = None if rows is None else self._update_owned(
                blocks.lmo, [blocks.entry], [piece_of(grads[blocks.entry.param], blocks.entry.matrix)[rows[0]:rows[1]]],
                grad_scale)[0]
            self.dualizer.share_row_blocks(blocks, new, self._params)

    def _update_owned(self, lmo: str, entries: Sequence[PlannedMatrix], grads: Sequence[Tensor],
                      grad_scale: float) -> list[Tensor]:
        """The owner's momentum, dualize and master update of ``entries``; their new values in the params' dtype."""
        states = [self.owned[e.matrix.key] for e in entries]
        groups = [self._group_of[e.param] for e in entries]
        for state, grad, g in zip(states, grads, groups):
            update_momentum_(state.momentum, grad, g["momentum"], grad_scale)
        directions = self.dualizer.dualize(lmo, [state.momentum for state in states])
        for state, direction, g in zip(states, directions, groups):
            apply_update_(state.master, direction, lr=g["lr"], radius=g["radius"], constrained=g["constrained"],
                          weight_decay=g["weight_decay"])
        return [state.master.to(self._params[e.param].dtype) for state, e in zip(states, entries)]

    @torch.no_grad()
    def gather_masters(self, keep: Collection[str] = ()) -> None:
        """Sharded mode: the owners (re)take their fp32 masters from the parameters, except those
        of the matrix keys in ``keep``; zero momentum where new (collective over TP×DP: every
        rank calls it)."""
        me = self.dualizer.me
        for bucket in self.plan.buckets:
            for entry, whole in zip(self.dualizer.owned_entries(bucket),
                                    self.dualizer.gather_to_owners(bucket, self._params)):
                if entry.matrix.key not in keep:
                    self._own(entry.matrix.key, whole)
        for blocks in self.plan.row_blocks:
            rows = blocks.rows_of(me)
            if rows is not None and blocks.entry.matrix.key not in keep:
                self._own(blocks.entry.matrix.key,
                          piece_of(self._params[blocks.entry.param], blocks.entry.matrix)[rows[0]:rows[1]])
        self._owned_ready = True

    def _own(self, key: str, value: Tensor) -> None:
        if key in self.owned:
            self.owned[key].master.copy_(value)
        else:
            master = value.to(dtype=STATE_DTYPE, device=self.device, copy=True)
            self.owned[key] = OwnedState(torch.zeros_like(master), master)

    @torch.no_grad()
    def write_masters_to_params(self) -> None:
        """Sharded mode: every rank's parameters from the owners' masters (collective over TP×DP)."""
        self._scatter_from_owners(
            lambda lmo, entries: [self.owned[e.matrix.key].master.to(self._params[e.param].dtype) for e in entries],
            self._params)

    def _scatter_from_owners(self, values: Callable[[str, Sequence[PlannedMatrix]], list[Tensor]],
                             targets: Sequence[Tensor]) -> None:
        """Sharded mode: every rank's pieces of ``targets`` from ``values(lmo, entries)``, which each owner
        computes for the matrices (and row blocks) it owns (collective over TP×DP)."""
        for bucket in self.plan.buckets:
            self.dualizer.scatter_to_shards(bucket, values(bucket.lmo, self.dualizer.owned_entries(bucket)), targets)
        for blocks in self.plan.row_blocks:
            mine = values(blocks.lmo, [blocks.entry])[0] if blocks.rows_of(self.dualizer.me) is not None else None
            self.dualizer.share_row_blocks(blocks, mine, targets)

    def check_grads(self, grads: Sequence[Tensor | None]) -> GradCheck:
        """Finiteness and global grad norm with one all-reduce over ``world``.

        Replicated tensors count once per TP group (``norm_mask``), DP replicas are divided
        out. A missing grad raises on every rank (the flag travels in the same all-reduce). The
        statistics live on the parameters' device; reading them is the step's one device->host
        copy (three numbers).
        """
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        missing = []
        for p, grad, layout, counted in zip(self._params, grads, self.layouts, self._norm_mask):
            if grad is None or grad.shape != p.shape:
                got = "none" if grad is None else f"shape {tuple(grad.shape)}"
                missing.append(f"{layout.name} (grad {got}, parameter {tuple(p.shape)})")
                continue
            stats[1] += (~torch.isfinite(grad)).sum()
            if counted:
                stats[0] += grad.double().square().sum()
        stats[2] = len(missing)
        comm.all_reduce(self.counter, stats, self.groups.world)
        sum_squares, non_finite, lacking = stats.tolist()
        if lacking > 0:
            raise ValueError(
                "Scion step: every parameter handed to the optimizer needs a gradient of its "
                f"shape; {'here: ' + ', '.join(missing) if missing else 'another rank lacks one'}"
                " (freeze unused parameters with requires_grad=False)"
            )
        if non_finite > 0:
            return GradCheck(False, math.nan)
        return GradCheck(True, math.sqrt(sum_squares / dist.get_world_size(self.groups.dp)))

    def update_momenta(self, grads: Sequence[Tensor], grad_scale: float = 1.0) -> list[Tensor]:
        """Replicated mode: d ← (1−α)·d + α·s·g for every parameter (fp32, sharded like it; s:
        the clip coefficient, 1 without clipping); returns the buffers."""
        self.init_state()
        for p, grad, group in zip(self._params, grads, self._group_of):
            update_momentum_(self.state[p]["momentum_buffer"], grad, group["momentum"], grad_scale)
        return [self.state[p]["momentum_buffer"] for p in self._params]

    def update_params(self, directions: Sequence[Tensor]) -> None:
        """W ← W − lr·ρ·direction (with weight decay / the constrained rule) for every parameter."""
        direction_of = {id(p): d for p, d in zip(self._params, directions)}
        for g in self.param_groups:
            for p in g["params"]:
                apply_update_(p, direction_of[id(p)], lr=g["lr"], radius=g["radius"],
                              constrained=g["constrained"], weight_decay=g["weight_decay"])

    def init_state(self) -> None:
        """Create zero momentum for every parameter (checkpoint loading needs the tensors); in
        sharded mode the owners' state, once (collective: every rank calls it)."""
        if self.sharded:
            if not self._owned_ready:
                self.gather_masters()
            return
        for p in self._params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, dtype=STATE_DTYPE)

    def comm_stats(self) -> dict[str, object]:
        """Bytes sent/received by this rank per collective kind, last step and total."""
        return self.counter.stats()

    @torch.no_grad()
    def directions(self) -> list[Tensor]:
        """dualize(d) of every parameter from the current momentum, in storage layout (fp32): the
        direction the last step applied, for the norm statistics (collective in both modes)."""
        self.init_state()
        if not self.sharded:
            return self.dualizer([self.state[p]["momentum_buffer"] for p in self._params])
        out = [torch.zeros_like(p, dtype=STATE_DTYPE) for p in self._params]
        self._scatter_from_owners(
            lambda lmo, entries: self.dualizer.dualize(lmo, [self.owned[e.matrix.key].momentum for e in entries]), out)
        return out

    def state_dict(self) -> dict[str, Any]:
        """torch's, plus (sharded mode) the owners' ``owned`` state by matrix key."""
        state = super().state_dict()
        if self.sharded:
            state["owned"] = {k: {"momentum_buffer": s.momentum, "fp32_param": s.master} for k, s in self.owned.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's; in sharded mode the owners' state too (same plan only: the caller checks the
        fingerprint). The parameters are not touched: see :meth:`write_masters_to_params`."""
        state_dict = dict(state_dict)
        owned = state_dict.pop("owned", {})
        super().load_state_dict(state_dict)
        if self.sharded:
            self.init_state()
            if set(owned) != set(self.owned):
                raise ValueError("Scion sharded optimizer state: the saved owner state does not match this "
                                 "rank's plan; load it through a distributed checkpoint (--ckpt-format torch_dist)")
            for key, saved in owned.items():
                self.owned[key].momentum.copy_(saved["momentum_buffer"])
                self.owned[key].master.copy_(saved["fp32_param"])
