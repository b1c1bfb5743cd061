#!/usr/bin/env python
"""Tokenize JSONL or plain-text files into megatron-core indexed datasets (.bin/.idx).

JSONL inputs (``.jsonl``/``.json``, one JSON object per line) give one document per line and one
output per ``--json-keys`` key, ``{output_prefix}_{key}_document``; any other file is plain text,
one document per file, written to ``{output_prefix}_text_document``. Pass that prefix to
``--data-path`` for training.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from typing import Iterator

from disco_megatron.data.corpus import read_jsonl_texts
from disco_megatron.data.indexed import write_indexed_dataset
from disco_megatron.data.tokenizer import SentencePieceTokenizer, encode_texts

logger = logging.getLogger("preprocess_data")

_JSONL_SUFFIXES = (".jsonl", ".json")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="input files or glob patterns; .jsonl/.json files are read as JSON lines, anything "
        "else as plain text (one document per file). All inputs must be of one kind.",
    )
    parser.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="keys of each JSON line to tokenize, one output dataset per key (default: text)",
    )
    parser.add_argument(
        "--tokenizer-model",
        required=True,
        help="SentencePiece .model file used to tokenize (its EOS piece is the end-of-document id)",
    )
    parser.add_argument(
        "--output-prefix",
        required=True,
        help="output path prefix; writes {prefix}_{key}_document.bin and .idx",
    )
    parser.add_argument(
        "--append-eod",
        action="store_true",
        help="append the end-of-document token after every document (needed for GPT training, "
        "so samples spanning two documents see the boundary)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tokenizer processes (default 1: tokenize in this process)",
    )
    parser.add_argument(
        "--log-interval",
        type=int,
        default=1000,
        help="print a progress line every this many documents (0: only the summary)",
    )
    return parser


def _expand_inputs(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"--input {pattern}: the pattern matches no file")
        for path in matches:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--input {path}: no such file")
            files.append(path)
    kinds = {path.endswith(_JSONL_SUFFIXES) for path in files}
    if len(kinds) > 1:
        raise ValueError(
            "--input mixes JSONL (.jsonl/.json) and plain-text files; preprocess them separately"
        )
    return files


def _texts(files: list[str], key: str | None) -> Iterator[str]:
    for path in files:
        if key is None:
            with open(path, encoding="utf-8", newline="") as f:
                yield f.read()
        else:
            yield from read_jsonl_texts(path, key)


def main(argv: list[str] | None = None) -> list[str]:
    """Run the tool; returns the written prefixes. Bad input raises ValueError/FileNotFoundError."""
    args = _parser().parse_args(argv)
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}: must be at least 1")
    files = _expand_inputs(args.input)
    tokenizer = SentencePieceTokenizer(args.tokenizer_model)
    eod = tokenizer.eod if args.append_eod else None
    keys = args.json_keys if files[0].endswith(_JSONL_SUFFIXES) else [None]
    prefixes = []
    for key in keys:
        prefix = f"{args.output_prefix}_{key or 'text'}_document"
        kind = key or "(plain text)"
        logger.info("tokenizing %d file(s), key %s -> %s", len(files), kind, prefix)
        documents = encode_texts(args.tokenizer_model, _texts(files, key), args.workers)
        stats = write_indexed_dataset(
            prefix, documents, tokenizer.vocab_size, eod, log_every=args.log_interval
        )
        logger.info("wrote %s: %d documents, %d tokens", prefix, stats.documents, stats.tokens)
        prefixes.append(prefix)
    return prefixes


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"preprocess_data.py: error: {err}")
