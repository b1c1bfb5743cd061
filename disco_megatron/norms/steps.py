"""The optimizer's step per parameter, for "update" norms as the reference defines them.

The reference (rakkit/disco ``disco.py``) logs the norms of ``−lr·u``, ``u`` the LMO's output:
the step the optimizer takes, without weight decay, the constrained shrink or the rounding to a
bf16 parameter, which the weight change ``W_after − W_before`` also contains. Scion's step is
``−lr·ρ·dualize(d)`` (:func:`disco_megatron.optim.scion.apply_update_`). The optimizer keeps
the momentum ``d`` but not its dual, so :class:`ScionStepSource` dualizes the momentum again
after the step with the optimizer's own dualizer (deterministic: the same direction it
applied); that repeats one exchange and LMO per logging step. Adam's step
``−lr·m̂/(√v̂ + ε)`` comes from its moments (:class:`AdamStepSource`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def optimizer_step_source(optimizer, model_params: Sequence[torch.nn.Parameter]):
    """The step source of a megatron optimizer: Scion's, (Adam)W's, or None (then no ``updates`` are logged)."""
    if hasattr(getattr(optimizer, "optimizer", None), "dualizer"):
        return ScionStepSource(optimizer)
    inner = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    if not all(isinstance(o, torch.optim.Optimizer) and "betas" in o.defaults for o in inner):
        return None
    held = {id(p) for o in inner for g in o.param_groups for p in g["params"]}
    # megatron's distributed optimizer holds flat shards, not the parameters: no per-parameter step.
    mains = [getattr(p, "main_param", p) for p in model_params if p.requires_grad]
    return AdamStepSource(inner, model_params) if all(id(m) in held for m in mains) else None


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
        directions = self.inner.directions()
        return {id(model): direction.float().mul_(-scale)
                for model, direction, scale in zip(self.outer.model_params, directions, self._scales)}


class AdamStepSource:
    """``−lr·m̂/(√v̂ + ε)`` of every parameter, from the (Adam)W moments after the step.

    Without the decoupled decay ``−lr·wd·W`` (not part of the step, as for Scion). ``inner``:
    the torch optimizers (megatron's wrappers' ``.optimizer``), whose params are each model
    parameter's ``main_param`` (fp32 master of a bf16 parameter) or the parameter itself.
    Local: no communication.
    """

    def __init__(self, inner: Sequence[torch.optim.Optimizer], model_params: Sequence[torch.nn.Parameter]) -> None:
        self.inner, self.model_params = list(inner), [p for p in model_params if p.requires_grad]
        self._lrs: dict[int, float] = {}

    def before_step(self) -> None:
        self._lrs = {id(p): g["lr"] for o in self.inner for g in o.param_groups for p in g["params"]}

    def __call__(self) -> dict[int, torch.Tensor]:
        options = {id(p): (o, g) for o in self.inner for g in o.param_groups for p in g["params"]}
        steps = {}
        for model in self.model_params:
            main = getattr(model, "main_param", model)
            optimizer, group = options[id(main)]
            state = optimizer.state[main]
            t = float(state.get("step", group.get("step", 0)))
            (beta1, beta2), lr = group["betas"], self._lrs[id(main)]
            denom = (state["exp_avg_sq"].float() / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
            steps[id(model)] = state["exp_avg"].float().div(denom).mul_(-lr / (1 - beta1 ** t))
        return steps
