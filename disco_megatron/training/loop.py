"""The pretraining loop on megatron-core: pipeline schedules, DDP, optimizer, scheduler, eval, checkpoints.

The loop only uses the ``MegatronOptimizer`` interface, so Scion and megatron's Adam are
interchangeable, and the same Scion optimizer runs inside Megatron-LM's own loop.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from functools import partial
from typing import Iterator, Optional

import torch

from disco_megatron.config import RunConfig
from disco_megatron.runtime import ParallelInfo, initialize_parallel
from disco_megatron.training import checkpointing
from disco_megatron.training.logs import RunWriter, log, quiet_known_warnings
from disco_megatron.training.optimizers import build_optimizer, build_scheduler, group_lrs

# Test hook: comma-separated iterations whose loss is made NaN (exercises the skip path).
FAULT_NAN_ENV = "DISCO_FAULT_NAN_AT"


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row)."""


def _nan_iterations() -> set[int]:
    text = os.environ.get(FAULT_NAN_ENV, "")
    return {int(x) for x in text.split(",") if x.strip()}


def loss_func(loss_mask: torch.Tensor, poison: bool, output_tensor: torch.Tensor):
    """Mean next-token cross entropy over unmasked tokens of one microbatch."""
    losses = output_tensor.float()
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses.view(-1) * mask) / mask.sum().clamp(min=1.0)
    if poison:
        loss = loss * float("nan")
    return loss, {"lm loss": loss.detach().clone()}  # the schedule divides `loss` in place


def make_forward_step(poison: bool = False):
    """megatron's forward_step_func: a batch from the iterator through the model stage."""

    def forward_step(data_iterator: Iterator[dict], model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"], poison)

    return forward_step


def _model_config_record(cfg: RunConfig) -> dict:
    return asdict(cfg.model)


def _reduce_mean_loss(losses: list, info: ParallelInfo) -> Optional[float]:
    """Average of the microbatch losses over DP, known on the last stage (None elsewhere)."""
    from megatron.core import parallel_state as ps

    if not info.is_last_stage:
        return None
    value = torch.stack([x["lm loss"] for x in losses]).mean()
    torch.distributed.all_reduce(value, group=ps.get_data_parallel_group())
    return value.item() / info.dp


def _grads_finite(params: list[torch.nn.Parameter]) -> bool:
    """Whether every rank's gradients are finite (one all-reduce over the whole world)."""
    bad = torch.zeros(1)
    for p in params:
        grad = getattr(p, "main_grad", None)
        grad = p.grad if grad is None else grad
        if grad is not None and not torch.isfinite(grad).all():
            bad.fill_(1.0)
            break
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0.0


def _writer_rank(info: ParallelInfo) -> bool:
    """The last stage's first rank writes logs (it is where the loss is)."""
    return info.is_last_stage and info.tp_rank == 0 and info.dp_rank == 0


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


def wrap_ddp(model, cfg: RunConfig):
    """megatron DDP around this stage (grads in ``main_grad``) and the schedule's grad hooks."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                      use_distributed_optimizer=False),
        model,
    )
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return ddp


def evaluate(cfg: RunConfig, info: ParallelInfo, ddp, valid_ds, num_mb: int) -> Optional[float]:
    """Mean validation loss over ``--eval-iters`` global batches from the start of the valid split."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from disco_megatron.data import micro_batches

    ddp.eval()
    iterator = micro_batches(valid_ds, cfg.micro_batch_size, info.dp_rank, info.dp, 0)
    values = []
    with torch.no_grad():
        for _ in range(cfg.eval_iters):
            losses = get_forward_backward_func()(
                forward_step_func=make_forward_step(), data_iterator=iterator, model=[ddp],
                num_microbatches=num_mb, seq_length=cfg.model.seq_length,
                micro_batch_size=cfg.micro_batch_size, forward_only=True)
            values.append(_reduce_mean_loss(losses, info))
    ddp.train()
    return None if values[0] is None else sum(values) / len(values)


def pretrain(cfg: RunConfig, dp: int) -> dict:
    """Train ``cfg`` (already validated: ``dp = cfg.validate(world)``) end to end on this rank;
    returns a summary (losses on the writer rank)."""
    quiet_known_warnings()
    info = initialize_parallel(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                               cfg.seed, timeout_s=60.0 * cfg.distributed_timeout_minutes)
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from disco_megatron.data import build_gpt_datasets, micro_batches
    from disco_megatron.models import build_gpt_model

    tokenizer, prefix = prepare_data(cfg, info)
    cfg.model.vocab_size = tokenizer.vocab_size
    writer_rank = _writer_rank(info)
    if info.rank == 0:
        log(f"world {info.world_size} = TP {info.tp} x PP {info.pp} x DP {info.dp}; optimizer {cfg.optimizer}; "
            f"vocab {cfg.model.vocab_size} (padded {cfg.model.padded_vocab_size(info.tp)})")
    model = build_gpt_model(cfg.model)
    ddp = wrap_ddp(model, cfg)
    optimizer = build_optimizer(cfg, [ddp])
    scheduler = build_scheduler(cfg, optimizer)
    n_params = sum(p.numel() for p in model.parameters())
    if info.rank == 0:
        log(f"stage 0 / TP rank 0 holds {n_params / 1e6:.2f} M parameters")

    parallel = {"tp": info.tp, "pp": info.pp, "dp": info.dp}
    state = checkpointing.TrainState()
    if cfg.load is not None and (cfg.ckpt_step is not None
                                 or checkpointing.latest_iteration_or_none(cfg.load) is not None):
        state = checkpointing.load_checkpoint(cfg.load, model, optimizer, scheduler, _model_config_record(cfg),
                                              parallel, load_optim=not cfg.no_load_optim,
                                              load_rng=not cfg.no_load_rng, iteration=cfg.ckpt_step)
        if info.rank == 0:
            log(f"resumed from {cfg.load} at iteration {state.iteration} "
                f"({state.consumed_samples} samples consumed)")
    elif cfg.load is not None and info.rank == 0:
        log(f"--load {cfg.load} holds no checkpoint yet; starting from scratch")

    num_mb = cfg.num_microbatches(dp)
    train_samples = cfg.train_iters * cfg.global_batch_size
    eval_samples = (cfg.eval_iters * cfg.global_batch_size * (cfg.train_iters // cfg.eval_interval + 1)
                    if cfg.eval_interval else 0)
    train_ds, valid_ds, _ = build_gpt_datasets(prefix, tokenizer, cfg.model.seq_length,
                                               (train_samples, eval_samples, 0), cfg.split, cfg.seed,
                                               cfg.data_cache_path and os.path.join(cfg.data_cache_path, "index"))
    train_iter = micro_batches(train_ds, cfg.micro_batch_size, info.dp_rank, info.dp, state.consumed_samples)

    writer = RunWriter(cfg.run_dir, cfg.tensorboard_dir) if writer_rank else None
    if info.rank == 0 and cfg.run_dir:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "run_config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)
    tracker = build_norm_tracker(cfg, info, model, writer, optimizer)

    params = [p for p in model.parameters() if p.requires_grad]
    forward_backward = get_forward_backward_func()
    nan_at = _nan_iterations()
    skipped_in_row = 0
    losses_seen: list[float] = []
    tokens_per_step = cfg.global_batch_size * cfg.model.seq_length
    interval_start = time.perf_counter()
    interval_steps = 0
    first_iteration = state.iteration
    while state.iteration < cfg.train_iters:
        iteration = state.iteration + 1
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(
            forward_step_func=make_forward_step(poison=iteration in nan_at), data_iterator=train_iter,
            model=[ddp], num_microbatches=num_mb, seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.micro_batch_size, forward_only=False)
        loss = _reduce_mean_loss(losses, info)
        state.consumed_samples += cfg.global_batch_size
        state.iteration = iteration
        if _grads_finite(params):
            tracker_active = tracker.should_log(iteration)
            if tracker_active:
                tracker.before_step(iteration)
            success, _, _ = optimizer.step()
            if not success:
                raise TrainingError(f"optimizer step {iteration} failed although gradients were finite")
            scheduler.step(increment=cfg.global_batch_size)
            skipped_in_row = 0
            if tracker_active:
                tracker.after_step(iteration, tokens=state.consumed_samples * cfg.model.seq_length,
                                   loss=loss, lrs=group_lrs(optimizer))
        else:
            state.skipped_steps += 1
            skipped_in_row += 1
            if info.rank == 0:
                log(f"iteration {iteration}: skipped, non-finite loss/gradients "
                    f"({skipped_in_row} in a row, {state.skipped_steps} in total)")
            if skipped_in_row >= cfg.max_skipped_steps:
                raise TrainingError(f"{skipped_in_row} non-finite steps in a row (--max-skipped-steps "
                                    f"{cfg.max_skipped_steps}); lower the learning rate or check the data")
        interval_steps += 1
        if writer_rank and loss is not None:
            losses_seen.append(loss)
        if iteration % cfg.log_interval == 0 or iteration == cfg.train_iters:
            elapsed = time.perf_counter() - interval_start
            step_time = elapsed / max(interval_steps, 1)
            if writer_rank:
                lrs = group_lrs(optimizer)
                record = {"iteration": iteration, "consumed_samples": state.consumed_samples,
                          "tokens": state.consumed_samples * cfg.model.seq_length, "loss": loss,
                          "lr": lrs, "step_time_s": step_time, "tokens_per_s": tokens_per_step / step_time,
                          "skipped_steps": state.skipped_steps}
                writer.record(record, {"loss": loss, "tokens_per_s": tokens_per_step / step_time,
                                       **{f"lr/{g}": v for g, v in lrs.items()}}, iteration)
                lr_text = " ".join(f"{g}={v:.3e}" for g, v in lrs.items())
                log(f"iteration {iteration:6d}/{cfg.train_iters} | consumed samples {state.consumed_samples} | "
                    f"step {1000 * step_time:7.1f} ms | tokens/s {tokens_per_step / step_time:8.1f} | "
                    f"lm loss {loss:.4f} | lr {lr_text} | skipped {state.skipped_steps}")
            interval_start, interval_steps = time.perf_counter(), 0
        if cfg.eval_interval and valid_ds is not None and iteration % cfg.eval_interval == 0:
            valid_loss = evaluate(cfg, info, ddp, valid_ds, num_mb)
            if writer_rank:
                writer.record({"iteration": iteration, "valid_loss": valid_loss}, {"valid_loss": valid_loss},
                              iteration)
                log(f"iteration {iteration:6d} | validation lm loss {valid_loss:.4f}")
        if cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0 and iteration < cfg.train_iters:
            interval_start += _save(cfg, model, optimizer, scheduler, state, parallel, info)
    if cfg.save and state.iteration > first_iteration:
        _save(cfg, model, optimizer, scheduler, state, parallel, info)
    if writer is not None:
        writer.close()
    return {"losses": losses_seen, "iteration": state.iteration, "skipped_steps": state.skipped_steps,
            "writer_rank": writer_rank}


def _save(cfg: RunConfig, model, optimizer, scheduler, state, parallel: dict, info: ParallelInfo) -> float:
    """Checkpoint now; returns the seconds it took (kept out of the step-time figures)."""
    start = time.perf_counter()
    path = checkpointing.save_checkpoint(cfg.save, model, optimizer, scheduler, state,
                                         _model_config_record(cfg), parallel)
    seconds = time.perf_counter() - start
    if info.rank == 0:
        log(f"saved checkpoint {path} ({seconds:.1f} s)")
    return seconds


def build_norm_tracker(cfg: RunConfig, info: ParallelInfo, model, writer: Optional[RunWriter], optimizer):
    """The per-step norm tracker; it writes norms.jsonl and TensorBoard scalars on the writer rank."""
    from megatron.core import parallel_state as ps

    from disco_megatron.models.sharding import global_param_name
    from disco_megatron.norms import JsonlNormWriter, NormTracker, TensorBoardNormWriter, norm_log_path
    from disco_megatron.norms.steps import optimizer_step_source

    writers = []
    path = norm_log_path(cfg.norm_log_file, cfg.run_dir, cfg.tensorboard_dir, cfg.save)
    if writer is not None and path:
        writers.append(JsonlNormWriter(path))
    if writer is not None and writer.tb is not None:
        writers.append(TensorBoardNormWriter(writer.tb))
    named = [(global_param_name(name, info.pp_rank, cfg.model.num_layers, info.pp), param)
             for name, param in model.named_parameters()]
    return NormTracker(named, cfg.norm_log_interval, ps.get_tensor_model_parallel_group(),
                       ps.get_pipeline_model_parallel_group(), info.dp_rank, info.pp_rank, info.pp, writers,
                       with_condition=cfg.norm_condition_number, model_cfg=model.config,
                       step_source=optimizer_step_source(optimizer, [p for _, p in named]))
