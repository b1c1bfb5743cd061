#!/usr/bin/env bash
# Container entrypoint: record the software stack in the job log, then run the given command
# (default: disco-pretrain --help).
set -euo pipefail

python - <<'PY'
import importlib.metadata as md

import torch


def version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "absent"


print(
    f"disco_megatron {version('disco_megatron')} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
    f"megatron-core {version('megatron-core')} | TransformerEngine {version('transformer_engine')} | GPUs {torch.cuda.device_count()}",
    flush=True,
)
PY

if (($# == 0)); then
    set -- disco-pretrain --help
fi
exec "$@"
