"""``python -m disco_megatron.train`` / ``disco-pretrain``: pretraining entry point (launch with torchrun).

Every bad input ends the same way on every rank: one ``disco-pretrain: error`` line naming the
flag or file, exit code 2, no traceback wall and no hang.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from disco_megatron.config import ConfigError, parse_run_config
    from disco_megatron.training.checkpointing import CheckpointError
    from disco_megatron.training.logs import error
    from disco_megatron.training.loop import TrainingError, pretrain
    from disco_megatron.runtime import destroy_parallel

    expected = (ConfigError, CheckpointError, TrainingError, FileNotFoundError, ValueError)
    try:
        pretrain(parse_run_config(argv))
    except expected as exc:
        error(str(exc))
        return 2
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
