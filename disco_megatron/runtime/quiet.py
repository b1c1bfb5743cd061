"""Warnings megatron-core emits on every run that say nothing about the run, filtered in one place."""
from __future__ import annotations

import warnings

# (message pattern, category): CUDA tuning hints and apex/TransformerEngine fallbacks on every
# import, and megatron's own deprecated torch calls inside dist_checkpointing loads and sequence parallel.
_KNOWN_NOISE = (
    (".*full scope is deprecated.*", Warning),
    (".*CUDA_DEVICE_MAX_CONNECTIONS.*", Warning),
    (".*Apex is not installed.*", Warning),
    (".*Transformer Engine and Apex are not installed.*", Warning),
    ("`load_state_dict` is deprecated", FutureWarning),
    ("Please use DTensor instead", FutureWarning),
    ("`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning),
)


def quiet_known_warnings() -> None:
    """Filter the megatron-core warnings that do not apply (the trainer and the converter call it)."""
    for pattern, category in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)
