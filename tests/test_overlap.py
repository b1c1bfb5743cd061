"""The overlapped bucket pipeline of DistributedDualizer, on 2 gloo processes (TP2).

- Overlapped and sequential steps give bit-identical parameters (and momenta) in owner,
  duplicated and DP-sharded modes: only the order of communication changes.
- Overlap really happens: bucket i+1's gather is issued before bucket i's Newton–Schulz runs (in
  the sequential run it is not), and no more than ``MAX_IN_FLIGHT`` gathers and as many scatters
  are in flight at once.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from _dist import megatron_groups, run_workers
from _scion_model import ShardedRun
from disco_megatron.optim import distributed
from disco_megatron.optim.distributed import MAX_IN_FLIGHT
from disco_megatron.scion_options import DEFAULTS

MODES = {"owner": DEFAULTS, "duplicated": replace(DEFAULTS, tp_mode="duplicated"),
         "sharded": replace(DEFAULTS, dp_mode="sharded")}


class _Recorder:
    """Wraps a dualizer's stages and the counted collectives: the order of gathers, scatters and
    bucket dualizes, and how many collectives of each stage were in flight (issued, not waited for)."""

    def __init__(self, dualizer: distributed.DistributedDualizer) -> None:
        self.buckets = dualizer.plan.buckets
        self.events: list[list[tuple[str, int]]] = []  # per run of the buckets (one per step)
        self.in_flight = {"gather": 0, "scatter": 0}
        self.max_in_flight = {"gather": 0, "scatter": 0}
        self.stage: str | None = None
        self.inside = False
        for name, stage in (("start_gather", "gather"), ("start_all_gather", "gather"), ("start_scatter", "scatter")):
            setattr(dualizer, name, self._stage(stage, getattr(dualizer, name)))
        self._wrap(dualizer, "dualize", self._dualize)
        self._wrap(dualizer, "run_buckets", self._run_buckets)

    @staticmethod
    def _wrap(obj: Any, name: str, wrapper: Any) -> None:
        real = getattr(obj, name)
        setattr(obj, name, lambda *a, **k: wrapper(real, *a, **k))

    def _stage(self, stage: str, real: Any) -> Any:
        def started(bucket: Any, *args: Any) -> Any:
            if self.inside:
                self.events[-1].append((stage, self.buckets.index(bucket)))
            self.stage = stage
            try:
                return real(bucket, *args)
            finally:
                self.stage = None
        return started

    def _dualize(self, real: Any, *args: Any, **kwargs: Any) -> Any:
        if self.inside:
            self.events[-1].append(("dualize", self.in_flight["gather"]))
        return real(*args, **kwargs)

    def _run_buckets(self, real: Any, *args: Any) -> None:
        self.inside = True
        self.events.append([])
        try:
            real(*args)
        finally:
            self.inside = False

    def collective(self, real: Any) -> Any:
        """``real`` (a comm function returning a work handle, or a (outputs, work) pair), counted in flight."""
        def issued(*args: Any, **kwargs: Any) -> Any:
            result = real(*args, **kwargs)
            work = result[1] if isinstance(result, tuple) else result
            stage = self.stage
            if work is None or stage is None or not self.inside:
                return result
            self.in_flight[stage] += 1
            self.max_in_flight[stage] = max(self.max_in_flight[stage], self.in_flight[stage])
            recorder = self

            class Counted:
                def wait(self) -> bool:
                    recorder.in_flight[stage] -= 1
                    return work.wait()
            return (result[0], Counted()) if isinstance(result, tuple) else Counted()
        return issued

    def gathers_before_each_dualize(self) -> list[list[int]]:
        """Per step, for the k-th bucket dualize: how many buckets' gathers had been issued before it."""
        runs = []
        for events in self.events:
            counts, issued = [], 0
            for kind, _ in events:
                issued += kind == "gather"
                if kind == "dualize":
                    counts.append(issued)
            runs.append(counts)
        return runs


def overlap_worker(rank: int, world: int) -> None:
    groups, (tp_rank, pp_rank, _) = megatron_groups(2, 1)
    real = {name: getattr(distributed.comm, name) for name in ("all_to_all_single", "all_gather_start")}
    for mode, flags in MODES.items():
        runs = {overlap: ShardedRun(groups, 2, tp_rank, 1, pp_rank, flags) for overlap in (True, False)}
        runs[False].opt.dualizer.overlap = False
        recorders = {overlap: _Recorder(run.opt.dualizer) for overlap, run in runs.items()}
        n = len(runs[True].opt.plan.buckets)
        assert n >= 3, (mode, n)  # several buckets: something to pipeline
        for step in range(2):
            for overlap, run in runs.items():
                for name, fn in real.items():
                    setattr(distributed.comm, name, recorders[overlap].collective(fn))
                try:
                    assert run.step(step).stepped
                finally:
                    for name, fn in real.items():
                        setattr(distributed.comm, name, fn)
            for g, p in runs[True].params.items():
                assert torch.equal(p, runs[False].params[g]), (mode, rank, step, g)
                if mode != "sharded":
                    assert torch.equal(runs[True].opt.state[p]["momentum_buffer"],
                                       runs[False].opt.state[runs[False].params[g]]["momentum_buffer"]), (mode, g)
            if mode == "sharded":
                for key, state in runs[True].opt.owned.items():
                    assert torch.equal(state.master, runs[False].opt.owned[key].master), (rank, key)
                    assert torch.equal(state.momentum, runs[False].opt.owned[key].momentum), (rank, key)
        # bucket k dualizes after bucket k+1's gather was issued (overlapped), not before (sequential)
        ahead = [min(k + 2, n) for k in range(n)]
        assert recorders[True].gathers_before_each_dualize() == [ahead] * 2, (mode, recorders[True].events)
        assert recorders[False].gathers_before_each_dualize() == [[k + 1 for k in range(n)]] * 2, mode
        overlapped, sequential = recorders[True].max_in_flight, recorders[False].max_in_flight
        assert overlapped["gather"] == MAX_IN_FLIGHT, (mode, overlapped)
        assert overlapped["scatter"] == (MAX_IN_FLIGHT if mode != "duplicated" else 0), (mode, overlapped)
        assert sequential == {"gather": 0, "scatter": 0}, (mode, sequential)  # synchronous: nothing in flight
        # some bucket's Newton–Schulz ran with the next bucket's gather in flight
        assert any(kind == "dualize" and flying > 0 for events in recorders[True].events
                   for kind, flying in events), mode


def test_overlapped_step_equals_sequential_and_overlaps() -> None:
    """Owner, duplicated and DP-sharded (TP2×DP1) modes, 2 steps each, overlapped vs sequential."""
    run_workers(overlap_worker, 2)
