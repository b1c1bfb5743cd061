"""A recording TorchFunctionMode that finds what would break, or copy, on a GPU, while running on CPU.

On CPU with gloo every tensor is on the host, so a buffer created without ``device=`` works
there and only fails under NCCL. :class:`DeviceAudit` makes that visible on CPU:

- a tensor factory (``torch.zeros``, ``torch.tensor``...) called without ``device=`` from a
  watched package (``disco_megatron/optim``, ``norms``, ``training``) is a violation, found from
  the caller's frame;
- every tensor created without ``device=`` by ``disco_megatron`` code, or by ``.cpu()`` anywhere, is
  *host-tagged* (tests and megatron-core create their own tensors where they mean to), and the tag follows it through every torch op that takes it (``.to(device)`` clears it): on a GPU it
  would be a host tensor;
- the ``torch.distributed`` collectives are wrapped: a collective given a host-tagged tensor, or
  one not on the parameters' device, is a violation;
- host reads (``.item()``, ``.tolist()``, ``float(t)``, ``bool(t)``...) from watched code are
  counted by call site: on a GPU each is a device->host copy and a synchronisation.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

PACKAGE = Path(__file__).resolve().parents[1] / "disco_megatron"
WATCHED = tuple(str(PACKAGE / sub) + "/" for sub in ("optim", "norms", "training"))
_TORCH = str(Path(torch.__file__).parent) + "/"
_HERE = str(Path(__file__).resolve())

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.as_tensor, torch.randn,
             torch.rand, torch.randint, torch.randperm, torch.arange, torch.linspace, torch.eye,
             torch.scalar_tensor, torch.empty_strided}
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
              torch.Tensor.__bool__, torch.Tensor.numpy}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single",
               "broadcast", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
               "send", "recv", "isend", "irecv")
_TAG = "_disco_host_tagged"


def _caller() -> tuple[str, int]:
    """File and line of the innermost frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH) or frame.f_code.co_filename == _HERE):
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("?", 0)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _tag(value: Any) -> None:
    for t in _tensors(value):
        setattr(t, _TAG, True)


def _untag(value: Any) -> None:
    for t in _tensors(value):
        if _tagged(t):
            setattr(t, _TAG, False)


def _tagged(t: torch.Tensor) -> bool:
    return getattr(t, _TAG, False)


def _moves_to_device(func: Any, args: tuple, kwargs: dict) -> bool:
    """``t.to(device...)``/``t.to(other)``/``t.cuda()``: the result is where it was sent."""
    if func is torch.Tensor.cuda or "device" in kwargs:
        return True
    return func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], torch.dtype)


def _short(path: str, line: int) -> str:
    return f"{Path(path).resolve().relative_to(PACKAGE.parent)}:{line}" if path.startswith(str(PACKAGE)) \
        else f"{path}:{line}"


class DeviceAudit(TorchFunctionMode):
    """Records device violations and host reads (see the module docstring) while active.

    ``device`` is the parameters' device: every collective's tensors must be there. Enter it
    after ``install_cpu_shims()`` (mode stack order) and read :attr:`violations` /
    :attr:`host_reads` afterwards.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.violations: list[str] = []
        self.host_reads: Counter[str] = Counter()
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> "DeviceAudit":
        for name in COLLECTIVES:
            self._originals[name] = getattr(dist, name)
            setattr(dist, name, self._checked(name, self._originals[name]))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def _checked(self, name: str, collective: Any) -> Any:
        def collective_on_device(*args: Any, **kwargs: Any) -> Any:
            for t in _tensors([args, kwargs]):
                if _tagged(t) or t.device != self.device:
                    where = _short(*_caller())
                    self.violations.append(f"{where}: dist.{name} on a {'host-created' if _tagged(t) else t.device} "
                                           f"tensor {tuple(t.shape)} (parameters on {self.device})")
                    break
            return collective(*args, **kwargs)

        return collective_on_device

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES and "device" not in kwargs:
            path, line = _caller()
            if path.startswith(WATCHED):
                self.violations.append(f"{_short(path, line)}: torch.{func.__name__} without device=")
            if path.startswith(str(PACKAGE)):
                _tag(out)
        elif func in HOST_READS:
            path, line = _caller()
            if path.startswith(WATCHED):
                self.host_reads[_short(path, line)] += 1
        elif func is torch.Tensor.cpu:
            _tag(out)
        elif _moves_to_device(func, args, kwargs):
            _untag(out)  # on a GPU a new tensor on the target device (here ``.to`` may return its input)
        elif any(_tagged(t) for t in _tensors([args, kwargs])):
            _tag(out)
        return out
