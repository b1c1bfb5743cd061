"""Scion optimizer: reference, layout, plan, distributed step and the megatron wrapper.

``ScionConfig``, ``ScionOptimizer`` and ``get_scion_optimizer`` import megatron-core, so they
load on first access; importing this package stays light.
"""
from typing import Any

from disco_megatron.optim.distributed import DistributedScion, StageGroups
from disco_megatron.optim.layout import ParamLayout, build_layout
from disco_megatron.optim.plan import ExchangePlan, build_exchange_plan
from disco_megatron.optim.scion import Scion

_MEGATRON = {"ScionConfig": "config", "ScionOptimizer": "megatron", "get_scion_optimizer": "megatron"}

__all__ = ["Scion", "DistributedScion", "StageGroups", "ParamLayout", "build_layout",
           "ExchangePlan", "build_exchange_plan", *_MEGATRON]


def __getattr__(name: str) -> Any:
    if name in _MEGATRON:
        import importlib

        return getattr(importlib.import_module(f"disco_megatron.optim.{_MEGATRON[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
