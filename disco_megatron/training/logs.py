"""Run-directory outputs of the training loop: log lines, train_log.jsonl, TensorBoard scalars."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

from disco_megatron.config import RunDir


def log(message: str, rank: Optional[int] = None) -> None:
    """One line to stdout, prefixed with the time (and the rank when given)."""
    stamp = time.strftime("%H:%M:%S")
    prefix = f"[{stamp}]" if rank is None else f"[{stamp} rank {rank}]"
    sys.stdout.write(f"{prefix} {message}\n")  # one write per line (see error())
    sys.stdout.flush()


def error(message: str) -> None:
    """The one clear error line a failing rank prints before exiting non-zero."""
    rank = os.environ.get("RANK", "0")
    # One write of the whole line: ranks share torchrun's pipe, and print() writes the text and the
    # newline separately, so two ranks' lines could interleave.
    sys.stderr.write(f"disco-pretrain: error (rank {rank}): {message}\n")
    sys.stderr.flush()


class RunWriter:
    """Writes train_log.jsonl and TensorBoard scalars; lives only on the writer rank."""

    def __init__(self, run_dir: Optional[str], tensorboard_dir: Optional[str]) -> None:
        self.jsonl = None
        self.tb = None
        if run_dir:
            os.makedirs(run_dir, exist_ok=True)
            self.jsonl = open(RunDir(run_dir).train_log, "a")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir)

    def record(self, record: dict, scalars: dict[str, float], step: int) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
