"""Megatron-LM plug-in: ``--optimizer scion`` inside Megatron-LM's own ``pretrain`` loop.

Written against Megatron-LM core_r0.16 (``megatron/training/{arguments,training}.py``, the
release that matches megatron-core 0.16.1). :func:`install` patches, each for a reason found
in that source:

- ``arguments.add_megatron_arguments`` also runs :func:`add_scion_args`: the Scion flags of
  ``disco_megatron.scion_options``, ``--norm-log-interval``/``--norm-log-file``, and ``scion``
  appended to ``--optimizer``'s ``choices`` (Megatron-LM allows adam/sgd/muon/dist_muon).
  Patching the parser itself, not ``extra_args_provider``, matters: ``pretrain_gpt.py`` parses
  the command line once before ``pretrain`` (in-process restart) without any provider.
- ``training.get_megatron_optimizer_config`` raises "Invalid optimizer type!" for anything but
  adam/sgd/muon: for ``scion`` it returns a ``ScionConfig`` built from the flags. Megatron-LM's
  lr scheduler rewrites every group's weight decay from ``--start/end-weight-decay`` each step,
  so those are set to ``--scion-weight-decay``.
- ``training.get_model`` wraps the model in DDP with ``args.use_distributed_optimizer``, which
  would reduce-scatter the grads (each DP rank then holds a reduced shard only); Scion reads
  whole grads and shards its own work, so for ``scion`` the flag is taken as
  ``--scion-dp-mode sharded`` and turned off before DDP is built (:func:`map_distributed_optimizer`).
  ``--clip-grad`` (Megatron-LM's default 1.0) clips as megatron-core's optimizers do.
- ``get_megatron_optimizer`` (megatron-core's, and the name ``training.py`` imported) returns
  :class:`ScionOptimizer` when ``config.optimizer == "scion"``; every other optimizer goes to
  the original untouched.
- Norm statistics: ``setup_model_and_optimizer`` builds a :class:`NormTracker` over the model
  chunks, ``optimizer.step`` snapshots the weights on logging steps and ``training_log``
  (called on every rank after every step, with the loss on the last stage) writes the record.

Use ``python -m disco_megatron.integrations.megatron_lm pretrain_gpt.py FLAGS`` (no edit to
Megatron-LM), or call :func:`install` at the top of ``pretrain_gpt.py``'s ``__main__`` block
(see ``examples/megatron_lm/README.md``).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import logging
import os
import runpy
import sys
from typing import Any, Callable, Optional, Sequence

import torch

from disco_megatron.config import RUN_FLAGS, RunConfig, add_flags
from disco_megatron.scion_options import add_scion_arguments, dp_mode_for

__all__ = ["SCION", "add_scion_args", "map_distributed_optimizer", "install", "uninstall", "global_named_params",
           "NormHook", "build_norm_hook", "main"]

logger = logging.getLogger(__name__)

SCION = "scion"
_TRAINING = "megatron.training.training"
_ARGUMENTS = "megatron.training.arguments"
_OPTIMIZER = "megatron.core.optimizer"
# (module, attribute) -> original, for uninstall() and so install() is idempotent.
_ORIGINALS: dict[tuple[str, str], Any] = {}
_NORM_HOOK: Optional["NormHook"] = None
_NORM_FLAG = {"norm_log_interval": (*RUN_FLAGS["norm_log_interval"][:2],
                                    RUN_FLAGS["norm_log_interval"][2] + " (0: off)")}


def add_scion_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: Scion flags, ``--norm-log-interval``, ``--optimizer scion``.

    Idempotent: :func:`install` adds it to every Megatron-LM parser, and a script may pass it too.
    """
    if "--scion-momentum" in parser._option_string_actions:
        return parser
    optimizer = parser._option_string_actions.get("--optimizer")
    if optimizer is not None and optimizer.choices is not None and SCION not in optimizer.choices:
        optimizer.choices = [*optimizer.choices, SCION]
    group = parser.add_argument_group("scion", "disco_megatron: distributed Scion (--optimizer scion)")
    add_scion_arguments(group, "scion_", argparse_choices=True)
    if "--norm-log-interval" not in parser._option_string_actions:
        add_flags(group, _NORM_FLAG, RunConfig(), "")
    group.add_argument("--norm-log-file", default=None,
                       help="norms.jsonl path (default: TENSORBOARD_DIR/norms.jsonl, else SAVE/norms.jsonl)")
    group.add_argument("--norm-condition-number", action="store_true",
                       help="log each matrix's condition number (an exact SVD per matrix per logging step)")
    return parser


def _get_megatron_optimizer(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_megatron_optimizer(config, model_chunks, *args, **kwargs):
        if getattr(config, "optimizer", None) != SCION:
            return original(config, model_chunks, *args, **kwargs)
        from disco_megatron.optim.config import ScionConfig
        from disco_megatron.optim.megatron import get_scion_optimizer

        if not isinstance(config, ScionConfig):
            raise TypeError("optimizer 'scion' needs a ScionConfig (disco_megatron.optim.ScionConfig or "
                            f"scion_config_from_args(args)), got {type(config).__name__}")
        bound = inspect.signature(original).bind(config, model_chunks, *args, **kwargs).arguments
        if bound.get("config_overrides"):
            raise ValueError("--optimizer scion sets its own parameter groups (embedding, hidden, output, "
                             "gains); per-parameter config_overrides are not supported")
        if bound.get("pg_collection") is not None:
            raise ValueError("--optimizer scion takes its process groups from megatron parallel_state; "
                             "pass pg_collection=None")
        return get_scion_optimizer(config, list(model_chunks))

    return get_megatron_optimizer


def map_distributed_optimizer(args: argparse.Namespace) -> None:
    """For ``--optimizer scion``: ``--use-distributed-optimizer`` becomes ``--scion-dp-mode sharded``
    and is turned off, so DDP all-reduces whole grads (Scion's sharded mode splits its own work).

    ``--overlap-param-gather`` needs megatron's DistributedOptimizer and is refused.
    """
    if args.optimizer != SCION or not args.use_distributed_optimizer:
        return
    if getattr(args, "overlap_param_gather", False):
        raise ValueError("--optimizer scion with --use-distributed-optimizer runs Scion's own DP-sharded mode, "
                         "which has no parameter all-gather to overlap: drop --overlap-param-gather")
    logger.info("--optimizer scion: --use-distributed-optimizer runs as --scion-dp-mode sharded")
    args.scion_dp_mode = dp_mode_for(args.scion_dp_mode, True)
    args.use_distributed_optimizer = False


def _get_model(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_model(*args, **kwargs):
        from megatron.training import get_args

        map_distributed_optimizer(get_args())
        return original(*args, **kwargs)

    return get_model


def _get_megatron_optimizer_config(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_megatron_optimizer_config(args):
        if args.optimizer != SCION:
            return original(args)
        from disco_megatron.optim.config import scion_config_from_args

        config = scion_config_from_args(args)  # --scion-preset resolved
        # The scheduler sets each group's weight_decay from start/end_weight_decay every step.
        args.weight_decay = args.start_weight_decay = args.end_weight_decay = config.weight_decay
        return config, None

    return get_megatron_optimizer_config


def _add_megatron_arguments(original: Callable) -> Callable:
    @functools.wraps(original)
    def add_megatron_arguments(parser):
        return add_scion_args(original(parser))

    return add_megatron_arguments


def global_named_params(model_chunks: Sequence[torch.nn.Module]) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters of every chunk with wrapper prefixes stripped and global layer numbers.

    A layer's global index is its ``layer_number - 1`` (megatron-core sets it with the PP /
    virtual-PP offset), so uneven and interleaved pipelines are named right too.
    """
    from megatron.core.utils import get_attr_wrapped_model

    from disco_megatron.models.naming import canonical_name

    named = []
    for chunk in model_chunks:
        renamed: dict[torch.nn.Parameter, str] = {}
        decoder = get_attr_wrapped_model(chunk, "decoder")
        for layer in decoder.layers if decoder is not None else ():
            for name, param in layer.named_parameters():
                renamed[param] = f"decoder.layers.{layer.layer_number - 1}.{name}"
        named.extend((renamed.get(param, canonical_name(name)), param) for name, param in chunk.named_parameters())
    return named


class NormHook:
    """Megatron-LM's step order: ``optimizer.step()`` (snapshot here), then ``training_log`` (write)."""

    def __init__(self, tracker, optimizer, args: argparse.Namespace) -> None:
        self.tracker, self.optimizer, self.args = tracker, optimizer, args
        step = optimizer.step

        @functools.wraps(step)
        def step_with_snapshot(*a, **k):
            iteration = args.curr_iteration + 1  # train() numbers the step being taken from 0
            if tracker.should_log(iteration):
                tracker.before_step(iteration)
            return step(*a, **k)

        optimizer.step = step_with_snapshot

    def after_log(self, iteration: int, loss_dict: dict) -> None:
        if not self.tracker.should_log(iteration):
            return
        from disco_megatron.builders import group_lrs

        loss = loss_dict.get("lm loss") if loss_dict else None
        self.tracker.after_step(iteration, tokens=self.args.consumed_train_samples * self.args.seq_length,
                                loss=None if loss is None else float(loss), lrs=group_lrs(self.optimizer))


def _norm_writers(args: argparse.Namespace) -> list:
    from disco_megatron.norms import JsonlNormWriter, TensorBoardNormWriter, norm_log_path

    writers = []
    path = norm_log_path(args.norm_log_file, None, args.tensorboard_dir, args.save)
    if path:
        writers.append(JsonlNormWriter(path))
    if args.tensorboard_dir:
        from megatron.training.global_vars import get_tensorboard_writer
        from torch.utils.tensorboard import SummaryWriter

        writers.append(TensorBoardNormWriter(get_tensorboard_writer() or SummaryWriter(args.tensorboard_dir)))
    return writers


def build_norm_hook(model_chunks: Sequence[torch.nn.Module], optimizer, args: argparse.Namespace) -> NormHook:
    """The tracker over ``model_chunks`` (writers on its writer rank only), hooked into ``optimizer``."""
    from megatron.core import parallel_state as ps

    from megatron.core.utils import get_attr_wrapped_model

    from disco_megatron.norms import NormTracker
    from disco_megatron.norms.owners import optimizer_svd_owners
    from disco_megatron.norms.steps import optimizer_step_source

    named = global_named_params(model_chunks)
    tracker = NormTracker(named, args.norm_log_interval,
                          ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
                          ps.get_data_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                          ps.get_pipeline_model_parallel_world_size(), [],
                          with_condition=args.norm_condition_number,
                          model_cfg=get_attr_wrapped_model(model_chunks[0], "config"),
                          step_source=optimizer_step_source(optimizer, [p for _, p in named]),
                          svd_owners=optimizer_svd_owners(optimizer, named))
    if tracker.is_writer:
        tracker.writers.extend(_norm_writers(args))
    return NormHook(tracker, optimizer, args)


def _setup_model_and_optimizer(original: Callable) -> Callable:
    @functools.wraps(original)
    def setup_model_and_optimizer(*args, **kwargs):
        global _NORM_HOOK
        model, optimizer, scheduler = original(*args, **kwargs)
        from megatron.training import get_args

        margs = get_args()
        _NORM_HOOK = None
        if optimizer is not None and getattr(margs, "norm_log_interval", 0) > 0:
            _NORM_HOOK = build_norm_hook(model, optimizer, margs)
        return model, optimizer, scheduler

    return setup_model_and_optimizer


def _training_log(original: Callable) -> Callable:
    @functools.wraps(original)
    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs):
        result = original(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs)
        if _NORM_HOOK is not None:
            _NORM_HOOK.after_log(iteration, loss_dict)
        return result

    return training_log


def _patch(module: Any, name: str, wrap: Callable[[Callable], Callable]) -> None:
    key = (module.__name__, name)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = getattr(module, name)
        setattr(module, name, wrap(_ORIGINALS[key]))


def _training_module() -> Optional[Any]:
    try:
        return importlib.import_module(_TRAINING)
    except ImportError:
        return None


def install() -> bool:
    """Patch megatron-core (always) and Megatron-LM's training module (when importable).

    Idempotent. Returns whether ``megatron.training`` was found and patched.
    """
    core = importlib.import_module(_OPTIMIZER)
    _patch(core, "get_megatron_optimizer", _get_megatron_optimizer)
    training = _training_module()
    if training is None:
        return False
    _patch(training, "get_megatron_optimizer", _get_megatron_optimizer)
    _patch(training, "get_megatron_optimizer_config", _get_megatron_optimizer_config)
    _patch(training, "setup_model_and_optimizer", _setup_model_and_optimizer)
    _patch(training, "get_model", _get_model)
    _patch(training, "training_log", _training_log)
    _patch(importlib.import_module(_ARGUMENTS), "add_megatron_arguments", _add_megatron_arguments)
    return True


def uninstall() -> None:
    """Undo :func:`install` (tests; a process that wants megatron's functions back)."""
    global _NORM_HOOK
    for (module_name, name), original in _ORIGINALS.items():
        setattr(importlib.import_module(module_name), name, original)
    _ORIGINALS.clear()
    _NORM_HOOK = None


def _die(message: str) -> None:
    print(f"disco_megatron.integrations.megatron_lm: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m disco_megatron.integrations.megatron_lm SCRIPT.py FLAGS``: run a Megatron-LM script with Scion."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".py") or not os.path.isfile(argv[0]):
        _die("usage: python -m disco_megatron.integrations.megatron_lm PRETRAIN_SCRIPT.py [Megatron-LM flags], "
             f"e.g. Megatron-LM's pretrain_gpt.py --optimizer scion ... (got {' '.join(argv) or 'no script'})")
    if not install():
        _die("megatron.training is not importable: put a Megatron-LM checkout (core_r0.16) on PYTHONPATH")
    script = os.path.abspath(argv[0])
    sys.path.insert(0, os.path.dirname(script))
    sys.argv = [script, *argv[1:]]
    runpy.run_path(script, run_name="__main__")
    # Megatron-LM's pretrain() returns with its process groups alive (and the norm hook holds the
    # optimizer's); their gloo threads would be ended by the exiting interpreter, which can abort it
    # (SIGABRT) after all the work succeeded.
    global _NORM_HOOK
    _NORM_HOOK = None
    from disco_megatron.runtime import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main()
