#!/usr/bin/env python
"""Checkpoint conversion (thin wrapper of ``disco-convert``; see disco_megatron/checkpoint/cli.py).

    convert_checkpoint.py to-hf   --load SAVE [--ckpt-step N] --out HF_DIR [--tokenizer-model M] [--force]
    convert_checkpoint.py from-hf --hf HF_DIR --out SAVE [--tokenizer-model M] [--force]
    convert_checkpoint.py reshard --load SAVE [--ckpt-step N] --out SAVE2 --target-tp C --target-pp D [--force]
    convert_checkpoint.py legacy  --load MEGATRON_LM_SAVE [--ckpt-step N] --out SAVE [--tokenizer-model M]
    convert_checkpoint.py inspect --load SAVE [--ckpt-step N]
"""
import sys

from disco_megatron.checkpoint.cli import main

if __name__ == "__main__":  # guard: reshard spawns processes that re-import this file
    sys.exit(main())
