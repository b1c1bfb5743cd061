"""megatron-core indexed datasets (``prefix.bin`` + ``prefix.idx``): atomic writing and reading.

Also builds the embedded demo dataset end to end (corpus -> tokenizer -> indexed dataset).
"""

from __future__ import annotations

import logging
import os
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import (
    _INDEX_HEADER,
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from disco_megatron.data.corpus import (
    DEFAULT_MAX_BYTES,
    build_embedded_corpus,
    default_cache_dir,
    read_jsonl_texts,
)
from disco_megatron.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    SentencePieceTokenizer,
    build_embedded_tokenizer,
    encode_texts,
)

logger = logging.getLogger(__name__)
# magic (9 bytes), version (u64), dtype code (u8), sequence count (u64), document count (u64)
_IDX_HEADER_BYTES = 34


@dataclass(frozen=True)
class IndexedStats:
    """What was written."""

    prefix: str
    documents: int
    tokens: int


def write_indexed_dataset(
    output_prefix: str,
    documents: Iterable[Sequence[int]],
    vocab_size: int,
    eod_id: int | None = None,
    log_every: int = 0,
) -> IndexedStats:
    """Write token-id documents (``eod_id`` appended when given) as ``output_prefix.{bin,idx}``.

    Both files are written under temporary names and renamed, ``.bin`` first and ``.idx`` last, so
    a reader that finds the ``.idx`` always finds a complete ``.bin``.
    """
    directory = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(directory, exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    dtype = DType.optimal_dtype(vocab_size)
    builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=dtype)
    num_docs = num_tokens = 0
    start = time.perf_counter()
    try:
        for ids in documents:
            if eod_id is not None:
                ids = [*ids, eod_id]
            if not ids:
                continue
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            num_docs += 1
            num_tokens += len(ids)
            if log_every and num_docs % log_every == 0:
                elapsed = time.perf_counter() - start
                logger.info(
                    "%d documents, %d tokens (%.0f tokens/s)",
                    num_docs,
                    num_tokens,
                    num_tokens / elapsed,
                )
        builder.finalize(get_idx_path(tmp_prefix))
        if num_docs == 0:
            raise ValueError(f"{output_prefix}: no non-empty documents to write")
        os.replace(get_bin_path(tmp_prefix), get_bin_path(output_prefix))
        os.replace(get_idx_path(tmp_prefix), get_idx_path(output_prefix))
    finally:
        builder.data_file.close()
        for path in (get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)):
            if os.path.exists(path):
                os.unlink(path)
    return IndexedStats(output_prefix, num_docs, num_tokens)


def require_indexed_dataset(prefix: str) -> None:
    """Raise a FileNotFoundError saying how to make ``prefix.{bin,idx}`` when one is missing,
    and a ValueError naming the file when one is corrupt or truncated."""
    for path in (get_idx_path(prefix), get_bin_path(prefix)):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--data-path {prefix}: no such file {path}; run tools/preprocess_data.py first "
                "(the prefix excludes the .bin/.idx suffix)"
            )
    check_indexed_sizes(prefix)


def check_indexed_sizes(prefix: str) -> None:
    """Check both files against the index header before megatron memory-maps them.

    A truncated ``.bin`` (a copy cut short, a full disk) would otherwise fail mid-training on
    whichever rank first reads past its end; a truncated ``.idx`` with an assertion.
    """
    idx, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    fix = "re-create it with tools/preprocess_data.py"
    with open(idx, "rb") as f:
        header = f.read(_IDX_HEADER_BYTES)
        if len(header) < _IDX_HEADER_BYTES or header[:9] != _INDEX_HEADER:
            raise ValueError(f"--data-path {prefix}: {idx} is not a megatron index file (bad header); {fix}")
        version, code, sequences, documents = struct.unpack("<QBQQ", header[9:])
        expected = _IDX_HEADER_BYTES + 12 * sequences + 8 * documents  # int32 lengths, int64 pointers, int64 docs
        if version != 1 or os.path.getsize(idx) != expected:
            raise ValueError(f"--data-path {prefix}: {idx} has {os.path.getsize(idx)} bytes but its header "
                             f"(version {version}) describes {expected}: truncated or corrupt; {fix}")
        lengths = np.fromfile(f, dtype=np.int32, count=sequences)
    expected = int(lengths.sum(dtype=np.int64)) * DType.size(DType.dtype_from_code(code))
    if os.path.getsize(bin_path) != expected:
        raise ValueError(f"--data-path {prefix}: {bin_path} has {os.path.getsize(bin_path)} bytes but "
                         f"{idx} describes {expected}: truncated or corrupt; {fix}")


def read_indexed_dataset(prefix: str) -> IndexedDataset:
    """Open ``prefix.{bin,idx}`` (memory-mapped)."""
    require_indexed_dataset(prefix)
    return IndexedDataset(prefix, multimodal=False)


def build_embedded_dataset(
    cache_dir: str | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[str, str]:
    """Build (or reuse) corpus, tokenizer and indexed dataset; returns ``(prefix, model_path)``.

    Idempotent and safe to call from several processes (every step writes atomically); the
    training entry point calls it on rank 0 and barriers so the others only read the cache.
    """
    cache_dir = cache_dir or default_cache_dir()
    corpus = build_embedded_corpus(cache_dir, max_bytes)
    model_path = build_embedded_tokenizer(corpus, vocab_size, cache_dir)
    prefix = os.path.join(
        cache_dir, "indexed", f"stdlib-v{vocab_size}-{corpus.sha256[:16]}_text_document"
    )
    if IndexedDataset.exists(prefix):
        return prefix, model_path
    logger.info("tokenizing the embedded corpus into %s", prefix)
    start = time.perf_counter()
    eod = SentencePieceTokenizer(model_path).eod
    stats = write_indexed_dataset(
        prefix, encode_texts(model_path, read_jsonl_texts(corpus.path)), vocab_size, eod
    )
    logger.info(
        "embedded dataset: %d documents, %d tokens (%.1f s)",
        stats.documents,
        stats.tokens,
        time.perf_counter() - start,
    )
    return prefix, model_path

