"""The optimizer's step per parameter, for "update" norms as the reference defines them.

The reference (rakkit/disco ``disco.py``) logs the norms of ``−lr·u``, ``u`` the LMO's output:
the step the optimizer takes, without weight decay, the constrained shrink or the rounding to a
bf16 parameter, which the weight change ``W_after − W_before`` also contains. Scion's step is
``−lr·ρ·dualize(d)`` (:func:`disco_megatron.optim.scion.apply_update_`). The optimizer keeps
the momentum ``d`` but not its dual, so :class:`ScionStepSource` dualizes the momentum again
after the step with the optimizer's own dualizer (deterministic: the same direction it
applied); that repeats one exchange and LMO per logging step.
"""
from __future__ import annotations

import torch


class ScionStepSource:
    """``−lr·ρ·dualize(d)`` of every parameter of a ``ScionOptimizer``, by ``id`` of the model parameter.

    :meth:`before_step` records ``lr·ρ`` of each group (the scheduler may change lr right after
    the step); calling the source after ``optimizer.step()`` gives the steps. Both are
    collective over the optimizer's TP and DP groups: every rank calls them.
    """

    def __init__(self, optimizer) -> None:
        self.outer, self.inner = optimizer, optimizer.optimizer
        self._scales: list[float] = []

    def before_step(self) -> None:
        self._scales = [g["lr"] * g["radius"] for g in self.inner.param_groups for _ in g["params"]]

    def __call__(self) -> dict[int, torch.Tensor]:
        mains = [p for g in self.inner.param_groups for p in g["params"]]
        directions = self.inner.dualizer([self.inner.state[p]["momentum_buffer"] for p in mains])
        return {id(model): direction.float().mul_(-scale)
                for model, direction, scale in zip(self.outer.model_params, directions, self._scales)}
