"""DistributedScion's skip rule, its errors and its approximation mode, on 2 gloo processes (TP2).

- A non-finite grad on one rank skips the step on every rank (nothing changes); a missing grad
  raises on every rank; ranks that built different plans fail at construction, not in a hang.
- ``tp_mode=local`` (every piece dualized on its own) is not Scion: its spectral updates differ
  from the reference, and it moves no bytes.

Parity of the exact modes with the reference, bytes and balance: ``test_parity_matrix.py``.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from _dist import megatron_groups, run_workers
from _scion_model import ShardedRun, reference_run
from disco_megatron.optim.distributed import StepResult
from disco_megatron.scion_options import DEFAULTS


def skip_errors_and_local_worker(rank: int, world: int) -> None:
    groups, (tp_rank, pp_rank, _) = megatron_groups(2, 1)
    run = ShardedRun(groups, 2, tp_rank, 1, pp_rank, DEFAULTS)
    assert run.step(0).stepped
    params = {g: p.clone() for g, p in run.params.items()}
    momenta = {g: run.opt.state[p]["momentum_buffer"].clone() for g, p in run.params.items()}
    run.set_grads(1)
    first = next(iter(run.params.values()))
    if rank == 1:  # only one rank sees the overflow; both must skip
        first.grad[0, 0] = float("inf")
    assert run.opt.step() == StepResult(False, None)
    for g, p in run.params.items():
        assert torch.equal(p, params[g]) and torch.equal(run.opt.state[p]["momentum_buffer"], momenta[g]), g
    if rank == 0:  # a missing grad on one rank is an error on every rank, not a hang
        first.grad = None
    else:
        first.grad.zero_()
    with pytest.raises(ValueError, match="needs a gradient"):
        run.opt.step()
    with pytest.raises(ValueError, match="schedules differ"):
        ShardedRun(groups, 2, tp_rank, 1, pp_rank, replace(DEFAULTS, qkv_split="qkv" if rank else "fused"))

    local = ShardedRun(groups, 2, tp_rank, 1, pp_rank, replace(DEFAULTS, tp_mode="local"))
    assert local.step(0).stepped
    reference = reference_run(DEFAULTS, 1)
    errors = local.change_errors(reference[0], reference[1])
    spectral = [g for g in errors if "linear_" in g and g.endswith("weight")]
    assert min(errors[g] for g in spectral) > 1e-2, errors
    assert local.opt.comm_stats()["last_step"].keys() == {"all_reduce"}


def test_skip_rule_errors_and_local_mode_on_every_rank() -> None:
    run_workers(skip_errors_and_local_worker, 2)


def sharded_state_worker(rank: int, world: int) -> None:
    tp, dp = 1, 4  # TP×DP 1×2, 2×2 and PP2×DP2: test_parity_matrix.py
    flags = replace(DEFAULTS, weight_decay=0.05)
    reference = reference_run(flags, 2)
    groups, (tp_rank, pp_rank, _) = megatron_groups(tp, 1, dp)
    runs = {mode: ShardedRun(groups, tp, tp_rank, 1, pp_rank, replace(flags, dp_mode=mode))
            for mode in ("replicated", "sharded")}
    for step in range(2):
        for run in runs.values():
            assert run.step(step).stepped
        for g, p in runs["sharded"].params.items():
            assert torch.equal(p, runs["replicated"].params[g]), (rank, step, g)
        errors = runs["sharded"].change_errors(reference[0], reference[step + 1])
        assert max(errors.values()) <= 1e-5, (rank, step, errors)
    sharded = runs["sharded"].opt
    # the directions the norm statistics log: the same pieces in both modes
    assert all(torch.equal(a, b) for a, b in zip(sharded.directions(), runs["replicated"].opt.directions()))
    assert not sharded.state  # no per-parameter momentum: the owners' state is all
    held = sum(s.momentum.numel() + s.master.numel() for s in sharded.owned.values())
    assert held == 2 * sharded.plan.owned_numel(sharded.dualizer.me) > 0
    total = torch.tensor([float(held)], dtype=torch.float64)
    torch.distributed.all_reduce(total, group=groups.tp_dp)
    # momentum + master of every logical matrix, once over the TP×DP ranks
    assert total.item() == 2 * sum(p.numel() for p in runs["replicated"].params.values())


def test_sharded_state_lives_on_owners_and_equals_replicated() -> None:
    """--scion-dp-mode sharded at TP1×DP4: parameters bit-equal to replicated mode each step and
    within 1e-5 of the reference; each rank holds exactly its plan's momentum and master (no
    per-parameter state), and the ranks together hold each logical matrix once."""
    run_workers(sharded_state_worker, 4)
