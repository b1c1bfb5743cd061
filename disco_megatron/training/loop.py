"""``pretrain``: set a run up, then take its steps, logging, evaluating and saving between them.

The loop only uses the ``MegatronOptimizer`` interface, so Scion and megatron's Adam are
interchangeable, and the same Scion optimizer runs inside Megatron-LM's own loop.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from disco_megatron.builders import group_lrs
from disco_megatron.checkpoint import storage
from disco_megatron.config import PREEMPTED_EXIT_CODE, RunConfig
from disco_megatron.training import TrainingError
from disco_megatron.training.logs import log
from disco_megatron.training.preemption import PreemptionWatch
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


@dataclass
class Totals:
    """What the closing summary line reports, gathered while the run goes."""

    start_iteration: int
    start: float = field(default_factory=time.perf_counter)
    best_valid_loss: Optional[float] = None
    checkpoint: Optional[str] = None
    preempted: bool = False


def pretrain(cfg: RunConfig, dp: int) -> dict:
    """Train ``cfg`` (validated: ``dp`` is its DP size) end to end on this rank; returns a summary
    (losses on the writer rank; ``preempted`` when a signal stopped the run after its checkpoint)."""
    wall_start = time.perf_counter()
    watch = PreemptionWatch()  # from the start: a signal during setup stops the run after its first step
    try:
        summary = _train(setup_run(cfg, dp), watch, wall_start)
    except BaseException:
        watch.close_after_failure()
        raise
    # A preempted run keeps noting the signals until it exits: torchrun sends SIGTERM to the ranks still
    # tearing down once the first has exited, and they should exit with the same code.
    if not summary["preempted"]:
        watch.close()
    return summary


def _train(run: Run, watch: PreemptionWatch, wall_start: float) -> dict:
    """The steps of a set-up run, until ``--train-iters`` or until the ranks agree on a signal."""
    cfg = run.cfg
    totals = Totals(run.state.iteration)
    timer = StepTimer()
    skipped_in_row = 0
    losses: list[float] = []
    device = next(run.parts.model[0].parameters()).device
    while run.state.iteration < cfg.train_iters and not totals.preempted:
        result = train_step(run)
        timer.steps += 1
        skipped_in_row = 0 if result.applied else skipped_in_row + 1
        if not result.applied:
            report_skip(run, skipped_in_row)
        if run.writer is not None and result.loss is not None:
            losses.append(result.loss)
        totals.preempted = watch.agreed(device)
        log_eval_save(run, result, timer, totals)
    if totals.preempted and run.info.rank == 0:
        log(f"signal received: checkpointing at iteration {run.state.iteration}, then exiting with code "
            f"{PREEMPTED_EXIT_CODE}")
    if cfg.save and run.state.iteration > totals.start_iteration:
        save(run, totals)
    log_summary(run, totals, time.perf_counter() - wall_start)
    if run.writer is not None:
        run.writer.close()
    return {"losses": losses, "iteration": run.state.iteration, "skipped_steps": run.state.skipped_steps,
            "writer_rank": run.writer is not None, "preempted": totals.preempted}


def log_summary(run: Run, totals: Totals, wall_s: float) -> None:
    """The one closing line: steps, tokens, wall time, mean tokens/s, best validation loss, checkpoint."""
    if run.writer is None:
        return
    cfg, state = run.cfg, run.state
    steps = state.iteration - totals.start_iteration
    tokens = steps * cfg.global_batch_size * cfg.model.seq_length
    loop_s = time.perf_counter() - totals.start
    best = "n/a" if totals.best_valid_loss is None else f"{totals.best_valid_loss:.4f}"
    log(f"run summary | steps {steps} (iteration {state.iteration}/{cfg.train_iters}) | tokens {tokens} | "
        f"wall {wall_s:.1f} s | mean tokens/s {tokens / max(loop_s, 1e-9):.1f} | best validation lm loss "
        f"{best} | checkpoint {totals.checkpoint or 'none'}")


def report_skip(run: Run, in_row: int) -> None:
    """Say that the step was skipped; stop the run after ``--max-skipped-steps`` in a row."""
    cfg, state = run.cfg, run.state
    if run.info.rank == 0:
        log(f"iteration {state.iteration}: skipped, non-finite loss/gradients "
            f"({in_row} in a row, {state.skipped_steps} in total)")
    if in_row >= cfg.max_skipped_steps:
        raise TrainingError(f"{in_row} non-finite steps in a row (--max-skipped-steps "
                            f"{cfg.max_skipped_steps}); lower the learning rate or check the data")


def log_eval_save(run: Run, result: StepResult, timer: StepTimer, totals: Totals) -> None:
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
        if valid_loss is not None and (totals.best_valid_loss is None or valid_loss < totals.best_valid_loss):
            totals.best_valid_loss = valid_loss
    due = cfg.save_interval and iteration % cfg.save_interval == 0 and iteration < cfg.train_iters
    if cfg.save and due and not totals.preempted:  # a preempted run saves once, on its way out
        timer.start += save(run, totals)


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
        f"ETA {format_duration((cfg.train_iters - state.iteration) * step_time)} | "
        f"lm loss {loss:.4f} | lr {lr_text} | skipped {state.skipped_steps}")


def format_duration(seconds: float) -> str:
    """H:MM:SS (hours unbounded)."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def save(run: Run, totals: Totals) -> float:
    """Checkpoint now; returns the seconds it took (kept out of the step-time figures)."""
    start = time.perf_counter()
    parts = run.parts
    path = storage.save_checkpoint(run.cfg.save, parts.model, parts.optimizer, parts.scheduler, run.state,
                                   asdict(run.cfg.model), run.info.layout)
    seconds = time.perf_counter() - start
    totals.checkpoint = path
    if run.info.rank == 0:
        log(f"saved checkpoint {path} ({seconds:.1f} s)")
    return seconds
