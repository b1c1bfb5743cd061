"""``--clip-grad`` for Scion: a TP2 step with clipping equals the single-process reference Scion
stepped on gradients clipped by hand (global norm, TP-replicated tensors counted once), and
``disco-pretrain`` keeps Scion's default of no clipping."""
from __future__ import annotations

import pytest
import torch

from _dist import megatron_groups, run_workers
from _scion_model import ShardedRun, full_grad_norm, reference_run
from disco_megatron.optim.scion import update_momentum_
from disco_megatron.scion_options import CLIP_GRAD_DEFAULT, DEFAULTS

# Step 1's gradients are 20x step 0's: clipping both to norm 1 changes their weights in the
# momentum (an LMO is scale-invariant, so equal scales would hide a wrong clip).
SCALES = [1.0, 20.0]
MAX_NORM = 1.0


def _clipped_scales() -> list[float]:
    """Each step's gradient scale after clipping, from the full gradients' norm (independent of the
    optimizer): megatron's max_norm / (norm + 1e-6) when below 1."""
    scales = []
    for step, scale in enumerate(SCALES):
        norm = scale * full_grad_norm(step)
        scales.append(scale * min(1.0, MAX_NORM / (norm + 1e-6)))
    return scales


def _clip_worker(rank: int, world: int, out: str) -> None:
    groups, (tp_rank, _, _) = megatron_groups(2, 1)
    run = ShardedRun(groups, 2, tp_rank, 1, 0, DEFAULTS, clip_grad=MAX_NORM)
    start = {g: p.detach().clone() for g, p in run.params.items()}
    norms = []
    for step, scale in enumerate(SCALES):
        run.set_grads(step)
        for p in run.params.values():
            p.grad.mul_(scale)
        result = run.opt.step()
        assert result.stepped
        norms.append(result.grad_norm)
    full_start = reference_run(DEFAULTS, 0)[0]
    clipped = reference_run(DEFAULTS, len(SCALES), _clipped_scales())[-1]
    unclipped = reference_run(DEFAULTS, len(SCALES), SCALES)[-1]
    torch.save({"norms": norms, "clipped": run.change_errors(full_start, clipped),
                "unclipped": run.change_errors(full_start, unclipped),
                "start_equal": all(torch.equal(start[g], run.shard(g, full_start[g])) for g in start)},
               f"{out}.{rank}")


def test_tp2_clipped_step_equals_reference_on_clipped_grads(tmp_path) -> None:
    out = str(tmp_path / "clip")
    run_workers(_clip_worker, 2, out)
    for rank in range(2):
        result = torch.load(f"{out}.{rank}")
        assert result["start_equal"]
        # the reported norm is the one before clipping, as megatron reports it
        assert result["norms"] == pytest.approx([s * full_grad_norm(i) for i, s in enumerate(SCALES)], rel=1e-6)
        # fp32 Newton-Schulz on both sides: the same arithmetic up to fp32 round-off
        assert max(result["clipped"].values()) < 1e-4, result["clipped"]
        assert min(result["unclipped"].values()) > 1e-2  # the clip really changed the update


def test_clip_scales_the_gradient_into_the_momentum_and_default_is_off() -> None:
    buf = torch.full((2,), 4.0)
    update_momentum_(buf, torch.full((2,), 2.0), 0.25, grad_scale=0.5)  # 0.75*4 + 0.25*0.5*2
    assert torch.equal(buf, torch.full((2,), 3.25))
    from disco_megatron.config import parse_run_config

    assert CLIP_GRAD_DEFAULT == 0.0 and parse_run_config([]).clip_grad == 0.0
