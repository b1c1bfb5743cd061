"""Data pipeline: embedded demo corpus, SentencePiece tokenizer, megatron-core datasets."""

from disco_megatron.data.corpus import (
    DEFAULT_MAX_BYTES,
    Corpus,
    build_embedded_corpus,
    default_cache_dir,
    read_jsonl_texts,
)
from disco_megatron.data.datasets import MicroBatchIterator, build_gpt_datasets, micro_batches
from disco_megatron.data.indexed import (
    IndexedStats,
    build_embedded_dataset,
    read_indexed_dataset,
    require_indexed_dataset,
    write_indexed_dataset,
)
from disco_megatron.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    SentencePieceTokenizer,
    build_embedded_tokenizer,
    encode_texts,
    train_sentencepiece,
)
from disco_megatron.config import padded_vocab_size

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_VOCAB_SIZE",
    "Corpus",
    "IndexedStats",
    "MicroBatchIterator",
    "SentencePieceTokenizer",
    "build_embedded_corpus",
    "build_embedded_dataset",
    "build_embedded_tokenizer",
    "build_gpt_datasets",
    "default_cache_dir",
    "encode_texts",
    "micro_batches",
    "padded_vocab_size",
    "read_indexed_dataset",
    "read_jsonl_texts",
    "require_indexed_dataset",
    "train_sentencepiece",
    "write_indexed_dataset",
]
