"""Process-level runtime: distributed init, megatron parallel_state, seeds, CPU shims, warning filters."""
from disco_megatron.runtime.cpu_shims import install_cpu_shims
from disco_megatron.runtime.parallel import (
    ParallelInfo,
    current_parallel_info,
    destroy_parallel,
    initialize_parallel,
)
from disco_megatron.runtime.quiet import quiet_known_warnings

__all__ = [
    "install_cpu_shims",
    "initialize_parallel",
    "destroy_parallel",
    "current_parallel_info",
    "ParallelInfo",
    "quiet_known_warnings",
]
