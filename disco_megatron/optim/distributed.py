"""The distributed Scion step: storage layout -> compute layout -> storage layout.

Each rank holds its parameters' shards (storage layout, what megatron gave us) and a momentum
buffer with exactly the same sharding (fp32), updated locally (element-wise). To dualize, a
logical matrix must be whole only for LMOs that are not local to its shard (spectral always;
bias_rms on a TP-sharded bias); row-wise maps (rownorm, sign, embedding) on row-sharded
vocab-parallel tensors are exact on the shard, so they and every replicated tensor are
dualized in place with zero communication.

Whole matrices go through buckets of equal (lmo, shape, concat dim), so Newton–Schulz runs
batched. ``tp_mode``:

- ``owner`` (default, exact): the plan gives each matrix one owner; per bucket one
  ``all_to_all`` brings the owner the TP pieces of its matrices, the owner dualizes each once,
  and a second ``all_to_all`` sends every rank back only its piece.
  Bytes per rank, averaged over the TP group: 2·(t−1)/t² of the matrices' bytes.
- ``duplicated`` (exact, the usual baseline): per bucket one ``all_gather`` of the pieces;
  every TP rank dualizes every matrix. Bytes per rank: (t−1)/t of the matrices' bytes.
- ``local`` (approximation): every piece is dualized on its own, no communication. The
  spectral map of a row block is not the row block of the spectral map, so this is NOT
  Scion; it exists to measure what exactness costs.

``dp_mode``: ``replicated`` (each DP replica runs the above; megatron DDP already all-reduced
the grads, so replicas compute the same) or ``sharded`` (owners are spread over the TP×DP
ranks of the stage: each matrix is computed by one rank of one replica, gathered from that
replica's TP ranks, and its result is sent to the matching TP rank of every replica; needs
``tp_mode=owner``). Momentum stays per rank with its parameter's sharding in both modes.
Pipeline stages plan only their own parameters: no cross-stage communication.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from disco_megatron.optim import comm
from disco_megatron.optim.comm import CommCounter
from disco_megatron.optim.layout import LogicalMatrix, ParamLayout, needs_whole
from disco_megatron.optim.lmo import dualize_many
from disco_megatron.optim.newton_schulz import ns_flops
from disco_megatron.optim.plan import plan_balance, plan_fingerprint, plan_owners
from disco_megatron.optim.scion import apply_update_, update_momentum_

TP_MODES: tuple[str, ...] = ("owner", "duplicated", "local")
DP_MODES: tuple[str, ...] = ("replicated", "sharded")
GROUP_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3, "momentum": 0.1, "radius": 1.0, "constrained": False, "weight_decay": 0.0,
}


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
        """The groups of megatron-core's ``parallel_state`` (must be initialised)."""
        from megatron.core import parallel_state as ps

        return cls(tp=ps.get_tensor_model_parallel_group(), dp=ps.get_data_parallel_group(),
                   tp_dp=ps.get_tensor_and_data_parallel_group(), world=dist.group.WORLD)


@dataclass(frozen=True)
class _Entry:
    """One whole-needing logical matrix: which parameter it lives in, and where."""

    param: int
    matrix: LogicalMatrix


@dataclass(frozen=True)
class _Bucket:
    """Same-(lmo, shape, concat dim) matrices, in key order, with the owner slot of each."""

    lmo: str
    shape: tuple[int, ...]
    concat_dim: int
    entries: tuple[_Entry, ...]
    owners: tuple[int, ...]


def _piece(tensor: Tensor, matrix: LogicalMatrix) -> Tensor:
    """This rank's piece of ``matrix``: its local row ranges of ``tensor``, concatenated."""
    parts = [tensor[a:b] for a, b in matrix.local_rows]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _write_piece(tensor: Tensor, matrix: LogicalMatrix, piece: Tensor) -> None:
    offset = 0
    for a, b in matrix.local_rows:
        tensor[a:b].copy_(piece[offset:offset + b - a])
        offset += b - a


def _piece_shape(shape: tuple[int, ...], concat_dim: int, tp_size: int) -> tuple[int, ...]:
    piece = list(shape)
    piece[concat_dim] //= tp_size
    return tuple(piece)


def plan_size(matrix: LogicalMatrix, lmo: str) -> tuple[int, int]:
    """(m, n) whose ``ns_flops`` is the matrix's dualize cost: m·n·min(m, n) for spectral,
    m·n for the element-wise maps (given as an (m·n)×1 matrix)."""
    if lmo == "spectral":
        return matrix.shape[0], matrix.shape[1]
    return math.prod(matrix.shape), 1


class DistributedDualizer:
    """dualize(momentum) for every parameter shard of this rank, per ``tp_mode``/``dp_mode``.

    Construction does one small ``all_gather`` over the stage's TP×DP ranks to check that all
    of them derived the same schedule (and to learn which rank is which TP/DP coordinate);
    after that every call is collective over the TP group (or TP×DP group when sharded).
    """

    def __init__(self, layouts: Sequence[ParamLayout], groups: StageGroups, *,
                 tp_mode: str = "owner", dp_mode: str = "replicated", ns_backend: str = "ns5",
                 ns_steps: int = 5, counter: CommCounter | None = None) -> None:
        if tp_mode not in TP_MODES:
            raise ValueError(f"unknown --scion-tp-mode {tp_mode!r}; choose one of {', '.join(TP_MODES)}")
        if dp_mode not in DP_MODES:
            raise ValueError(f"unknown --scion-dp-mode {dp_mode!r}; choose one of {', '.join(DP_MODES)}")
        if dp_mode == "sharded" and tp_mode != "owner":
            raise ValueError(
                f"--scion-dp-mode sharded spreads matrix owners over TP×DP and needs "
                f"--scion-tp-mode owner (got {tp_mode}); use --scion-dp-mode replicated"
            )
        self.layouts = list(layouts)
        self.groups = groups
        self.tp_mode, self.dp_mode = tp_mode, dp_mode
        self.ns_backend, self.ns_steps = ns_backend, ns_steps
        self.counter = counter if counter is not None else CommCounter()
        self.tp_size = dist.get_world_size(groups.tp)
        self.tp_rank = dist.get_rank(groups.tp)
        self.dp_rank = dist.get_rank(groups.dp)

        whole: dict[tuple[str, tuple[int, ...], int], list[_Entry]] = {}
        self._local: list[tuple[int, LogicalMatrix]] = []
        for index, layout in enumerate(self.layouts):
            for matrix in layout.matrices:
                if tp_mode != "local" and needs_whole(matrix, layout.lmo):
                    whole.setdefault((layout.lmo, matrix.shape, matrix.concat_dim), []).append(
                        _Entry(index, matrix))
                else:
                    self._local.append((index, matrix))
        specs = sorted(
            ((lmo, shape, cdim, tuple(sorted(e.matrix.key for e in entries)))
             for (lmo, shape, cdim), entries in whole.items()),
        )
        self.fingerprint = plan_fingerprint(tp_mode, dp_mode, ns_backend, ns_steps,
                                            self.tp_size, tuple(specs))
        self._group = groups.tp_dp if dp_mode == "sharded" else groups.tp
        self._slot_coords = self._agree_and_locate()
        self._me = dist.get_rank(self._group)
        slots = list(range(len(self._slot_coords)))
        sizes = [(e.matrix.key, *plan_size(e.matrix, lmo))
                 for (lmo, _, _), entries in whole.items() for e in entries]
        owners = plan_owners(sizes, slots) if tp_mode == "owner" else {}
        self.owners: dict[str, int] = owners
        self._costs = {key: float(ns_flops(m, n)) for key, m, n in sizes}
        self._buckets: list[_Bucket] = []
        for lmo, shape, cdim, _ in specs:
            entries = tuple(sorted(whole[(lmo, shape, cdim)], key=lambda e: e.matrix.key))
            self._buckets.append(_Bucket(lmo, shape, cdim, entries,
                                         tuple(owners.get(e.matrix.key, -1) for e in entries)))

    def plan_balance(self) -> float:
        """max/mean dualize cost over the exchange group's ranks (1.0 = perfect; owner mode)."""
        return plan_balance(self.owners, self._costs, list(range(len(self._slot_coords))))

    def _agree_and_locate(self) -> list[tuple[int, int]]:
        """All-gather (fingerprint, tp rank, dp rank) over the stage; fail on any disagreement.

        Returns the (tp rank, dp rank) of each rank of the exchange group, by group rank.
        """
        mine = torch.tensor([self.fingerprint, self.tp_rank, self.dp_rank], dtype=torch.int64)
        gathered = comm.all_gather(self.counter, mine, self.groups.tp_dp)
        prints = {int(t[0]) for t in gathered}
        if len(prints) != 1:
            by_print: dict[int, list[int]] = {}
            for group_rank, t in enumerate(gathered):
                by_print.setdefault(int(t[0]), []).append(group_rank)
            raise ValueError(
                "Scion optimizer schedules differ across the TP×DP ranks of this pipeline stage "
                f"(group ranks by fingerprint: {by_print}); every rank must build the same model "
                "config and the same --scion-* flags"
            )
        if self._group is self.groups.tp:
            return [(r, self.dp_rank) for r in range(self.tp_size)]
        return [(int(t[1]), int(t[2])) for t in gathered]

    def __call__(self, momenta: Sequence[Tensor]) -> list[Tensor]:
        """Directions dualize(d), one per parameter, each shaped like its momentum shard."""
        directions = [torch.zeros_like(m) for m in momenta]
        self._dualize_local(momenta, directions)
        for bucket in self._buckets:
            if self.tp_mode == "owner":
                self._owner_bucket(bucket, momenta, directions)
            else:
                self._duplicated_bucket(bucket, momenta, directions)
        return directions

    def _dualize(self, lmo: str, matrices: list[Tensor]) -> list[Tensor]:
        return dualize_many(lmo, matrices, ns_backend=self.ns_backend, ns_steps=self.ns_steps)

    def _dualize_local(self, momenta: Sequence[Tensor], directions: list[Tensor]) -> None:
        by_lmo: dict[str, list[tuple[int, LogicalMatrix]]] = {}
        for index, matrix in self._local:
            by_lmo.setdefault(self.layouts[index].lmo, []).append((index, matrix))
        for lmo, items in by_lmo.items():
            results = self._dualize(lmo, [_piece(momenta[i], m) for i, m in items])
            for (index, matrix), result in zip(items, results):
                _write_piece(directions[index], matrix, result)

    def _owner_bucket(self, bucket: _Bucket, momenta: Sequence[Tensor],
                      directions: list[Tensor]) -> None:
        t, me, slots = self.tp_size, self._me, self._slot_coords
        piece_shape = _piece_shape(bucket.shape, bucket.concat_dim, t)
        numel = math.prod(piece_shape)
        my_dp = slots[me][1]
        # Gather: each rank of the owner's replica sends the owner its piece.
        sends: list[list[Tensor]] = [[] for _ in slots]
        for entry, owner in zip(bucket.entries, bucket.owners):
            if slots[owner][1] == my_dp:
                sends[owner].append(_piece(momenta[entry.param], entry.matrix).reshape(-1))
        mine = [k for k, owner in enumerate(bucket.owners) if owner == me]
        sources = [s for s in range(len(slots)) if slots[s][1] == my_dp]
        received = self._exchange(sends, [len(mine) * numel if s in sources else 0 for s in range(len(slots))])
        pieces_by_tp = {slots[s][0]: received[s].view(len(mine), *piece_shape) for s in sources}
        fulls = [torch.cat([pieces_by_tp[r][j] for r in range(t)], dim=bucket.concat_dim)
                 for j in range(len(mine))]
        results = self._dualize(bucket.lmo, fulls) if fulls else []
        # Scatter: the owner sends each rank of the exchange group its piece of the result.
        chunks = [r.chunk(t, dim=bucket.concat_dim) for r in results]
        sends = [[c[slots[d][0]].reshape(-1) for c in chunks] for d in range(len(slots))]
        counts = [sum(1 for owner in bucket.owners if owner == s) * numel for s in range(len(slots))]
        received = self._exchange(sends, counts)
        taken = [0] * len(slots)
        for entry, owner in zip(bucket.entries, bucket.owners):
            piece = received[owner][taken[owner] * numel:(taken[owner] + 1) * numel]
            taken[owner] += 1
            _write_piece(directions[entry.param], entry.matrix, piece.view(piece_shape))

    def _exchange(self, sends: list[list[Tensor]], recv_counts: list[int]) -> list[Tensor]:
        """One all_to_all: ``sends[d]`` goes to group rank d; returns what each rank sent us."""
        flat = [torch.cat(s) if s else torch.empty(0) for s in sends]
        send_counts = [f.numel() for f in flat]
        inp = torch.cat(flat)
        out = torch.empty(sum(recv_counts), dtype=inp.dtype)
        comm.all_to_all_single(self.counter, out, inp, recv_counts, send_counts, self._group)
        return list(out.split(recv_counts))

    def _duplicated_bucket(self, bucket: _Bucket, momenta: Sequence[Tensor],
                           directions: list[Tensor]) -> None:
        t = self.tp_size
        piece_shape = _piece_shape(bucket.shape, bucket.concat_dim, t)
        mine = torch.cat([_piece(momenta[e.param], e.matrix).reshape(-1) for e in bucket.entries])
        gathered = [g.view(len(bucket.entries), *piece_shape)
                    for g in comm.all_gather(self.counter, mine, self.groups.tp)]
        fulls = [torch.cat([g[j] for g in gathered], dim=bucket.concat_dim)
                 for j in range(len(bucket.entries))]
        for entry, result in zip(bucket.entries, self._dualize(bucket.lmo, fulls)):
            _write_piece(directions[entry.param], entry.matrix,
                         result.chunk(t, dim=bucket.concat_dim)[self.tp_rank])


class DistributedScion(torch.optim.Optimizer):
    """Scion over parameter shards; equals the reference ``Scion`` on the unsharded model.

    Param-group keys: ``lr``, ``momentum`` (α, the weight of the new gradient), ``radius``,
    ``constrained``, ``weight_decay`` (other keys, e.g. megatron's ``max_lr``, are kept).
    The LMO of each parameter comes from its :class:`ParamLayout`. Every parameter needs a
    ``.grad`` at ``step`` (megatron DDP's ``main_grad`` always exists): a missing one is an
    error on every rank, a non-finite one skips the step on every rank.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]],
                 layouts: Mapping[Tensor, ParamLayout], groups: StageGroups, *,
                 tp_mode: str = "owner", dp_mode: str = "replicated", ns_backend: str = "ns5",
                 ns_steps: int = 5, norm_mask: Mapping[Tensor, bool] | None = None,
                 **defaults: Any) -> None:
        super().__init__(params, {**GROUP_DEFAULTS, **defaults})
        self._params = [p for g in self.param_groups for p in g["params"]]
        missing = [tuple(p.shape) for p in self._params if p not in layouts]
        if missing:
            raise ValueError(f"DistributedScion: no layout for parameter(s) of shape {missing}")
        self._layouts = [layouts[p] for p in self._params]
        for p, layout in zip(self._params, self._layouts):
            if tuple(p.shape) != layout.local_shape:
                raise ValueError(f"{layout.name}: parameter shape {tuple(p.shape)} does not match "
                                 f"its layout {layout.local_shape}")
        self.groups = groups
        self.counter = CommCounter()
        self.dualizer = DistributedDualizer(self._layouts, groups, tp_mode=tp_mode, dp_mode=dp_mode,
                                            ns_backend=ns_backend, ns_steps=ns_steps,
                                            counter=self.counter)
        tp_rank = dist.get_rank(groups.tp)
        self._norm_mask = [
            norm_mask[p] if norm_mask is not None else (layout.partition_dim is not None or tp_rank == 0)
            for p, layout in zip(self._params, self._layouts)
        ]
        self.last_grad_norm: float | None = None

    @torch.no_grad()
    def check_grads(self) -> tuple[bool, float]:
        """(all grads finite everywhere, global grad norm) with one all-reduce over ``world``.

        Replicated tensors count once per TP group (``norm_mask``), DP replicas are divided
        out. A missing grad raises on every rank (the flag travels in the same all-reduce).
        """
        self.counter.start_step()
        stats = torch.zeros(3, dtype=torch.float64)
        missing = []
        for p, layout, counted in zip(self._params, self._layouts, self._norm_mask):
            if p.grad is None or p.grad.shape != p.shape:
                got = "none" if p.grad is None else f"shape {tuple(p.grad.shape)}"
                missing.append(f"{layout.name} (grad {got}, parameter {tuple(p.shape)})")
                continue
            stats[1] += (~torch.isfinite(p.grad)).sum()
            if counted:
                stats[0] += p.grad.double().square().sum()
        stats[2] = len(missing)
        comm.all_reduce(self.counter, stats, self.groups.world)
        if stats[2] > 0:
            raise ValueError(
                "Scion step: every parameter handed to the optimizer needs a gradient of its "
                f"shape; {'here: ' + ', '.join(missing) if missing else 'another rank lacks one'}"
                " (freeze unused parameters with requires_grad=False)"
            )
        ok = bool(stats[1] == 0)
        dp_size = dist.get_world_size(self.groups.dp)
        self.last_grad_norm = math.sqrt(float(stats[0]) / dp_size) if ok else float("nan")
        return ok, self.last_grad_norm

    @torch.no_grad()
    def apply_step(self) -> None:
        """Momentum, distributed dualize and update (grads already checked)."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        momenta = []
        for p in self._params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            update_momentum_(state["momentum_buffer"], p.grad, group_of[id(p)]["momentum"])
            momenta.append(state["momentum_buffer"])
        for p, direction in zip(self._params, self.dualizer(momenta)):
            g = group_of[id(p)]
            apply_update_(p, direction, lr=g["lr"], radius=g["radius"],
                          constrained=g["constrained"], weight_decay=g["weight_decay"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Check grads, then step unless some grad is non-finite (see ``last_grad_norm``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ok, _ = self.check_grads()
        if ok:
            self.apply_step()
        return loss

    def init_state(self) -> None:
        """Create zero momentum for every parameter (checkpoint loading needs the tensors)."""
        for p in self._params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)

    def comm_stats(self) -> dict[str, object]:
        """Bytes sent/received by this rank per collective kind, last step and total."""
        return self.counter.stats()
