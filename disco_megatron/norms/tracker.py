"""Per-step norm statistics of parameters and their updates, gathered to one writer rank.

On a logging step (``step % interval == 0``; nothing at all happens on other steps) the
training loop calls :meth:`NormTracker.before_step` just before ``optimizer.step()`` (an fp32
snapshot of this rank's parameters, transient: 4 bytes per local parameter entry) and
:meth:`NormTracker.after_step` just after it. The tracker only reads parameters, so it works
with any optimizer (Scion, Adam). It measures the model's parameters as stored (with bf16
weights: the bf16 values, whose update is the fp32 master update after rounding).

Who does what:

- DP replicas hold identical parameters: only ``dp_rank == 0`` ranks compute; the others
  return at once.
- Within a stage the TP ranks of DP replica 0 compute every split tensor together, all of them
  in one :func:`~disco_megatron.norms.sharded.sharded_norms_many` call per kind (params,
  updates): 2 + (largest σ_max iteration count) all-reduces over ``tp_group`` per kind, however
  many tensors; ``named_params`` order is the same on every TP rank. Replicated tensors are
  computed by TP rank 0 alone, in the same call, without communication.
- TP rank 0 of each stage (DP replica 0) sends its results with one object gather over
  ``pp_group`` to the **last stage's** TP-rank-0 rank, the writer rank (docs/design.md §2:
  that is where the loss is, and where the training loop logs). It aggregates the groups
  (:func:`~disco_megatron.norms.definitions.aggregate_groups`: max of the operator norms,
  root-sum-square Frobenius), and hands the record to every writer.

Record (one per logged step)::

    {"step", "tokens", "loss", "lr": {group: lr}, "params": {name: {norm: value}},
     "updates": {name: {norm: value}}, "groups": {"param": {group: {norm: value}},
     "update": {group: {norm: value}}}}
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.distributed as dist

from disco_megatron.models.naming import param_group
from disco_megatron.norms.definitions import aggregate_groups
from disco_megatron.norms.sharded import PowerIterationState, global_numel, param_partition_dim, sharded_norms_many


class NormWriter(Protocol):
    """Anything that takes a norm record (JSONL file, TensorBoard, a test's list)."""

    def write(self, record: dict) -> None: ...


class NormTracker:
    """Norms of parameters and updates every ``interval`` steps (see the module docstring).

    ``named_params`` carry global names (PP layer indices already made global) and megatron's
    ``tensor_model_parallel``/``partition_dim`` attributes (absent: replicated).
    ``power_iters``/``first_power_iters``: σ_max power iterations per call, warm / cold.
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        interval: int,
        tp_group: dist.ProcessGroup | None,
        pp_group: dist.ProcessGroup | None,
        dp_rank: int,
        pp_rank: int,
        pp_size: int,
        writers: Sequence[NormWriter],
        group_of: Callable[[str], str] = param_group,
        with_condition: bool = False,
        *,
        power_iters: int = 5,
        first_power_iters: int = 30,
    ) -> None:
        if interval < 1:
            raise ValueError(f"--norm-log-interval must be >= 1 (got {interval})")
        names = [name for name, _ in named_params]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"NormTracker: duplicate parameter names {duplicates}; pass global names "
                             "(PP-local layer indices converted with models.sharding.global_param_name)")
        for name in names:
            group_of(name)  # an unknown name fails here, at start-up, not at the first logging step
        self.interval = interval
        self.tp_group = tp_group
        self.pp_group = pp_group
        self.pp_size = pp_size
        self.writers = list(writers)
        self.group_of = group_of
        self.with_condition = with_condition
        tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        self.computes = dp_rank == 0
        self.contributes = self.computes and tp_rank == 0
        self.is_writer = self.contributes and pp_rank == pp_size - 1
        with_dims = [(name, p, param_partition_dim(p)) for name, p in named_params]
        self._mine = [(n, p, d) for n, p, d in with_dims if self.computes and (d is not None or tp_rank == 0)]
        self._states = {kind: PowerIterationState(iters=power_iters, first_iters=first_power_iters)
                        for kind in ("param", "update")}
        self._before: dict[str, torch.Tensor] = {}
        self._before_step: int | None = None

    def should_log(self, step: int) -> bool:
        return step % self.interval == 0

    def before_step(self, step: int) -> None:
        """Snapshot this rank's parameters (fp32 copy) on a logging step."""
        if not self.should_log(step):
            return
        self._before = {name: p.detach().to(torch.float32, copy=True) for name, p, _ in self._mine}
        self._before_step = step

    def after_step(self, step: int, *, tokens: int, loss: float | None,
                   lrs: dict[str, float]) -> dict | None:
        """Compute, gather and write the norms of ``step``; the record on the writer rank, else None.

        ``loss`` matters on the writer rank only (the last stage, where the loss is known).
        """
        if not self.should_log(step):
            return None
        if self.computes and self._before_step != step:
            raise RuntimeError(f"NormTracker.after_step({step}) without before_step({step}): call "
                               "before_step right before optimizer.step() on logging steps")
        local = self._compute() if self.computes else None
        self._before, self._before_step = {}, None
        if not self.contributes:
            return None
        stages = self._gather(local)
        if not self.is_writer:
            return None
        record = self._record(step, tokens, loss, lrs, stages)
        for writer in self.writers:
            writer.write(record)
        return record

    def _compute(self) -> dict:
        afters = [(name, p.detach().float(), pdim) for name, p, pdim in self._mine]
        # Each update is written over its snapshot: all updates are alive at once for the batched
        # call, without a second fp32 copy of the parameters.
        updates = [(name, torch.sub(after, self._before[name], out=self._before[name]), pdim)
                   for name, after, pdim in afters]
        return {"params": self._norms("param", afters), "updates": self._norms("update", updates),
                "numels": {name: global_numel(p, pdim, self.tp_group) for name, p, pdim in self._mine}}

    def _norms(self, kind: str, items: list[tuple[str, torch.Tensor, int | None]]) -> dict[str, dict[str, float]]:
        return sharded_norms_many(items, self.tp_group, state=self._states[kind], with_condition=self.with_condition)

    def _gather(self, local: dict) -> list[dict]:
        if self.pp_size == 1 or self.pp_group is None:
            return [local]
        stages = [None] * self.pp_size if self.is_writer else None
        dist.gather_object(local, stages, group=self.pp_group, group_dst=self.pp_size - 1)
        return stages

    def _record(self, step: int, tokens: int, loss: float | None, lrs: dict[str, float],
                stages: list[dict]) -> dict:
        merged = {key: {name: value for stage in stages for name, value in stage[key].items()}
                  for key in ("params", "updates", "numels")}
        return {
            "step": int(step),
            "tokens": int(tokens),
            "loss": None if loss is None else float(loss),
            "lr": {group: float(lr) for group, lr in lrs.items()},
            "params": merged["params"],
            "updates": merged["updates"],
            "groups": {
                "param": aggregate_groups(merged["params"], merged["numels"], self.group_of),
                "update": aggregate_groups(merged["updates"], merged["numels"], self.group_of),
            },
        }
