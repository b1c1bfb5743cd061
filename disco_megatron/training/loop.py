"""``pretrain``: set a run up, then take its steps, logging, evaluating and saving between them.

The loop only uses the ``MegatronOptimizer`` interface, so Scion and megatron's Adam are
interchangeable, and the same Scion optimizer runs inside Megatron-LM's own loop.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Optional

from disco_megatron.builders import group_lrs
from disco_megatron.checkpoint import storage
from disco_megatron.config import RunConfig
from disco_megatron.training import TrainingError
from disco_megatron.training.logs import log
from disco_megatron.training.setup import Run, setup_run
from disco_megatron.training.step import StepResult, evaluate, train_step


class StepTimer:
    """Mean step time over the steps since the last log line; checkpoint time is left out."""

    def __init__(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def lap(self) -> float:
        """Seconds per step since the last lap, and start the next one."""
        seconds = (time.perf_counter() - self.start) / max(self.steps, 1)
        self.start, self.steps = time.perf_counter(), 0
        return seconds


def pretrain(cfg: RunConfig, dp: int) -> dict:
    """Train ``cfg`` (validated: ``dp`` is its DP size) end to end on this rank; returns a summary
    (losses on the writer rank)."""
    run = setup_run(cfg, dp)
    first_iteration = run.state.iteration
    timer = StepTimer()
    skipped_in_row = 0
    losses: list[float] = []
    while run.state.iteration < cfg.train_iters:
        result = train_step(run)
        timer.steps += 1
        skipped_in_row = 0 if result.applied else skipped_in_row + 1
        if not result.applied:
            report_skip(run, skipped_in_row)
        if run.writer is not None and result.loss is not None:
            losses.append(result.loss)
        log_eval_save(run, result, timer)
    if cfg.save and run.state.iteration > first_iteration:
        save(run)
    if run.writer is not None:
        run.writer.close()
    return {"losses": losses, "iteration": run.state.iteration, "skipped_steps": run.state.skipped_steps,
            "writer_rank": run.writer is not None}


def report_skip(run: Run, in_row: int) -> None:
    """Say that the step was skipped; stop the run after ``--max-skipped-steps`` in a row."""
    cfg, state = run.cfg, run.state
    if run.info.rank == 0:
        log(f"iteration {state.iteration}: skipped, non-finite loss/gradients "
            f"({in_row} in a row, {state.skipped_steps} in total)")
    if in_row >= cfg.max_skipped_steps:
        raise TrainingError(f"{in_row} non-finite steps in a row (--max-skipped-steps "
                            f"{cfg.max_skipped_steps}); lower the learning rate or check the data")


def log_eval_save(run: Run, result: StepResult, timer: StepTimer) -> None:
    """After a step: the log line, the validation loss and the checkpoint its iteration is due for."""
    cfg, iteration = run.cfg, run.state.iteration
    if iteration % cfg.log_interval == 0 or iteration == cfg.train_iters:
        log_progress(run, result.loss, timer.lap())
    if cfg.eval_interval and run.valid_ds is not None and iteration % cfg.eval_interval == 0:
        valid_loss = evaluate(run)
        if run.writer is not None:
            run.writer.record({"iteration": iteration, "valid_loss": valid_loss}, {"valid_loss": valid_loss},
                              iteration)
            log(f"iteration {iteration:6d} | validation lm loss {valid_loss:.4f}")
    if cfg.save and cfg.save_interval and iteration % cfg.save_interval == 0 and iteration < cfg.train_iters:
        timer.start += save(run)


def log_progress(run: Run, loss: Optional[float], step_time: float) -> None:
    """One train_log.jsonl record, TensorBoard scalars and a console line (writer rank only)."""
    if run.writer is None:
        return
    cfg, state = run.cfg, run.state
    tokens_per_s = cfg.global_batch_size * cfg.model.seq_length / step_time
    lrs = group_lrs(run.parts.optimizer)
    record = {"iteration": state.iteration, "consumed_samples": state.consumed_samples,
              "tokens": state.consumed_samples * cfg.model.seq_length, "loss": loss, "lr": lrs,
              "step_time_s": step_time, "tokens_per_s": tokens_per_s, "skipped_steps": state.skipped_steps}
    run.writer.record(record, {"loss": loss, "tokens_per_s": tokens_per_s, **{f"lr/{g}": v for g, v in lrs.items()}},
                      state.iteration)
    lr_text = " ".join(f"{g}={v:.3e}" for g, v in lrs.items())
    log(f"iteration {state.iteration:6d}/{cfg.train_iters} | consumed samples {state.consumed_samples} | "
        f"step {1000 * step_time:7.1f} ms | tokens/s {tokens_per_s:8.1f} | "
        f"lm loss {loss:.4f} | lr {lr_text} | skipped {state.skipped_steps}")


def save(run: Run) -> float:
    """Checkpoint now; returns the seconds it took (kept out of the step-time figures)."""
    start = time.perf_counter()
    parts = run.parts
    path = storage.save_checkpoint(run.cfg.save, parts.model, parts.optimizer, parts.scheduler, run.state,
                                   asdict(run.cfg.model), run.info.layout)
    seconds = time.perf_counter() - start
    if run.info.rank == 0:
        log(f"saved checkpoint {path} ({seconds:.1f} s)")
    return seconds
