"""disco_megatron.norms: norm definitions (full and from TP shards), per-step tracker, writers."""
from disco_megatron.norms.definitions import aggregate_groups, matrix_norms, vector_norms
from disco_megatron.norms.sharded import PowerIterationState, sharded_norms
from disco_megatron.norms.tracker import NormTracker
from disco_megatron.norms.writers import (
    JsonlNormWriter,
    TensorBoardNormWriter,
    norm_log_path,
    read_norms_jsonl,
    read_norms_tensorboard,
)

__all__ = [
    "matrix_norms",
    "vector_norms",
    "aggregate_groups",
    "sharded_norms",
    "PowerIterationState",
    "NormTracker",
    "JsonlNormWriter",
    "TensorBoardNormWriter",
    "norm_log_path",
    "read_norms_jsonl",
    "read_norms_tensorboard",
]
