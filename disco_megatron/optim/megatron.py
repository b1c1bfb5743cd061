"""ScionOptimizer: the distributed Scion behind megatron's ``MegatronOptimizer`` interface.

Megatron's training loop (or ours) sees an ordinary megatron optimizer: ``step()`` returns
``(success, grad_norm, num_zeros)``, param groups carry ``lr``/``max_lr``/``min_lr``/``wd_mult``
so ``OptimizerParamScheduler`` drives the four lr groups (embedding, hidden, output, gains),
and ``sharded_state_dict`` saves momentum and fp32 masters as one global tensor per logical
matrix (:mod:`~disco_megatron.optim.state_layout`), so ``dist_checkpointing`` reshards them into
any TP/PP/DP layout and either DP mode.

Grads come from megatron DDP's ``param.main_grad`` (else ``param.grad``). In replicated DP mode,
params that are not fp32 (``--bf16``) get an fp32 master copy on every rank that the optimizer
steps; the model param is refreshed from it after each step (``reload_model_params`` goes the
other way). In sharded DP mode the optimizer steps the model params themselves: the owner of
each logical matrix keeps its fp32 master and momentum and sends every rank its new piece
(``reload_model_params``: the owners re-gather their masters from the model params).
"""
from __future__ import annotations

import logging
from copy import deepcopy
from dataclasses import replace
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map
from megatron.core.optimizer.optimizer import MegatronOptimizer, _zero_grad_group_helper
from megatron.core.transformer.module import param_is_not_shared
from megatron.core.utils import get_attr_wrapped_model, log_single_rank

from disco_megatron.models.fp8 import is_quantized, master_weight
from disco_megatron.optim.config import ScionConfig, scion_config_from_flags
from disco_megatron.optim.distributed import DistributedScion, StageGroups, StepResult, piece_of, write_piece
from disco_megatron.models.naming import LR_GROUPS
from disco_megatron.optim.layout import ParamLayout, build_layout, matrix_key, split_matrix_key
from disco_megatron.optim.state_layout import StatePiece, state_pieces

__all__ = ["ScionOptimizer", "ScionConfig", "get_scion_optimizer", "scion_config_from_flags"]

logger = logging.getLogger(__name__)

STATE_FORMAT = "scion-momentum-v1"  # state_dict(): same-layout torch checkpoints
DIST_FORMAT = "scion-matrices-v2"  # sharded_state_dict(): one global tensor per logical matrix
MOMENTUM, MASTER = "momentum_buffer", "fp32_param"


def _layout_for(name: str, param: torch.nn.Parameter, model_cfg: Any, config: ScionConfig,
                tp_size: int, tp_rank: int) -> ParamLayout:
    """Layout of one model parameter, cross-checked with megatron's own TP attributes."""
    layout = build_layout(name, param.shape, model_cfg, tp_size=tp_size, tp_rank=tp_rank,
                          qkv_split=config.scion_qkv_split, output_lmo=config.scion_output_lmo,
                          shared_embedding=getattr(param, "shared_embedding", False))
    megatron_dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    if megatron_dim != layout.partition_dim:
        raise ValueError(f"{name}: megatron shards it along dim {megatron_dim}, the Scion layout "
                         f"expects {layout.partition_dim}; this parameter naming is not supported")
    return layout


class ScionOptimizer(MegatronOptimizer):
    """Scion for megatron-core model chunks (see the module docstring)."""

    checkpoint_format = DIST_FORMAT  # what storage.load_checkpoint expects in the checkpoint's optimizer state

    def __init__(self, config: ScionConfig, model_chunks: list[torch.nn.Module],
                 groups: Optional[StageGroups] = None) -> None:
        groups = groups or StageGroups.from_megatron()
        tp_size, tp_rank = dist.get_world_size(groups.tp), dist.get_rank(groups.tp)
        layouts: dict[torch.Tensor, ParamLayout] = {}
        norm_mask: dict[torch.Tensor, bool] = {}
        by_group: dict[str, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {g: [] for g in LR_GROUPS}
        for index, chunk in enumerate(model_chunks):
            model_cfg = get_attr_wrapped_model(chunk, "config")
            for name, param in chunk.named_parameters():
                if not param.requires_grad:
                    continue
                layout = _layout_for(name, param, model_cfg, config, tp_size, tp_rank)
                if len(model_chunks) > 1:
                    layout = _with_chunk_keys(layout, index)
                if config.scion_dp_mode == "sharded" and is_quantized(param):
                    raise ValueError(f"{name}: FP8 parameters keep their master on every rank; use "
                                     "--scion-dp-mode replicated (no --use-distributed-optimizer) with FP8")
                keep = config.scion_dp_mode == "sharded" or (param.dtype == torch.float32 and not is_quantized(param))
                main = param if keep else self._master_of(param)
                layouts[main] = layout
                norm_mask[main] = param_is_not_shared(param) and \
                    tensor_parallel.param_is_not_tensor_parallel_duplicate(param)
                by_group[layout.lr_group].append((param, main))
        # Both lists follow the optimizer's parameter order (groups in LR_GROUPS order), which
        # is what state ids and megatron's sharded-param map are keyed by.
        self.model_params = [p for g in LR_GROUPS for p, _ in by_group[g]]
        self.main_params = [m for g in LR_GROUPS for _, m in by_group[g]]
        param_groups = [self._group_options(config, g, [m for _, m in pairs])
                        for g, pairs in by_group.items()]
        inner = DistributedScion(param_groups, layouts, groups, tp_mode=config.scion_tp_mode,
                                 dp_mode=config.scion_dp_mode, ns_backend=config.scion_ns_backend,
                                 ns_steps=config.scion_ns_steps,
                                 ns_dtype=config.scion_ns_dtype, clip_grad=config.clip_grad, norm_mask=norm_mask)
        super().__init__(inner, config, init_state_fn=lambda opt, cfg=None: opt.init_state())
        self.optimizer: DistributedScion
        self.is_stub_optimizer = False
        self.grad_stats_parallel_group = groups.world
        self._scale_one = torch.ones(1, device=inner.device)  # megatron reads it where the grads are
        self._last_step: Optional[StepResult] = None
        self._grads: list[Optional[torch.Tensor]] = []

    @staticmethod
    def _master_of(param: torch.nn.Parameter) -> torch.Tensor:
        main = master_weight(param)
        tensor_parallel.copy_tensor_model_parallel_attributes(main, param)
        if hasattr(param, "shared"):
            main.shared = param.shared
        return main

    @staticmethod
    def _group_options(config: ScionConfig, group: str, params: list[torch.Tensor]) -> dict[str, Any]:
        wd_mult = 0.0 if group == "gains" else 1.0
        return {
            "params": params, "name": group, "lr": config.group_lr(group),
            "max_lr": config.group_lr(group), "min_lr": config.group_min_lr(group),
            "radius": config.group_radius(group), "momentum": config.scion_momentum,
            "constrained": config.scion_constrained, "wd_mult": wd_mult,
            "weight_decay": config.weight_decay * wd_mult, "lr_mult": 1.0,
            "is_expert_parallel": False, "is_decoupled_lr": False,
            "default_config": group == "hidden",
        }

    def _pairs(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        return list(zip(self.model_params, self.main_params))

    @torch.no_grad()
    def step(self) -> tuple[bool, Optional[float], Optional[int]]:
        """megatron's template: prepare_grads -> step_with_ready_grads (which clips, with
        ``--clip-grad`` > 0, inside the Scion step: its grad-norm all-reduce is also the clip's).

        ``success`` is False when a non-finite grad anywhere made every rank skip the step.
        """
        self.prepare_grads()
        num_zeros = self.count_zeros() if self.config.log_num_zeros_in_grad else None
        if not self.step_with_ready_grads():
            log_single_rank(logger, logging.WARNING, "Scion: non-finite gradient, step skipped on every rank")
            return False, None, None
        return True, self._last_step.grad_norm, num_zeros

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        """Collect megatron's main_grad (else .grad) for the step, as the fp32 params' ``.grad``
        where their dtypes allow. Returns False (no inf found yet): the Scion step checks
        finiteness itself, with its grad norm, in one all-reduce."""
        self._grads = []
        for param, main in self._pairs():
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            grad = grad if grad is None or main is param else grad.float()
            if grad is None or grad.dtype == main.dtype:
                main.grad = grad
            self._grads.append(grad)
        return False

    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        """The one Scion step (check grads -> momentum -> exchange -> update), then the model
        params refreshed from the fp32 ones; False if it was skipped."""
        self._last_step = self.optimizer.step(self._grads or None)
        if self._last_step.stepped and not self.optimizer.sharded:
            self._copy_main_to_model()
        return self._last_step.stepped

    def zero_grad(self, set_to_none: bool = True) -> None:
        _zero_grad_group_helper(self.model_params, set_to_none)
        _zero_grad_group_helper([m for p, m in self._pairs() if m is not p], set_to_none)

    def get_loss_scale(self) -> torch.Tensor:
        return self._scale_one

    @torch.no_grad()
    def _copy_main_to_model(self) -> None:
        if self.optimizer.sharded:
            self.optimizer.write_masters_to_params()
        for param, main in self._pairs():
            if main is not param:
                param.copy_(main)

    @torch.no_grad()
    def reload_model_params(self, state_dict: Optional[dict] = None) -> None:
        if self.optimizer.sharded:
            self.optimizer.gather_masters()
        for param, main in self._pairs():
            if main is not param:
                main.copy_(param)

    def comm_stats(self) -> dict[str, object]:
        """Bytes this rank sent/received per collective kind (last step and total)."""
        return self.optimizer.comm_stats()

    def state_dict(self) -> dict[str, Any]:
        """Momentum (and fp32 masters of bf16 params) for a same-layout torch checkpoint."""
        return {"format": STATE_FORMAT, "fingerprint": self.optimizer.plan.fingerprint,
                "optimizer": self.optimizer.state_dict(),
                "main_params": {i: m for i, (p, m) in enumerate(self._pairs()) if m is not p}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A ``sharded_state_dict`` loaded by dist_checkpointing (any layout), or a ``state_dict``
        (same layout only)."""
        if state_dict.get("format") == DIST_FORMAT:
            return self._load_matrices(state_dict)
        _check_format(state_dict)
        if "fingerprint" in state_dict and state_dict["fingerprint"] != self.optimizer.plan.fingerprint:
            raise ValueError(
                "Scion optimizer state was saved under another parallel layout or --scion-* "
                "setting; load it through a distributed checkpoint (--ckpt-format torch_dist), "
                "which reshards momentum, or skip it with --no-load-optim")
        inner = state_dict["optimizer"]
        by_name = {g["name"]: g for g in inner["param_groups"]}
        inner["param_groups"] = [by_name[g["name"]] for g in self.optimizer.param_groups]
        masters = dict(state_dict.get("main_params", {}))
        for index, param_state in inner["state"].items():
            if "fp32_param" in param_state:
                masters[index] = param_state.pop("fp32_param")
        self.optimizer.load_state_dict(inner)
        for index, saved in masters.items():
            self.main_params[index].copy_(saved)
        self._copy_main_to_model()

    def sharded_state_dict(self, model_sharded_state_dict: ShardedStateDict,
                           is_loading: bool = False, metadata: Optional[dict] = None) -> ShardedStateDict:
        """Momentum (and the fp32 masters of params that are not fp32) as blocks of one global
        tensor per logical matrix, keyed by the parameter's checkpoint key and the matrix."""
        self.optimizer.init_state()
        model_tensors = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.model_params)
        state = {}
        for index, piece in enumerate(self._state_pieces()):
            if piece.param not in model_tensors:
                raise ValueError(f"{self.optimizer.layouts[piece.param].name}: not in the model's sharded state "
                                 "dict, so its Scion state has no checkpoint key")
            frame = _frame(model_tensors[piece.param])
            shared = frame.replica_id[0] if isinstance(frame.replica_id, tuple) else 0
            name = matrix_key(frame.key, split_matrix_key(piece.matrix.key)[1])  # the key under global layer numbers
            layers = frame.prepend_axis_num
            fragments = None if piece.fragments is None or frame.axis_fragmentations is None \
                else frame.axis_fragmentations[:layers] + piece.fragments
            state[index] = {
                kind: ShardedTensor(f"optimizer.state.{kind}.{name}", tensor.contiguous(), tensor.dtype,
                                    piece.local_shape, frame.global_shape[:layers] + piece.matrix.shape,
                                    frame.global_offset[:layers] + piece.global_offset, fragments,
                                    replica_id=(shared, *piece.replica), prepend_axis_num=layers,
                                    allow_shape_mismatch=frame.allow_shape_mismatch)
                for kind, tensor in self._piece_tensors(piece).items()}
        groups = deepcopy([{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups])
        return {"format": DIST_FORMAT, "param_groups": groups, "state": state}

    def _state_pieces(self) -> list[StatePiece]:
        groups = self.optimizer.groups
        return state_pieces(self.optimizer.plan, self.optimizer.layouts, tp_rank=dist.get_rank(groups.tp),
                            dp_rank=dist.get_rank(groups.dp), slot=self.optimizer.dualizer.me)

    def _piece_tensors(self, piece: StatePiece) -> dict[str, torch.Tensor]:
        """The state tensors of one piece (the fp32 master only for params that are not fp32)."""
        param = self.model_params[piece.param]
        with_master = param.dtype != torch.float32 or is_quantized(param)
        if self.optimizer.sharded:
            owned = self.optimizer.owned[piece.matrix.key]
            return {MOMENTUM: owned.momentum, **({MASTER: owned.master} if with_master else {})}
        main = self.main_params[piece.param]
        momentum = self.optimizer.state[main][MOMENTUM]
        return {MOMENTUM: piece_of(momentum, piece.matrix),
                **({MASTER: piece_of(main, piece.matrix)} if with_master else {})}

    @torch.no_grad()
    def _load_matrices(self, state_dict: dict[str, Any]) -> None:
        """Write the loaded blocks back (they may be copies of what ``sharded_state_dict`` handed
        out). Sharded mode: the owners of fp32 params' matrices, whose masters the checkpoint
        does not hold, re-take them from the loaded model weights."""
        by_name = {g["name"]: g for g in state_dict["param_groups"]}
        for group in self.optimizer.param_groups:
            group.update({k: v for k, v in by_name[group["name"]].items() if k != "params"})
        pieces = self._state_pieces()
        if self.optimizer.sharded:
            self.optimizer.gather_masters(keep={p.matrix.key for i, p in enumerate(pieces)
                                                if MASTER in state_dict["state"][i]})
        for index, piece in enumerate(pieces):
            saved = state_dict["state"][index]
            for kind, target in self._piece_tensors(piece).items():
                if self.optimizer.sharded:
                    target.copy_(saved[kind])
                else:
                    held = self.optimizer.state[self.main_params[piece.param]][MOMENTUM] if kind == MOMENTUM \
                        else self.main_params[piece.param]
                    write_piece(held, piece.matrix, saved[kind])
        self._copy_main_to_model()


def _check_format(state_dict: dict[str, Any]) -> None:
    if state_dict.get("format") != STATE_FORMAT:
        raise ValueError(
            "the checkpoint's optimizer state is not Scion momentum (format "
            f"{state_dict.get('format')!r}, expected {STATE_FORMAT!r}); resume with the optimizer "
            "it was saved with or pass --no-load-optim")


def _frame(model_tensor: ShardedTensor | ShardedTensorFactory) -> ShardedTensor:
    """The model's checkpoint tensor of a parameter (a factory's first, under the factory's key):
    its key, prepended layer axes, replica id and shape-mismatch rule frame its matrices' state."""
    if isinstance(model_tensor, ShardedTensorFactory):
        built = model_tensor.build()
        return replace(built[0] if isinstance(built, list) else next(iter(built.values())), key=model_tensor.key)
    return model_tensor


def _with_chunk_keys(layout: ParamLayout, chunk: int) -> ParamLayout:
    """Prefix matrix keys with the virtual-pipeline chunk so names never collide across chunks."""
    return replace(layout, matrices=tuple(replace(m, key=f"chunk{chunk}/{m.key}") for m in layout.matrices))


def get_scion_optimizer(config: ScionConfig, model_chunks: list[torch.nn.Module],
                        groups: Optional[StageGroups] = None) -> ScionOptimizer:
    """The Scion ``MegatronOptimizer`` for ``model_chunks`` (megatron parallel_state initialised)."""
    return ScionOptimizer(config, model_chunks, groups)
