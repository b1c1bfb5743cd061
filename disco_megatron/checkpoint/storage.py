"""Atomic megatron dist_checkpointing save/load of model, optimizer, scheduler, data position and RNG.

Layout of a save directory (Megatron-LM names, so its tools and ours read each other):
    SAVE/iter_0000100/            one dist_checkpointing checkpoint (written as iter_0000100.tmp, then renamed)
    SAVE/latest_checkpointed_iteration.txt   pointer, replaced atomically after the rename
A crash during a save leaves a ``.tmp`` directory behind and the previous checkpoint and pointer valid.
The pointer and the iteration directories are read here only, for our checkpoints and for
Megatron-LM's legacy ones (``checkpoint.legacy``), whose pointer may also say ``release``.
"""
from __future__ import annotations

import os
import queue
import random
import shutil
import signal
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

LATEST_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"  # Megatron-LM's pointer text for a released checkpoint, LOAD/release/
# Test hook: comma-separated iterations whose save is killed (SIGKILL on rank 0) after the shards
# are written and before the rename, the worst moment for the atomicity promised above.
FAULT_KILL_IN_SAVE_ENV = "DISCO_FAULT_KILL_IN_SAVE_AT"
_CORRUPT_HINT = "the checkpoint is corrupt or incomplete; load another saved iteration with --ckpt-step"
# Model fields that must agree between a checkpoint and the model that loads it.
SHAPE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "vocab_size", "swiglu", "untie_embeddings_and_output_weights", "add_bias_linear", "normalization",
)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the model being loaded."""


@dataclass
class TrainState:
    """Training-loop progress saved beside the tensors."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


def checkpoint_dir(save: str, iteration: int) -> str:
    return os.path.join(save, f"iter_{iteration:07d}")


def saved_iterations(save: str) -> list[int]:
    """Iterations with a complete (renamed) checkpoint directory under ``save``, ascending."""
    names = os.listdir(save) if os.path.isdir(save) else []
    return sorted(int(n[5:]) for n in names
                  if n.startswith("iter_") and n[5:].isdigit() and os.path.isdir(os.path.join(save, n)))


def require_saved_iteration(load: str, iteration: int) -> str:
    """``--ckpt-step``'s directory under ``--load``; CheckpointError listing the saved iterations when absent."""
    path = checkpoint_dir(load, iteration)
    if not os.path.isdir(path):
        saved = ", ".join(map(str, saved_iterations(load))) or "none"
        raise CheckpointError(f"--ckpt-step {iteration}: {path} does not exist "
                              f"(saved iterations in --load {load}: {saved})")
    return path


def read_latest_iteration(load: str, release_ok: bool = False) -> Union[int, str]:
    """The iteration the ``latest`` pointer names, whose directory must exist; ``RELEASE`` where
    ``release_ok`` (Megatron-LM's released checkpoints). CheckpointError otherwise, naming the file."""
    pointer = os.path.join(load, LATEST_FILE)
    if not os.path.isfile(pointer):
        raise CheckpointError(f"--load {load}: no {LATEST_FILE} (not a disco_megatron/Megatron checkpoint "
                              "directory; or name the iteration with --ckpt-step)")
    with open(pointer) as f:
        text = f.read().strip()
    if release_ok and text == RELEASE:
        return RELEASE
    if not text.isdigit():
        expected = f"an iteration number or {RELEASE!r}" if release_ok else "an iteration number"
        raise CheckpointError(f"--load {load}: {LATEST_FILE} holds {text!r}, not {expected}")
    iteration = int(text)
    if not os.path.isdir(checkpoint_dir(load, iteration)):
        raise CheckpointError(f"--load {load}: {LATEST_FILE} names iteration {iteration} but "
                              f"{checkpoint_dir(load, iteration)} is missing")
    return iteration


def latest_iteration_or_none(load: Optional[str]) -> Optional[int]:
    """Like read_latest_iteration, but None when the directory has no pointer yet (fresh run)."""
    if load is None or not os.path.isfile(os.path.join(load, LATEST_FILE)):
        return None
    return read_latest_iteration(load)


def write_latest_iteration(save: str, iteration: int) -> None:
    """Replace the ``latest`` pointer atomically (a reader sees the old or the new iteration)."""
    path = os.path.join(save, LATEST_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fault_kill_iterations() -> set[int]:
    text = os.environ.get(FAULT_KILL_IN_SAVE_ENV, "")
    return {int(x) for x in text.split(",") if x.strip()}


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "tracker": _tracker_states()}


def _tracker_states() -> dict:
    from megatron.core.tensor_parallel import random as mp_random

    return {k: v.clone() for k, v in mp_random.get_cuda_rng_tracker().get_states().items()}


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import random as mp_random

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    mp_random.get_cuda_rng_tracker().set_states(state["tracker"])


def _chunk_keys(model) -> list:
    """(chunk, key of its state) of ``model``: one model stage (key None: its state is the whole
    ``model`` entry), or the list of chunks of the interleaved schedule (key ``chunkN``)."""
    if not isinstance(model, list):
        return [(model, None)]
    if len(model) == 1:
        return [(model[0], None)]
    return [(chunk, f"chunk{index}") for index, chunk in enumerate(model)]


def _model_sharded_state(model) -> dict:
    """The model's sharded state. Tensor keys are global (megatron numbers each chunk's layers from
    its offset), so the files do not depend on the chunking and load into any layout."""
    pairs = _chunk_keys(model)
    if pairs[0][1] is None:
        return pairs[0][0].sharded_state_dict()
    return {key: chunk.sharded_state_dict() for chunk, key in pairs}


def _load_model_state(model, loaded: dict) -> None:
    for chunk, key in _chunk_keys(model):
        chunk.load_state_dict(loaded if key is None else loaded[key])


def _sharded_state(model, optimizer, scheduler, state: TrainState, model_config: dict,
                   parallel: dict, is_loading: bool, with_optimizer: bool, with_rng: bool) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = _model_sharded_state(model)
    sharded = {
        "model": model_sd,
        "train_state": vars(state).copy(),
        "model_config": model_config,
        "parallel": parallel,
    }
    if scheduler is not None:
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    if with_optimizer and optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
        sharded["optimizer_type"] = type(optimizer).__name__
    if with_rng:
        pp, tp, dp = parallel["pp"], parallel["tp"], parallel["dp"]
        sharded["rng_state"] = ShardedObject(
            "rng_state", _rng_state(), (pp, tp, dp),
            (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
             ps.get_data_parallel_rank()), replica_id=0,
        )
    return sharded


def _in_process_results_queue() -> None:
    """Give megatron's checkpoint writer a plain queue instead of a multiprocessing Manager's.

    On a rank's first save megatron spawns a Manager process only to carry write results, and keeps
    it for the rank's life. A synchronous save (ours) runs the writer in this process and needs no
    such process; a rank killed hard (SIGKILL, OOM killer) would leave it orphaned, holding the
    launcher's output pipes open, and spawning it costs seconds.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(save: str, model, optimizer, scheduler, state: TrainState, model_config: dict,
                    parallel: dict) -> str:
    """Write ``SAVE/iter_N`` atomically on every rank, then move the ``latest`` pointer (rank 0).

    ``model``: this rank's model stage, or the list of its model chunks."""
    from megatron.core import dist_checkpointing

    final = checkpoint_dir(save, state.iteration)
    tmp = final + ".tmp"
    rank = torch.distributed.get_rank()
    if rank == 0:
        os.makedirs(save, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    torch.distributed.barrier()
    sharded = _sharded_state(model, optimizer, scheduler, state, model_config, parallel,
                             is_loading=False, with_optimizer=True, with_rng=True)
    _in_process_results_queue()
    dist_checkpointing.save(sharded, tmp)
    torch.distributed.barrier()
    if rank == 0 and state.iteration in _fault_kill_iterations():
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_latest_iteration(save, state.iteration)
    torch.distributed.barrier()
    return final


def verify_files(load: str, ckpt: str) -> None:
    """Refuse a checkpoint whose metadata or shard files are missing or truncated, naming the file.

    Every rank checks every file before the collective load, so a corrupt file gives the same
    message on all ranks instead of an error on the ranks that read it and a hang on the others.
    """
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(ckpt).read_metadata()
    except Exception as exc:
        raise CheckpointError(f"--load {load}: cannot read {os.path.join(ckpt, '.metadata')} "
                              f"({type(exc).__name__}: {exc}); {_CORRUPT_HINT}") from exc
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = os.path.join(ckpt, name)
        actual = os.path.getsize(path) if os.path.isfile(path) else None
        if actual is None or actual < size:
            found = "is missing" if actual is None else f"has {actual} bytes"
            raise CheckpointError(f"--load {load}: {path} {found}, its metadata needs {size}; {_CORRUPT_HINT}")


def _one_line(exc: BaseException) -> str:
    """A load failure in one line (torch's CheckpointException carries a traceback per rank)."""
    failures = getattr(exc, "failures", None)
    if failures:
        rank, failure = next(iter(failures.items()))
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {type(inner).__name__}: {inner}"
    return f"{type(exc).__name__}: {exc}"


def check_compatible(ckpt: str, saved: dict, current: dict) -> None:
    """Refuse a checkpoint of another model shape, naming the field and both values."""
    for key in SHAPE_FIELDS:
        if key in saved and saved.get(key) != current.get(key):
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(
                f"--load {ckpt}: checkpoint has {key}={saved.get(key)} but this run has {flag} "
                f"{current.get(key)}; use matching model flags (or convert the checkpoint)"
            )


def read_common_state(load: str, iteration: Optional[int] = None) -> tuple[str, dict]:
    """(iteration directory, its common state) of the latest or given iteration, without loading tensors."""
    from megatron.core import dist_checkpointing

    ckpt = checkpoint_dir(load, read_latest_iteration(load)) if iteration is None \
        else require_saved_iteration(load, iteration)
    try:
        return ckpt, dist_checkpointing.load_common_state_dict(ckpt)
    except Exception as exc:  # corrupt/partial files: say which, not a traceback wall
        raise CheckpointError(f"--load {load}: cannot read {os.path.join(ckpt, 'common.pt')} "
                              f"({type(exc).__name__}: {exc}); {_CORRUPT_HINT}") from exc


def load_checkpoint(load: str, model, optimizer, scheduler, model_config: dict, parallel: dict,
                    load_optim: bool = True, load_rng: bool = True,
                    iteration: Optional[int] = None) -> TrainState:
    """Load the latest (or the given) iteration under ``load`` into this rank's model/optimizer/scheduler."""
    from megatron.core import dist_checkpointing

    ckpt, common = read_common_state(load, iteration)
    verify_files(load, ckpt)
    check_compatible(load, common.get("model_config", {}), model_config)
    same_layout = common.get("parallel") == parallel
    has_optimizer = "optimizer_type" in common
    if load_optim and has_optimizer and common["optimizer_type"] != type(optimizer).__name__:
        raise CheckpointError(
            f"--load {load}: checkpoint optimizer is {common['optimizer_type']} but this run uses "
            f"{type(optimizer).__name__}; pass --no-load-optim to start the optimizer fresh"
        )
    with_optim = load_optim and has_optimizer
    saved_optimizer = common.get("optimizer")
    saved_format = saved_optimizer.get("format") if isinstance(saved_optimizer, dict) else None
    expected_format = getattr(optimizer, "checkpoint_format", None)
    if with_optim and expected_format is not None and saved_format != expected_format:
        raise CheckpointError(
            f"--load {load}: its {common['optimizer_type']} state has format {saved_format!r}, this version "
            f"reads {expected_format!r}; resume with the version that saved it, or pass --no-load-optim to "
            "start the optimizer fresh"
        )
    sharded = _sharded_state(model, optimizer, scheduler, TrainState(), model_config, parallel,
                             is_loading=True, with_optimizer=with_optim, with_rng=load_rng and same_layout)
    try:
        loaded = dist_checkpointing.load(sharded, ckpt)
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise CheckpointError(f"--load {load}: cannot load {ckpt} ({_one_line(exc)})") from exc
    _load_model_state(model, loaded["model"])
    if with_optim:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return TrainState(**loaded["train_state"])
