"""Preemption: SIGUSR1/SIGTERM ask the run to checkpoint and stop at the next step boundary.

Slurm (``--signal``, or ``scancel --signal``) and torchrun (which forwards the signals it handles
to its workers) may reach only some ranks, or reach them at different steps; the ranks therefore
agree with one all-reduce of a flag per step, and all stop after the same step.
"""
from __future__ import annotations

import signal
from types import FrameType
from typing import Optional

import torch

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionWatch:
    """Notes the signals this process receives; :meth:`agreed` tells every rank whether any rank got one."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous = {sig: signal.signal(sig, self._note) for sig in SIGNALS}

    def _note(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        """Collective (every rank, once per step): True on all ranks when some rank received a signal.

        ``device``: the model parameters' device, where the process group's collectives run.
        A separate all-reduce: the step's own reductions are not over every rank (the loss is
        reduced over DP on the last stage) or belong to the optimizer.
        """
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        """Restore the handlers that were installed before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def close_after_failure(self) -> None:
        """Restore the handlers, then deliver again a signal that was noted: a run failing after one (torchrun
        stops the other ranks with SIGTERM when a rank died, and their collectives fail) ends as it would
        have without the watch, by the signal, not with a traceback of the failed collective."""
        self.close()
        if self.received is not None:
            signal.raise_signal(self.received)
