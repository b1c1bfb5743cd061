"""SentencePiece tokenizer, trained deterministically on the embedded corpus, for megatron-core.

The trainer keeps text exactly (identity normalisation, no whitespace folding, no dummy prefix,
byte fallback, newline as its own piece), so ``detokenize(tokenize(s)) == s`` for any string,
which Python source with its indentation needs.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import time
from collections import OrderedDict
from typing import Iterable, Iterator, Sequence

import sentencepiece
from megatron.core.tokenizers import MegatronTokenizerBase

from disco_megatron.data.corpus import (
    Corpus,
    atomic_write_bytes,
    default_cache_dir,
    read_jsonl_texts,
)

logger = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 4096
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_SEED = 1234
_MIN_VOCAB_SIZE = 300  # 4 specials + newline + 256 byte-fallback pieces + a few merges


class SentencePieceTokenizer(MegatronTokenizerBase):
    """megatron-core tokenizer over a SentencePiece ``.model`` file (EOD is the EOS piece)."""

    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"--tokenizer-model {model_path}: no such file; pass a SentencePiece .model file "
                "or omit --data-path to use the embedded corpus and its tokenizer"
            )
        super().__init__(model_path, {})
        with open(model_path, "rb") as f:
            proto = f.read()
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        self._sha256 = hashlib.sha256(proto).hexdigest()
        if self._sp.eos_id() < 0:
            raise ValueError(
                f"--tokenizer-model {model_path}: the model has no EOS piece to use as "
                "end-of-document; train it with eos_id >= 0"
            )

    def tokenize(self, text: str) -> list[int]:
        """Text to token ids (no BOS/EOS added)."""
        return self._sp.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Token ids back to text."""
        return self._sp.decode([int(i) for i in ids])

    def apply_chat_template(self, *args, **kwargs):
        """Not a chat model tokenizer."""
        raise NotImplementedError("SentencePieceTokenizer has no chat template")

    @property
    def vocab(self) -> dict[str, int]:
        """Piece -> id."""
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Id -> piece."""
        return {i: self._sp.id_to_piece(i) for i in range(self.vocab_size)}

    @property
    def vocab_size(self) -> int:
        """Number of pieces (before padding for the embedding table)."""
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        """End-of-document id appended after every document."""
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        """Pad id (-1 when the model has none; megatron-core then uses its own sentinel)."""
        return self._sp.pad_id()

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Keys megatron-core's dataset index cache by the model's content, not its path."""
        return OrderedDict([("class", type(self).__name__), ("model_sha256", self._sha256)])




def train_sentencepiece(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> bytes:
    """Train a BPE SentencePiece model on ``texts`` and return the ``.model`` bytes.

    Deterministic: fixed seed, one thread, every non-blank line in input order (no sampling,
    no shuffling).
    """
    if vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size}: must be at least {_MIN_VOCAB_SIZE}")
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    if not lines:
        raise ValueError("no text to train the tokenizer on")
    model = io.BytesIO()
    sentencepiece.set_random_generator_seed(_SEED)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=4096,
        character_coverage=0.9999,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        minloglevel=2,
    )
    return model.getvalue()


def build_embedded_tokenizer(
    corpus: Corpus, vocab_size: int = DEFAULT_VOCAB_SIZE, cache_dir: str | None = None
) -> str:
    """Train (or reuse from cache) the tokenizer of ``corpus``; returns the ``.model`` path.

    Cached by vocab size and corpus sha256; written atomically, so concurrent callers are safe.
    """
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, "tokenizer", f"spm-bpe-v{vocab_size}-{corpus.sha256[:16]}.model")
    if os.path.isfile(path):
        return path
    logger.info("training SentencePiece tokenizer (vocab %d) on %s", vocab_size, corpus.path)
    start = time.perf_counter()
    atomic_write_bytes(path, train_sentencepiece(read_jsonl_texts(corpus.path), vocab_size))
    logger.info("tokenizer written to %s (%.1f s)", path, time.perf_counter() - start)
    return path


_worker_tokenizer: SentencePieceTokenizer | None = None


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = SentencePieceTokenizer(model_path)


def _encode_in_worker(text: str) -> list[int]:
    return _worker_tokenizer.tokenize(text)


def encode_texts(model_path: str, texts: Iterable[str], workers: int = 1) -> Iterator[list[int]]:
    """Tokenize ``texts`` in order, in ``workers`` processes (1: in this process)."""
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be at least 1")
    if workers == 1:
        tokenizer = SentencePieceTokenizer(model_path)
        yield from map(tokenizer.tokenize, texts)
        return
    SentencePieceTokenizer(model_path)  # fail here, with the named error, not inside a worker
    # fork: workers inherit the loaded modules instead of re-importing megatron-core each
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(model_path,)) as pool:
        yield from pool.imap(_encode_in_worker, texts, chunksize=16)
