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
- ``duplicated`` (exact, the usual baseline): :meth:`~DistributedDualizer.all_gather_wholes`
  (one ``all_gather`` of the pieces) -> every TP rank dualizes every matrix ->
  :meth:`~DistributedDualizer.keep_own_pieces`. Bytes per rank: (t−1)/t of the matrices' bytes.
- ``local`` (approximation): every piece is dualized on its own, no communication. The
  spectral map of a row block is not the row block of the spectral map, so this is NOT
  Scion; it exists to measure what exactness costs.

``dp_mode``: ``replicated`` (each DP replica runs the above; megatron DDP already all-reduced
the grads, so replicas compute the same) or ``sharded`` (owners are spread over the TP×DP
ranks of the stage: each matrix is computed by one rank of one replica, gathered from that
replica's TP ranks, and its result is sent to the matching TP rank of every replica; at TP1 the
spectral matrices, whole everywhere, are spread the same way; needs ``tp_mode=owner``). Momentum stays per rank with its parameter's sharding in both modes.
Pipeline stages plan only their own parameters: no cross-stage communication.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from disco_megatron.optim import comm
from disco_megatron.optim.comm import CommCounter
from disco_megatron.optim.layout import LogicalMatrix, ParamLayout
from disco_megatron.optim.lmo import dualize_many
from disco_megatron.optim.plan import Bucket, ExchangePlan, InPlace, build_exchange_plan
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
NS_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


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


def _piece(tensor: Tensor, matrix: LogicalMatrix) -> Tensor:
    """This rank's piece of ``matrix``: its local row ranges of ``tensor``, concatenated."""
    parts = [tensor[a:b] for a, b in matrix.local_rows]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _write_piece(tensor: Tensor, matrix: LogicalMatrix, piece: Tensor) -> None:
    offset = 0
    for a, b in matrix.local_rows:
        tensor[a:b].copy_(piece[offset:offset + b - a])
        offset += b - a


class DistributedDualizer:
    """Runs an :class:`ExchangePlan`: dualize(momentum) of every parameter shard of this rank.

    Construction does one small ``all_gather`` over the stage's TP×DP ranks to check that all
    of them built the same plan (and to learn which group rank is which (TP, DP) coordinate);
    after that every call is collective over the exchange group (TP, or TP×DP when sharded).
    """

    def __init__(self, plan: ExchangePlan, groups: StageGroups, device: torch.device,
                 counter: CommCounter | None = None) -> None:
        if dist.get_world_size(groups.tp) != plan.tp_size:
            raise ValueError(f"the exchange plan is for TP {plan.tp_size}, the TP group has "
                             f"{dist.get_world_size(groups.tp)} ranks")
        self.plan = plan
        self.groups = groups
        self.device = device
        self.ns_dtype = NS_TORCH_DTYPES[plan.ns_dtype]
        self.counter = counter if counter is not None else CommCounter()
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
        return [(int(t[1]), int(t[2])) for t in gathered]

    def __call__(self, momenta: Sequence[Tensor]) -> list[Tensor]:
        """Directions dualize(d), one per parameter, each in storage layout (shaped like its momentum)."""
        directions = [torch.zeros_like(m) for m in momenta]
        for group in self.plan.in_place:
            self.dualize_in_place(group, momenta, directions)
        for bucket in self.plan.buckets:
            if self.plan.tp_mode == "owner":
                owned = self.gather_to_owners(bucket, momenta)
                self.scatter_to_shards(bucket, self.dualize(bucket.lmo, owned), directions)
            else:
                wholes = self.all_gather_wholes(bucket, momenta)
                self.keep_own_pieces(bucket, self.dualize(bucket.lmo, wholes), directions)
        return directions

    def dualize(self, lmo: str, matrices: list[Tensor]) -> list[Tensor]:
        """The LMO of each matrix (same-shape spectral ones batched), with the plan's NS settings."""
        return dualize_many(lmo, matrices, ns_backend=self.plan.ns_backend, ns_steps=self.plan.ns_steps,
                            ns_dtype=self.ns_dtype)

    def dualize_in_place(self, group: InPlace, momenta: Sequence[Tensor], directions: list[Tensor]) -> None:
        """Matrices whose piece is all their LMO needs: no communication."""
        results = self.dualize(group.lmo, [_piece(momenta[e.param], e.matrix) for e in group.entries])
        for entry, result in zip(group.entries, results):
            _write_piece(directions[entry.param], entry.matrix, result)

    def gather_to_owners(self, bucket: Bucket, momenta: Sequence[Tensor]) -> list[Tensor]:
        """Storage -> compute layout: the whole matrices this rank owns, in bucket order.

        Each rank of the owner's replica sends the owner its piece (one ``all_to_all``).
        """
        t, me, slots = self.plan.tp_size, self._me, self._slot_coords
        piece_shape = bucket.piece_shape(t)
        numel = math.prod(piece_shape)
        my_dp = slots[me][1]
        sends: list[list[Tensor]] = [[] for _ in slots]
        for entry, owner in zip(bucket.entries, bucket.owners):
            if slots[owner][1] == my_dp:
                sends[owner].append(_piece(momenta[entry.param], entry.matrix).reshape(-1))
        owned = bucket.owners.count(me)
        peers = [s for s, (_, dp) in enumerate(slots) if dp == my_dp]
        received = self._all_to_all(sends, [owned * numel if s in peers else 0 for s in range(len(slots))])
        pieces_by_tp = {slots[s][0]: received[s].view(owned, *piece_shape) for s in peers}
        return [torch.cat([pieces_by_tp[r][j] for r in range(t)], dim=bucket.concat_dim) for j in range(owned)]

    def scatter_to_shards(self, bucket: Bucket, results: list[Tensor], directions: list[Tensor]) -> None:
        """Compute -> storage layout: each owner sends every rank of the exchange group its piece
        of each result (one ``all_to_all``), written into that rank's directions."""
        t, slots = self.plan.tp_size, self._slot_coords
        piece_shape = bucket.piece_shape(t)
        numel = math.prod(piece_shape)
        chunks = [r.chunk(t, dim=bucket.concat_dim) for r in results]
        sends = [[c[tp].reshape(-1) for c in chunks] for tp, _ in slots]
        received = self._all_to_all(sends, [bucket.owners.count(s) * numel for s in range(len(slots))])
        taken = [0] * len(slots)
        for entry, owner in zip(bucket.entries, bucket.owners):
            piece = received[owner][taken[owner] * numel:(taken[owner] + 1) * numel]
            taken[owner] += 1
            _write_piece(directions[entry.param], entry.matrix, piece.view(piece_shape))

    def all_gather_wholes(self, bucket: Bucket, momenta: Sequence[Tensor]) -> list[Tensor]:
        """Storage -> compute layout on every TP rank: every whole matrix of the bucket (one ``all_gather``)."""
        piece_shape = bucket.piece_shape(self.plan.tp_size)
        mine = torch.cat([_piece(momenta[e.param], e.matrix).reshape(-1) for e in bucket.entries])
        gathered = [g.view(len(bucket.entries), *piece_shape)
                    for g in comm.all_gather(self.counter, mine, self.groups.tp)]
        return [torch.cat([g[j] for g in gathered], dim=bucket.concat_dim) for j in range(len(bucket.entries))]

    def keep_own_pieces(self, bucket: Bucket, results: list[Tensor], directions: list[Tensor]) -> None:
        """Compute -> storage layout without communication: this rank's piece of every result."""
        for entry, result in zip(bucket.entries, results):
            _write_piece(directions[entry.param], entry.matrix,
                         result.chunk(self.plan.tp_size, dim=bucket.concat_dim)[self.tp_rank])

    def _all_to_all(self, sends: list[list[Tensor]], recv_counts: list[int]) -> list[Tensor]:
        """One all_to_all: ``sends[d]`` goes to group rank d; returns what each rank sent us."""
        flat = [torch.cat(s) if s else torch.empty(0, dtype=STATE_DTYPE, device=self.device) for s in sends]
        inp = torch.cat(flat)
        out = torch.empty(sum(recv_counts), dtype=inp.dtype, device=inp.device)
        comm.all_to_all_single(self.counter, out, inp, recv_counts, [f.numel() for f in flat], self._group)
        return list(out.split(recv_counts))


class DistributedScion(torch.optim.Optimizer):
    """Scion over parameter shards; equals the reference ``Scion`` on the unsharded model.

    Param-group keys: ``lr``, ``momentum`` (α, the weight of the new gradient), ``radius``,
    ``constrained``, ``weight_decay`` (other keys, e.g. megatron's ``max_lr``, are kept).
    The LMO of each parameter comes from its :class:`ParamLayout`. :meth:`step` is the one
    entry point (``ScionOptimizer`` wraps it for megatron).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 layouts: Mapping[Tensor, ParamLayout], groups: StageGroups, *,
                 tp_mode: str = DEFAULTS.tp_mode, dp_mode: str = DEFAULTS.dp_mode,
                 ns_backend: str = DEFAULTS.ns_backend, ns_steps: int = DEFAULTS.ns_steps,
                 ns_dtype: str | None = DEFAULTS.ns_dtype, clip_grad: float = CLIP_GRAD_DEFAULT, norm_mask: Mapping[Tensor, bool] | None = None,
                 **defaults: Any) -> None:
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
        self.plan = build_exchange_plan(self.layouts, tp_size=dist.get_world_size(groups.tp),
                                        dp_size=dist.get_world_size(groups.dp), tp_mode=tp_mode, dp_mode=dp_mode,
                                        ns_backend=ns_backend, ns_steps=ns_steps,
                                        ns_dtype=ns_dtype_for(ns_dtype, self.device.type))
        self.dualizer = DistributedDualizer(self.plan, groups, self.device, self.counter)
        tp_rank = dist.get_rank(groups.tp)
        self._norm_mask = [
            norm_mask[p] if norm_mask is not None else (layout.partition_dim is not None or tp_rank == 0)
            for p, layout in zip(self._params, self.layouts)
        ]

    @torch.no_grad()
    def step(self) -> StepResult:  # type: ignore[override]
        """One Scion step: check grads -> clip -> momentum -> exchange -> update.

        The skip rule: a non-finite grad on any rank skips the step on every rank (parameters and
        momentum unchanged, ``stepped`` False); a missing grad raises on every rank. With
        ``clip_grad`` > 0 the gradients enter the momentum scaled as megatron-core's
        ``clip_grad_by_total_norm_fp32`` scales them (the grads themselves are left as they are);
        the returned grad norm is the one before clipping, as megatron reports it.
        """
        self.counter.start_step()
        check = self.check_grads()
        if not check.finite:
            return StepResult(False, None)
        momenta = self.update_momenta(clip_coefficient(check.grad_norm, self.clip_grad))
        directions = self.dualizer(momenta)
        self.update_params(directions)
        return StepResult(True, check.grad_norm)

    def check_grads(self) -> GradCheck:
        """Finiteness and global grad norm with one all-reduce over ``world``.

        Replicated tensors count once per TP group (``norm_mask``), DP replicas are divided
        out. A missing grad raises on every rank (the flag travels in the same all-reduce). The
        statistics live on the parameters' device; reading them is the step's one device->host
        copy (three numbers).
        """
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        missing = []
        for p, layout, counted in zip(self._params, self.layouts, self._norm_mask):
            if p.grad is None or p.grad.shape != p.shape:
                got = "none" if p.grad is None else f"shape {tuple(p.grad.shape)}"
                missing.append(f"{layout.name} (grad {got}, parameter {tuple(p.shape)})")
                continue
            stats[1] += (~torch.isfinite(p.grad)).sum()
            if counted:
                stats[0] += p.grad.double().square().sum()
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

    def update_momenta(self, grad_scale: float = 1.0) -> list[Tensor]:
        """d ← (1−α)·d + α·s·g for every parameter (fp32, sharded like it; s: the clip
        coefficient, 1 without clipping); returns the buffers."""
        self.init_state()
        for group in self.param_groups:
            for p in group["params"]:
                update_momentum_(self.state[p]["momentum_buffer"], p.grad, group["momentum"], grad_scale)
        return [self.state[p]["momentum_buffer"] for p in self._params]

    def update_params(self, directions: Sequence[Tensor]) -> None:
        """W ← W − lr·ρ·direction (with weight decay / the constrained rule) for every parameter."""
        direction_of = {id(p): d for p, d in zip(self._params, directions)}
        for g in self.param_groups:
            for p in g["params"]:
                apply_update_(p, direction_of[id(p)], lr=g["lr"], radius=g["radius"],
                              constrained=g["constrained"], weight_decay=g["weight_decay"])

    def init_state(self) -> None:
        """Create zero momentum for every parameter (checkpoint loading needs the tensors)."""
        for p in self._params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, dtype=STATE_DTYPE)

    def comm_stats(self) -> dict[str, object]:
        """Bytes sent/received by this rank per collective kind, last step and total."""
        return self.counter.stats()
