"""Collectives that count the bytes this rank sends and receives, by collective kind.

Counts are payload bytes to / from *other* ranks (a rank's slice to itself is a local copy).
``all_gather``: the local tensor goes to g−1 peers and g−1 tensors arrive. ``all_reduce``
is counted as a ring would move it, 2·(g−1)/g of the tensor each way (nominal: the backend
may use another algorithm). ``async_op=True`` returns torch's work handle (wait on it before reading
the output or reusing the input); the bytes are counted when the collective is issued. ``benchmarks/comm.py`` compares these counts with the theory in
``optim/distributed.py``'s docstring (derived in docs/design.md §3).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class KindStats:
    """Calls and bytes of one collective kind."""

    calls: int = 0
    sent: int = 0
    received: int = 0

    def add(self, sent: int, received: int) -> None:
        self.calls += 1
        self.sent += sent
        self.received += received


@dataclass
class CommCounter:
    """Per-kind byte counts of the current step and of all steps so far."""

    step: dict[str, KindStats] = field(default_factory=dict)
    total: dict[str, KindStats] = field(default_factory=dict)
    steps: int = 0

    def record(self, kind: str, sent: int, received: int) -> None:
        self.step.setdefault(kind, KindStats()).add(sent, received)
        self.total.setdefault(kind, KindStats()).add(sent, received)

    def start_step(self) -> None:
        """Begin counting a new step (the previous step's numbers are dropped)."""
        self.step = {}
        self.steps += 1

    def stats(self) -> dict[str, object]:
        """Plain-dict snapshot: ``{"steps", "last_step": {kind: {...}}, "total": {kind: {...}}}``."""
        as_dict = lambda d: {k: vars(v).copy() for k, v in d.items()}  # noqa: E731
        return {"steps": self.steps, "last_step": as_dict(self.step), "total": as_dict(self.total)}


def _group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def all_to_all_single(counter: CommCounter, output: Tensor, input: Tensor,
                      output_split_sizes: Sequence[int], input_split_sizes: Sequence[int],
                      group: dist.ProcessGroup | None, async_op: bool = False) -> dist.Work | None:
    """``dist.all_to_all_single`` with element splits along dim 0, counted."""
    me = dist.get_rank(group)
    itemsize = input.element_size()
    sent = sum(s for r, s in enumerate(input_split_sizes) if r != me) * itemsize
    received = sum(s for r, s in enumerate(output_split_sizes) if r != me) * itemsize
    work = dist.all_to_all_single(output, input, list(output_split_sizes), list(input_split_sizes), group=group,
                                  async_op=async_op)
    counter.record("all_to_all", sent, received)
    return work


def all_gather_start(counter: CommCounter, tensor: Tensor, group: dist.ProcessGroup | None,
                     async_op: bool = False) -> tuple[list[Tensor], dist.Work | None]:
    """``dist.all_gather`` of same-shape tensors into group-rank order, counted; the outputs are
    complete once the returned work (None when synchronous) is waited for."""
    size = _group_size(group)
    out = [torch.empty_like(tensor) for _ in range(size)]
    work = dist.all_gather(out, tensor.contiguous(), group=group, async_op=async_op)
    nbytes = tensor.numel() * tensor.element_size() * (size - 1)
    counter.record("all_gather", nbytes, nbytes)
    return out, work


def all_gather(counter: CommCounter, tensor: Tensor, group: dist.ProcessGroup | None) -> list[Tensor]:
    """``dist.all_gather`` of same-shape tensors, returned in group-rank order, counted."""
    return all_gather_start(counter, tensor, group)[0]


def all_reduce(counter: CommCounter, tensor: Tensor, group: dist.ProcessGroup | None,
               op: dist.ReduceOp = dist.ReduceOp.SUM) -> Tensor:
    """In-place ``dist.all_reduce``, counted as a ring all-reduce."""
    size = _group_size(group)
    dist.all_reduce(tensor, op=op, group=group)
    nbytes = 2 * (size - 1) * tensor.numel() * tensor.element_size() // size
    counter.record("all_reduce", nbytes, nbytes)
    return tensor
