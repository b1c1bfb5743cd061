"""Per-step norm statistics of parameters and their updates, gathered to one writer rank.

On a logging step (``step % interval == 0``; nothing at all happens on other steps) the
training loop calls :meth:`NormTracker.before_step` just before ``optimizer.step()`` (an fp32
snapshot of this rank's parameters, transient: 4 bytes per local parameter entry) and
:meth:`NormTracker.after_step` just after it. The tracker only reads parameters, so it works
with any optimizer (Scion, Adam). Norms are per logical matrix in the reference's orientation
(:mod:`~disco_megatron.norms.matrices`): q, k, v and gate, up separately, embeddings transposed.
Three kinds are measured: ``params`` (the model's parameters after the step, as stored: bf16
values with bf16 weights), ``updates`` (the optimizer's step, the reference's "update", from a
step source; absent without one) and ``weight_changes`` (``W_after − W_before``: the step plus
weight decay, the constrained shrink and rounding).

Who does what:

- DP replicas hold identical parameters: only ``dp_rank == 0`` ranks compute; the others
  return at once.
- Within a stage the TP ranks of DP replica 0 compute every split tensor together, all of them
  in one :func:`~disco_megatron.norms.sharded.sharded_norms_many` call per kind: 2 +
  (largest σ_max iteration count) all-reduces over ``tp_group`` per kind, however many tensors
  (plus, for the matrices measured exactly, one all_to_all to their SVD owners and one
  all-reduce of the 2 values per matrix); ``named_params`` order is the same on every TP rank.
  Each exact SVD runs once, on the rank the optimizer's plan has dualize that matrix
  (:mod:`~disco_megatron.norms.owners`). Replicated tensors are computed by TP rank 0 alone, in
  the same call, without communication.
- TP rank 0 of each stage (DP replica 0) sends its results with one object gather over
  ``pp_group`` to the **last stage's** TP-rank-0 rank, the writer rank (docs/design.md §2:
  that is where the loss is, and where the training loop logs). It aggregates the groups
  (:func:`~disco_megatron.norms.definitions.aggregate_groups`: max of the operator norms,
  root-sum-square Frobenius), and hands the record to every writer.

Record (one per logged step)::

    {"step", "tokens", "loss", "lr": {group: lr}, "params": {key: {norm: value}},
     "updates": {key: {norm: value}}, "weight_changes": {key: {norm: value}},
     "groups": {"param" | "update" | "weight_change": {group: {norm: value}}}}

``key``: a logical matrix's key (``<name>`` or ``<name>:<part>``); a matrix's norms include
``sigma_max_rel_bound``, the achieved bound on σ_max's relative error.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
import torch.distributed as dist

from disco_megatron.norms.definitions import aggregate_groups
from disco_megatron.norms.matrices import logical_pieces, matrix_group
from disco_megatron.norms.owners import svd_owners as owners_of
from disco_megatron.norms.sharded import PowerIterationState, global_numel, param_partition_dim, sharded_norms_many
from disco_megatron.norms.writers import RECORD_KINDS as _KINDS
from disco_megatron.optim.layout import ModelShape


class NormWriter(Protocol):
    """Anything that takes a norm record (JSONL file, TensorBoard, a test's list)."""

    def write(self, record: dict) -> None: ...


class StepSource(Protocol):
    """The optimizer's step of each parameter, by ``id`` of the parameter (collective)."""

    def before_step(self) -> None: ...

    def __call__(self) -> dict[int, torch.Tensor]: ...


class NormTracker:
    """Norms of parameters, optimizer steps and weight changes every ``interval`` steps (see the module docstring).

    ``named_params`` carry global names (PP layer indices already made global) and megatron's
    ``tensor_model_parallel``/``partition_dim`` attributes (absent: replicated). ``model_cfg``
    gives the fused tensors' logical matrices (:mod:`~disco_megatron.norms.matrices`).
    ``step_source``: the optimizer's step per parameter (:class:`~disco_megatron.norms.steps.ScionStepSource`);
    without one the record has no ``updates``. ``sigma_tol``/``max_power_iters``: σ_max's
    relative error bound and the Lanczos cap. ``svd_owners``: the TP rank that runs each exact
    SVD, by key (:func:`~disco_megatron.norms.owners.optimizer_svd_owners`: the optimizer's
    owners); matrices without one are balanced over the TP ranks.
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
        group_of: Callable[[str], str] = matrix_group,
        with_condition: bool = False,
        *,
        model_cfg: ModelShape,
        step_source: StepSource | None = None,
        sigma_tol: float = 1e-4,
        max_power_iters: int = 100,
        svd_owners: Mapping[str, int] | None = None,
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
        self.model_cfg = model_cfg
        self.step_source = step_source
        self.tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        self.tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.computes = dp_rank == 0
        self.contributes = self.computes and self.tp_rank == 0
        self.is_writer = self.contributes and pp_rank == pp_size - 1
        with_dims = [(name, p, param_partition_dim(p)) for name, p in named_params]
        self._mine = [(n, p, d) for n, p, d in with_dims if self.computes and (d is not None or self.tp_rank == 0)]
        # Logical matrices' global entry counts, from the shapes alone (meta tensors: no copy of an
        # FP8 parameter); a shape the model config does not explain fails here, at start-up.
        meta = [piece for name, p, pdim in self._mine
                for piece in self._pieces(name, torch.empty(p.shape, device="meta"), pdim)]
        self._numels = {key: global_numel(piece, pdim, tp_group) for key, piece, pdim in meta}
        # The SVD owner of every split matrix, fixed once (A: the row-sharded view, sharded_norms).
        split = [(key, *(piece.t() if pdim == 1 else piece).shape) for key, piece, pdim in meta
                 if pdim is not None and piece.dim() == 2]
        self._svd_owners = owners_of([(key, m * self.tp_size, n) for key, m, n in split], svd_owners or {},
                                     self.tp_size)
        self._states = {kind: PowerIterationState(tol=sigma_tol, max_iters=max_power_iters) for kind, _ in _KINDS}
        self._before: dict[str, torch.Tensor] = {}
        self._before_step: int | None = None

    def should_log(self, step: int) -> bool:
        return step % self.interval == 0

    def before_step(self, step: int) -> None:
        """Snapshot this rank's parameters (fp32 copy) on a logging step; every rank calls it."""
        if not self.should_log(step):
            return
        if self.step_source is not None:
            self.step_source.before_step()
        self._before = {name: p.detach().to(torch.float32, copy=True) for name, p, _ in self._mine}
        self._before_step = step

    def after_step(self, step: int, *, tokens: int, loss: float | None,
                   lrs: dict[str, float]) -> dict | None:
        """Compute, gather and write the norms of ``step``; the record on the writer rank, else None.

        Every rank calls it (the step source is collective). ``loss`` matters on the writer rank
        only (the last stage, where the loss is known).
        """
        if not self.should_log(step):
            return None
        if self._before_step != step and (self.computes or self.step_source is not None):
            raise RuntimeError(f"NormTracker.after_step({step}) without before_step({step}): call "
                               "before_step right before optimizer.step() on logging steps")
        steps = self.step_source() if self.step_source is not None else None
        local = self._compute(steps) if self.computes else None
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

    def _pieces(self, name: str, tensor: torch.Tensor, pdim: int | None) -> list[tuple[str, torch.Tensor, int | None]]:
        return logical_pieces(name, tensor, pdim, self.model_cfg, self.tp_size, self.tp_rank)

    def _compute(self, steps: dict[int, torch.Tensor] | None) -> dict:
        afters = [(name, p.detach().float(), pdim) for name, p, pdim in self._mine]
        tensors = {"params": afters,
                   # Each weight change is written over its snapshot: no second fp32 copy of the parameters.
                   "weight_changes": [(name, torch.sub(after, self._before[name], out=self._before[name]), pdim)
                                      for name, after, pdim in afters]}
        if steps is not None:
            tensors["updates"] = [(name, steps[id(p)], pdim) for name, p, pdim in self._mine if id(p) in steps]
        out = {key: sharded_norms_many([piece for name, t, pdim in items for piece in self._pieces(name, t, pdim)],
                                       self.tp_group, state=self._states[kind], with_condition=self.with_condition,
                                       owners=self._svd_owners)
               for kind, key in _KINDS if (items := tensors.get(key)) is not None}
        return {**out, "numels": self._numels}

    def _gather(self, local: dict) -> list[dict]:
        if self.pp_size == 1 or self.pp_group is None:
            return [local]
        stages = [None] * self.pp_size if self.is_writer else None
        dist.gather_object(local, stages, group=self.pp_group, group_dst=self.pp_size - 1)
        return stages

    def _record(self, step: int, tokens: int, loss: float | None, lrs: dict[str, float],
                stages: list[dict]) -> dict:
        present = [(kind, key) for kind, key in _KINDS if key in stages[0]]
        merged = {key: {name: value for stage in stages for name, value in stage[key].items()}
                  for key in [key for _, key in present] + ["numels"]}
        return {
            "step": int(step),
            "tokens": int(tokens),
            "loss": None if loss is None else float(loss),
            "lr": {group: float(lr) for group, lr in lrs.items()},
            **{key: merged[key] for _, key in present},
            "groups": {kind: aggregate_groups(merged[key], merged["numels"], self.group_of) for kind, key in present},
        }
