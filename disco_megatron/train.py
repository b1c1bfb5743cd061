"""``python -m disco_megatron.train`` / ``disco-pretrain``: pretraining entry point (launch with torchrun).

Every bad input ends the same way on every rank: one ``disco-pretrain: error`` line naming the
flag or file, exit code 2, no traceback wall and no hang. A run stopped by SIGUSR1/SIGTERM saves
its checkpoint and exits with ``PREEMPTED_EXIT_CODE`` (75) on every rank.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from disco_megatron.config import RunConfig

# How long a failing rank waits for the other ranks to report theirs before it exits.
PEER_REPORT_WAIT_S = 20.0


def wait_for_peer_reports(timeout_s: float = PEER_REPORT_WAIT_S) -> None:
    """Count this rank's failure in torchrun's store and wait until every rank has counted one.

    torchrun stops all workers as soon as one exits, so without the wait only the fastest rank
    would print its message. Bounded: a rank that fails alone (its peers blocked in a collective)
    exits after ``timeout_s`` and torchrun stops the rest. Only under torchrun's agent store, which
    outlives the workers; a no-op for a single process or another launcher.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    from torch.distributed import TCPStore

    key = f"disco_pretrain/failed_ranks/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    deadline = time.monotonic() + timeout_s
    try:
        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s))
        store.add(key, 1)
        while store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(0.1)
    except (RuntimeError, OSError, KeyError, ValueError):  # the store is gone: nothing left to wait for
        return


def _fail(message: str) -> int:
    """Print the one error line, let the other ranks print theirs, return the exit code."""
    from disco_megatron.training.logs import error

    error(message)
    wait_for_peer_reports()
    return 2


def check_files(cfg: "RunConfig") -> None:
    """What ``RunConfig.validate`` cannot judge without the formats: the indexed dataset of
    ``--data-path`` and the ``--ckpt-step`` iteration of ``--load``."""
    if cfg.data_path is not None:
        from disco_megatron.data.indexed import require_indexed_dataset

        require_indexed_dataset(cfg.data_path)
    if cfg.ckpt_step is not None:
        from disco_megatron.checkpoint.storage import require_saved_iteration

        require_saved_iteration(cfg.load, cfg.ckpt_step)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from disco_megatron.config import PREEMPTED_EXIT_CODE, ConfigError, parse_run_config

    try:  # before torch loads: bad flags and sizes are reported at once
        cfg = parse_run_config(argv)
        dp = cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    from disco_megatron.checkpoint import CheckpointError

    try:  # before the process group and the model: the files the flags name
        check_files(cfg)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    from disco_megatron.runtime import destroy_parallel
    from disco_megatron.training import TrainingError
    from disco_megatron.training.loop import pretrain

    try:
        summary = pretrain(cfg, dp)
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError, ValueError) as exc:
        destroy_parallel(synchronize=False)  # a peer may never reach the teardown barrier
        return _fail(str(exc))
    except BaseException:
        destroy_parallel(synchronize=False)
        raise
    destroy_parallel()
    if summary["preempted"]:
        # Skip the interpreter's teardown: it takes seconds, the time limit is near, and it restores the
        # default SIGTERM action, so torchrun's SIGTERM (sent once the first rank has exited) would end a
        # slower rank with -15 instead of this code. The checkpoint and the run's files are closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(PREEMPTED_EXIT_CODE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
