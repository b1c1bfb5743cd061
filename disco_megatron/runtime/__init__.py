"""Process-level runtime: distributed init, megatron parallel_state, seeds, CPU shims."""
from disco_megatron.runtime.cpu_shims import install_cpu_shims
from disco_megatron.runtime.parallel import (
    ParallelConfigError,
    ParallelInfo,
    current_parallel_info,
    destroy_parallel,
    initialize_parallel,
    validate_world,
)

__all__ = [
    "install_cpu_shims",
    "initialize_parallel",
    "destroy_parallel",
    "current_parallel_info",
    "validate_world",
    "ParallelInfo",
    "ParallelConfigError",
]
