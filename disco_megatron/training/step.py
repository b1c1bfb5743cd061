"""One training step, and one evaluation, on megatron-core's pipeline schedules.

Whether a step's update is applied is the optimizer's answer alone: ``step()`` returns
``(False, None, None)`` on every rank when some gradient is non-finite (Scion checks with its
one all-reduce; ``builders`` gives megatron's Adam the same check), so a step makes no
finiteness reduction of its own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Iterator, Optional

import torch

from disco_megatron.builders import group_lrs
from disco_megatron.runtime import ParallelInfo

if TYPE_CHECKING:
    from disco_megatron.training.setup import Run

# Test hook: comma-separated iterations whose loss is made NaN (exercises the skip path).
FAULT_NAN_ENV = "DISCO_FAULT_NAN_AT"


@dataclass(frozen=True)
class StepResult:
    """What one step did: its loss (DP mean, on the last stage; None elsewhere), and whether the
    optimizer applied the update (False: a non-finite gradient somewhere, the step was skipped)."""

    loss: Optional[float]
    applied: bool


def _nan_iterations() -> set[int]:
    text = os.environ.get(FAULT_NAN_ENV, "")
    return {int(x) for x in text.split(",") if x.strip()}


def loss_func(loss_mask: torch.Tensor, poison: bool, cp_group, output_tensor: torch.Tensor):
    """Mean next-token cross entropy over unmasked tokens of one microbatch.

    ``cp_group``: with context parallel each rank holds a part of every sequence, so the sum and the
    count are all-reduced over it (the gradient flows through this rank's part; the schedule multiplies
    the loss by the CP size, which DDP's average over DP x CP divides out again); None without CP.
    """
    losses = output_tensor.float()
    mask = loss_mask.float().view(-1)
    total = torch.stack([torch.sum(losses.view(-1) * mask), mask.sum()])
    if cp_group is not None:
        torch.distributed.all_reduce(total, group=cp_group)
    loss = total[0] / total[1].clamp(min=1.0)
    if poison:
        loss = loss * float("nan")
    return loss, {"lm loss": loss.detach().clone()}  # the schedule divides `loss` in place


def make_forward_step(poison: bool = False):
    """megatron's forward_step_func: a batch from the iterator through the model chunk (this context-parallel
    rank's part of the sequence, as Megatron-LM's ``get_batch_on_this_cp_rank`` cuts it)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    cp_group = ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None

    def forward_step(data_iterator: Iterator[dict], model):
        batch = next(data_iterator)
        if cp_group is not None:
            batch = get_batch_on_this_cp_rank(dict(batch))
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"], poison, cp_group)

    return forward_step


def reduce_mean_loss(losses: list, info: ParallelInfo) -> Optional[float]:
    """Average of the microbatch losses over DP, known on the last stage (None elsewhere)."""
    from megatron.core import parallel_state as ps

    if not info.is_last_stage:
        return None
    value = torch.stack([x["lm loss"] for x in losses]).mean()
    torch.distributed.all_reduce(value, group=ps.get_data_parallel_group())
    return value.item() / info.dp


def train_step(run: "Run") -> StepResult:
    """Iteration ``run.state.iteration + 1``: forward/backward of one global batch, the optimizer and
    scheduler step (norm statistics around it on logging steps); ``run.state`` moves on either way."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg, parts, state, tracker = run.cfg, run.parts, run.state, run.tracker
    iteration = state.iteration + 1
    for chunk in parts.ddp:
        chunk.zero_grad_buffer()
    parts.optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=make_forward_step(poison=iteration in _nan_iterations()), data_iterator=run.train_batches,
        model=parts.ddp, num_microbatches=run.num_microbatches, seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.micro_batch_size, forward_only=False)
    loss = reduce_mean_loss(losses, run.info)
    tracked = tracker.should_log(iteration)
    if tracked:
        tracker.before_step(iteration)
    applied, _, _ = parts.optimizer.step()
    state.iteration = iteration
    state.consumed_samples += cfg.global_batch_size
    if applied:
        parts.scheduler.step(increment=cfg.global_batch_size)
        if tracked:
            tracker.after_step(iteration, tokens=state.consumed_samples * cfg.model.seq_length, loss=loss,
                               lrs=group_lrs(parts.optimizer))
    else:
        state.skipped_steps += 1
    return StepResult(loss, applied)


def evaluate(run: "Run") -> Optional[float]:
    """Mean validation loss over ``--eval-iters`` global batches from the start of the valid split."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from disco_megatron.data import micro_batches
    from disco_megatron.training.setup import data_iterators

    cfg, info, ddp = run.cfg, run.info, run.parts.ddp
    for chunk in ddp:
        chunk.eval()
    iterator = data_iterators(partial(micro_batches, run.valid_ds, cfg.micro_batch_size, info.dp_rank, info.dp, 0),
                              len(ddp))
    values = []
    with torch.no_grad():
        for _ in range(cfg.eval_iters):
            losses = get_forward_backward_func()(
                forward_step_func=make_forward_step(), data_iterator=iterator, model=ddp,
                num_microbatches=run.num_microbatches, seq_length=cfg.model.seq_length,
                micro_batch_size=cfg.micro_batch_size, forward_only=True)
            values.append(reduce_mean_loss(losses, info))
    for chunk in ddp:
        chunk.train()
    return None if values[0] is None else sum(values) / len(values)
