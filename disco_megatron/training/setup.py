"""What a run needs before its first step: parallel state, data, model and optimizer, resume, outputs."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable, Iterator, Optional, Union

import torch

from disco_megatron.builders import Trainable, build_trainable
from disco_megatron.checkpoint import storage
from disco_megatron.config import RunConfig, RunDir
from disco_megatron.runtime import ParallelInfo, initialize_parallel, quiet_known_warnings
from disco_megatron.training import TrainingError
from disco_megatron.training.logs import RunWriter, log


@dataclass
class Run:
    """One rank's run: its flags, place in the grid, model and optimizer, progress, data and outputs."""

    cfg: RunConfig
    info: ParallelInfo
    parts: Trainable
    state: storage.TrainState
    train_batches: Union[Iterator[dict], list[Iterator[dict]]]  # one per model chunk under the interleaved schedule
    valid_ds: Any  # None without --eval-interval
    num_microbatches: int
    writer: Optional[RunWriter]  # on the writer rank only
    tracker: Any  # disco_megatron.norms.NormTracker


def setup_run(cfg: RunConfig, dp: int) -> Run:
    """This rank's run of ``cfg`` (validated; ``dp`` its DP size), resumed from ``--load`` when it holds one."""
    quiet_known_warnings()
    info = initialize_parallel(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                               cfg.seed, timeout_s=60.0 * cfg.distributed_timeout_minutes,
                               vpp=cfg.virtual_pipeline_model_parallel_size, cp=cfg.context_parallel_size)
    from disco_megatron.data import build_gpt_datasets, micro_batches

    tokenizer, prefix = prepare_data(cfg, info)
    cfg.model.vocab_size = tokenizer.vocab_size
    if info.rank == 0:
        log(f"world {info.world_size} = TP {info.tp} x PP {info.pp} x CP {info.cp} x DP {info.dp}"
            f"{f' ({info.vpp} model chunks per stage)' if info.vpp > 1 else ''}; optimizer {cfg.optimizer}; "
            f"vocab {cfg.model.vocab_size} (padded {cfg.model.padded_vocab_size(info.tp)})")
    parts = build_trainable(cfg)
    if info.rank == 0:
        n_params = sum(p.numel() for chunk in parts.model for p in chunk.parameters())
        log(f"stage 0 / TP rank 0 holds {n_params / 1e6:.2f} M parameters")
    state = resume(cfg, info, parts)

    train_samples = cfg.train_iters * cfg.global_batch_size
    eval_samples = (cfg.eval_iters * cfg.global_batch_size * (cfg.train_iters // cfg.eval_interval + 1)
                    if cfg.eval_interval else 0)
    train_ds, valid_ds, _ = build_gpt_datasets(prefix, tokenizer, cfg.model.seq_length,
                                               (train_samples, eval_samples, 0), cfg.split, cfg.seed,
                                               cfg.data_cache_path and os.path.join(cfg.data_cache_path, "index"))
    train_batches = data_iterators(partial(micro_batches, train_ds, cfg.micro_batch_size, info.dp_rank, info.dp,
                                           state.consumed_samples), info.vpp)

    writer = RunWriter(cfg.run_dir, cfg.tensorboard_dir) if _is_writer_rank(info) else None
    if info.rank == 0 and cfg.run_dir:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(RunDir(cfg.run_dir).run_config, "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    tracker = build_norm_tracker(cfg, info, parts.model, writer, parts.optimizer)
    return Run(cfg, info, parts, state, train_batches, valid_ds, cfg.num_microbatches(dp), writer, tracker)


def data_iterators(make: Callable[[], Iterator[dict]], chunks: int) -> Union[Iterator[dict], list[Iterator[dict]]]:
    """The schedule's data iterator: one, or one per model chunk under the interleaved schedule (each chunk
    draws every microbatch, as Megatron-LM gives each chunk its own loader over the same data)."""
    return make() if chunks == 1 else [make() for _ in range(chunks)]


def _is_writer_rank(info: ParallelInfo) -> bool:
    """The last stage's first rank writes logs (it is where the loss is)."""
    return info.is_last_stage and info.tp_rank == 0 and info.dp_rank == 0 and info.cp_rank == 0


def prepare_data(cfg: RunConfig, info: ParallelInfo):
    """Tokenizer and indexed-dataset prefix: the user's, or the embedded corpus (built by rank 0)."""
    from disco_megatron.data import SentencePieceTokenizer, build_embedded_dataset

    if cfg.data_path is not None:
        return SentencePieceTokenizer(cfg.tokenizer_model), cfg.data_path
    cache = cfg.data_cache_path
    outcome = [None]
    if info.rank == 0:
        log("preparing the embedded corpus, tokenizer and indexed dataset (cached after the first run)")
        try:
            outcome[0] = ("ok", build_embedded_dataset(cache, cfg.model.vocab_size))
        except Exception as exc:  # every rank must learn about the failure, not hang at a barrier
            outcome[0] = ("error", f"{type(exc).__name__}: {exc}")
    torch.distributed.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise TrainingError(f"building the embedded dataset failed on rank 0: {value}")
    prefix, model_path = value
    cfg.tokenizer_model = model_path
    return SentencePieceTokenizer(model_path), prefix


def resume(cfg: RunConfig, info: ParallelInfo, parts: Trainable) -> storage.TrainState:
    """The progress saved under ``--load`` (model, optimizer, scheduler and RNG loaded into ``parts``),
    or a fresh start when there is no ``--load`` or it holds no checkpoint yet."""
    if cfg.load is None:
        return storage.TrainState()
    if cfg.ckpt_step is None and storage.latest_iteration_or_none(cfg.load) is None:
        if info.rank == 0:
            log(f"--load {cfg.load} holds no checkpoint yet; starting from scratch")
        return storage.TrainState()
    state = storage.load_checkpoint(cfg.load, parts.model, parts.optimizer, parts.scheduler, asdict(cfg.model),
                                    info.layout, load_optim=not cfg.no_load_optim, load_rng=not cfg.no_load_rng,
                                    iteration=cfg.ckpt_step)
    if info.rank == 0:
        log(f"resumed from {cfg.load} at iteration {state.iteration} ({state.consumed_samples} samples consumed)")
    return state


def build_norm_tracker(cfg: RunConfig, info: ParallelInfo, model, writer: Optional[RunWriter], optimizer):
    """The per-step norm tracker over every model chunk (global parameter names); it writes
    ``--norm-log-file`` and TensorBoard scalars on the writer rank."""
    from megatron.core import parallel_state as ps

    from disco_megatron.models.sharding import global_param_name
    from disco_megatron.norms import JsonlNormWriter, NormTracker, TensorBoardNormWriter, norm_log_path
    from disco_megatron.norms.owners import optimizer_svd_owners
    from disco_megatron.norms.steps import optimizer_step_source

    writers = []
    path = norm_log_path(cfg.norm_log_file, cfg.run_dir, cfg.tensorboard_dir, cfg.save)
    if writer is not None and path:
        writers.append(JsonlNormWriter(path))
    if writer is not None and writer.tb is not None:
        writers.append(TensorBoardNormWriter(writer.tb))
    named = [(global_param_name(name, info.pp_rank, cfg.model.num_layers, info.pp, vp_stage, info.vpp), param)
             for vp_stage, chunk in enumerate(model) for name, param in chunk.named_parameters()]
    return NormTracker(named, cfg.norm_log_interval, ps.get_tensor_model_parallel_group(),
                       ps.get_pipeline_model_parallel_group(), info.dp_rank, info.pp_rank, info.pp, writers,
                       with_condition=cfg.norm_condition_number, model_cfg=model[0].config,
                       step_source=optimizer_step_source(optimizer, [p for _, p in named]),
                       svd_owners=optimizer_svd_owners(optimizer, named))
