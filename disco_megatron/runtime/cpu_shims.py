"""The few CUDA assumptions of megatron-core that need a shim to run on CPU/gloo.

Every shim is installed by :func:`install_cpu_shims`, only when CUDA is unavailable, and each
carries a one-line reason. Nothing in megatron-core is edited; see docs/cpu_notes.md.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

from disco_megatron.runtime.quiet import quiet_known_warnings

_INSTALLED = False
_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and makes ``Tensor.cuda`` the identity.

    Reason: megatron-core hard-codes ``device="cuda"`` factories (schedules' token counter,
    FP32Optimizer._scale, p2p shape buffers) and ``.cuda()`` calls.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Megatron's model-parallel RNG tracker, keeping CPU generator states.

    Reason: ``tensor_parallel.random.CudaRNGStatesTracker`` stores and forks CUDA RNG states,
    and attention dropout forks it even at dropout 0.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise RuntimeError(f"RNG tracker: seed {seed} or state {name!r} already added")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(f"RNG tracker: state {name!r} was not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def install_cpu_shims() -> bool:
    """Install every CPU shim once per process; a no-op (returns False) when CUDA is available."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    # Reason: apex is optional; megatron-core falls back to torch norms/kernels and says so loudly.
    quiet_known_warnings()
    # Reason: RoPE, attention and p2p call torch.cuda.current_device() for tensor placement.
    torch.cuda.current_device = lambda: _CPU
    # Reason: some paths call torch.cuda.synchronize(), which raises without CUDA.
    torch.cuda.synchronize = lambda *a, **k: None
    # Reason: factories and .cuda() calls with hard-coded CUDA devices (see CpuDeviceMode).
    CpuDeviceMode().__enter__()
    # Reason: the model-parallel RNG tracker forks CUDA RNG states (see CpuRNGStatesTracker).
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Reason: clip_grads asserts grads are torch.cuda.FloatTensor before scaling (Adam with --clip-grad).
    from megatron.core.optimizer import optimizer as mcore_optimizer

    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grads_by_total_norm
    # Reason: without apex the local spec's torch norm refuses --sequence-parallel (it would not mark its gains).
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    WrappedTorchNorm.__new__ = staticmethod(_sequence_parallel_norm(WrappedTorchNorm.__new__))
    _INSTALLED = True
    return True


def _clip_grads_by_total_norm(parameters, max_norm: float, total_norm: float,
                              use_decoupled_grad: bool = False) -> None:
    """CPU twin of megatron's clip_grad_by_total_norm_fp32: scale every grad by max_norm/total_norm."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is not None:
            grad.mul_(clip_coeff)


def _sequence_parallel_norm(new: Callable) -> Callable:
    """megatron's torch norm, also under sequence parallel: built as without it (a norm is per token, so
    it runs on a sequence shard as is), its parameters marked ``sequence_parallel`` as apex's norm marks
    them, so ``finalize_model_grads`` all-reduces their gradients over TP (each rank saw part of the tokens)."""

    def build(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return new(cls, config, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = new(cls, plain, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return build


def seed_rng_tracker(seed: int, tp_rank: int) -> None:
    """Seed the tracker like megatron's ``model_parallel_cuda_manual_seed`` (same offsets)."""
    from megatron.core.tensor_parallel import random as mp_random

    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
