"""Data pipeline: corpus, tokenizer, indexed format, preprocess tool, GPT datasets, batches."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy
import pytest
import torch

from disco_megatron.data import (
    SentencePieceTokenizer,
    build_embedded_corpus,
    build_embedded_dataset,
    build_gpt_datasets,
    micro_batches,
    padded_vocab_size,
    read_indexed_dataset,
    read_jsonl_texts,
    train_sentencepiece,
)
from tests._dist import run_workers

SMALL_BYTES = 200_000
SMALL_VOCAB = 512
SEQ = 32
TRICKY_TEXTS = [
    "def f(x):\n    return x  # ok\n",
    "héllo wörld — 世界 🙂 Ωμέγα\n\ttab\r\n",
    "  leading and trailing spaces   ",
    "\n\n\nthree newlines, then a null \x00 byte",
]


def _load_preprocess_tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "preprocess_data.py"
    spec = importlib.util.spec_from_file_location("preprocess_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


preprocess_data = _load_preprocess_tool()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A small embedded dataset (prefix, tokenizer) built once for the module."""
    cache = tmp_path_factory.mktemp("cache")
    prefix, model = build_embedded_dataset(str(cache), SMALL_VOCAB, max_bytes=SMALL_BYTES)
    return prefix, SentencePieceTokenizer(model), cache


@pytest.fixture(scope="module")
def gpt_splits(embedded):
    prefix, tokenizer, cache = embedded
    return build_gpt_datasets(
        prefix, tokenizer, SEQ, (96, 8, 0), split="90,10,0", cache_dir=str(cache / "index")
    )


def test_corpus_is_deterministic_and_cached(tmp_path, monkeypatch):
    first = build_embedded_corpus(str(tmp_path / "a"), max_bytes=SMALL_BYTES)
    second = build_embedded_corpus(str(tmp_path / "b"), max_bytes=SMALL_BYTES)
    data = Path(first.path).read_bytes()
    assert first.sha256 == second.sha256 == hashlib.sha256(data).hexdigest()
    assert data == Path(second.path).read_bytes()
    assert SMALL_BYTES // 2 < first.num_bytes <= SMALL_BYTES
    texts = list(read_jsonl_texts(first.path))
    assert len(texts) == first.documents > 10
    assert sum(len(t.encode("utf-8")) for t in texts) == first.num_bytes
    os.utime(first.path, (0, 0))
    assert build_embedded_corpus(str(tmp_path / "a"), max_bytes=SMALL_BYTES) == first
    assert os.stat(first.path).st_mtime == 0  # served from the cache, not rebuilt
    monkeypatch.setenv("DISCO_CACHE_DIR", str(tmp_path / "env"))
    assert build_embedded_corpus(max_bytes=SMALL_BYTES).path.startswith(str(tmp_path / "env"))


def test_tokenizer_is_deterministic_and_round_trips(tmp_path):
    texts = list(read_jsonl_texts(build_embedded_corpus(str(tmp_path), SMALL_BYTES).path))
    model = train_sentencepiece(texts, 400)
    assert model == train_sentencepiece(texts, 400)
    path = tmp_path / "m.model"
    path.write_bytes(model)
    tokenizer = SentencePieceTokenizer(str(path))
    assert tokenizer.vocab_size == 400
    assert tokenizer.eod == tokenizer.eos != tokenizer.pad
    for text in TRICKY_TEXTS + texts[:3]:
        ids = tokenizer.tokenize(text)
        assert all(0 <= i < 400 for i in ids)
        assert tokenizer.detokenize(ids) == text
    assert len(tokenizer.tokenize(texts[0])) < 0.8 * len(texts[0].encode("utf-8"))  # it merges
    assert tokenizer.unique_identifiers["model_sha256"] == hashlib.sha256(model).hexdigest()


def test_padded_vocab_size():
    assert padded_vocab_size(4096) == 4096
    assert padded_vocab_size(4097) == 4224
    assert padded_vocab_size(50257) == 50304  # GPT-2's padded vocabulary in Megatron-LM
    assert padded_vocab_size(50257, 128, tp_size=8) == 51200
    assert padded_vocab_size(100, divisible_by=64, tp_size=2) == 128
    with pytest.raises(ValueError, match="--tensor-model-parallel-size"):
        padded_vocab_size(100, tp_size=0)


def test_preprocess_round_trips_jsonl_and_text(embedded, tmp_path):
    _, tokenizer, _ = embedded
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"text": t, "title": f"doc {i}"}) for i, t in enumerate(TRICKY_TEXTS)),
        encoding="utf-8",
    )
    out = str(tmp_path / "out")
    prefixes = preprocess_data.main(
        ["--input", str(jsonl), "--json-keys", "text", "title", "--tokenizer-model",
         tokenizer.path, "--output-prefix", out, "--append-eod"]
    )
    assert prefixes == [out + "_text_document", out + "_title_document"]
    texts = read_indexed_dataset(prefixes[0])
    titles = read_indexed_dataset(prefixes[1])
    assert len(texts) == len(titles) == len(TRICKY_TEXTS)
    for i, text in enumerate(TRICKY_TEXTS):
        assert texts[i][-1] == tokenizer.eod
        assert tokenizer.detokenize(texts[i][:-1]) == text
        assert tokenizer.detokenize(titles[i][:-1]) == f"doc {i}"

    for i, text in enumerate(TRICKY_TEXTS):
        (tmp_path / f"plain{i}.txt").write_text(text, encoding="utf-8", newline="")
    single, parallel = str(tmp_path / "one"), str(tmp_path / "two")
    common = ["--input", str(tmp_path / "plain*.txt"), "--tokenizer-model", tokenizer.path]
    preprocess_data.main(common + ["--output-prefix", single, "--workers", "1"])
    preprocess_data.main(common + ["--output-prefix", parallel, "--workers", "2"])
    one = read_indexed_dataset(single + "_text_document")
    two = read_indexed_dataset(parallel + "_text_document")
    assert [tokenizer.detokenize(one[i]) for i in range(len(one))] == TRICKY_TEXTS
    assert all(numpy.array_equal(one[i], two[i]) for i in range(len(one)))


def test_missing_inputs_name_the_flag(embedded, tmp_path):
    _, tokenizer, _ = embedded
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        SentencePieceTokenizer(str(tmp_path / "absent.model"))
    with pytest.raises(FileNotFoundError, match="--data-path .*preprocess_data"):
        read_indexed_dataset(str(tmp_path / "absent_text_document"))
    with pytest.raises(FileNotFoundError, match="--data-path"):
        build_gpt_datasets(str(tmp_path / "absent"), tokenizer, SEQ, (1, 1, 0))
    with pytest.raises(FileNotFoundError, match="--input"):
        preprocess_data.main(["--input", str(tmp_path / "none.jsonl"), "--tokenizer-model",
                              tokenizer.path, "--output-prefix", str(tmp_path / "o")])
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="--json-keys"):
        preprocess_data.main(["--input", str(jsonl), "--tokenizer-model", tokenizer.path,
                              "--output-prefix", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        preprocess_data.main(["--input", str(jsonl), "--tokenizer-model", str(tmp_path / "x.model"),
                              "--output-prefix", str(tmp_path / "o")])


def test_gpt_samples_are_shifted_stream_slices(embedded, gpt_splits):
    prefix, tokenizer, _ = embedded
    train, valid, test = gpt_splits
    assert test is None and len(train) >= 96 and len(valid) >= 8
    indexed = read_indexed_dataset(prefix)
    stream = numpy.concatenate([indexed[int(d)] for d in train.document_index])
    lengths = [len(indexed[int(d)]) for d in train.document_index]
    starts = numpy.concatenate([[0], numpy.cumsum(lengths)])
    for i in (0, 5, len(train) - 1):
        item = train[i]
        tokens, labels = item["tokens"], item["labels"]
        assert tokens.shape == labels.shape == (SEQ,)
        assert torch.equal(labels[:-1], tokens[1:])
        doc, offset = train.sample_index[train.shuffle_index[i]]
        begin = starts[doc] + offset
        expected = torch.from_numpy(stream[begin : begin + SEQ + 1].astype(numpy.int64))
        assert torch.equal(torch.cat([tokens, labels[-1:]]), expected)
        assert torch.equal(item["position_ids"], torch.arange(SEQ))
        assert torch.equal(item["loss_mask"], torch.ones(SEQ))
    assert int(stream.max()) < tokenizer.vocab_size


def test_micro_batches_resume_and_split_over_data_parallel_ranks(gpt_splits):
    train, valid, _ = gpt_splits
    full = list(micro_batches(train, 2, consumed_samples=0))
    assert len(full) == len(train) // 2
    batch = full[0]
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (2, SEQ)
    assert batch["attention_mask"] is None
    assert torch.equal(batch["tokens"], torch.stack([train[0]["tokens"], train[1]["tokens"]]))

    resumed = micro_batches(train, 2, consumed_samples=6)
    for k in range(3, 8):
        got = next(resumed)
        assert all(torch.equal(got[key], full[k][key]) for key in ("tokens", "labels", "loss_mask"))
    assert resumed.consumed_samples == 16

    single = micro_batches(valid, 4)
    rank0, rank1 = micro_batches(valid, 2, 0, 2), micro_batches(valid, 2, 1, 2)
    steps = 0
    for whole, a, b in zip(single, rank0, rank1):
        assert torch.equal(torch.cat([a["tokens"], b["tokens"]]), whole["tokens"])
        rows = {tuple(r.tolist()) for r in torch.cat([a["tokens"], b["tokens"]])}
        assert len(rows) == 4  # disjoint samples
        steps += 1
    assert steps == len(valid) // 4 >= 2
    with pytest.raises(ValueError, match="rank 2 of size 2"):
        micro_batches(valid, 2, 2, 2)


def _gloo_build_worker(
    rank: int, world_size: int, prefix: str, model: str, cache: str, expected: list
) -> None:
    tokenizer = SentencePieceTokenizer(model)
    train, valid, _ = build_gpt_datasets(
        prefix, tokenizer, SEQ, (96, 8, 0), "90,10,0", cache_dir=cache
    )
    got = [train[i]["tokens"].tolist() for i in range(3)] + [valid[0]["tokens"].tolist()]
    if got != expected:
        raise AssertionError(f"rank {rank}: samples differ from the single-process build")


def test_gpt_datasets_build_inside_gloo_group(embedded, gpt_splits, tmp_path):
    prefix, tokenizer, _ = embedded
    train, valid, _ = gpt_splits
    expected = [train[i]["tokens"].tolist() for i in range(3)] + [valid[0]["tokens"].tolist()]
    cache = str(tmp_path / "shared_index")
    run_workers(_gloo_build_worker, 2, prefix, tokenizer.path, cache, expected)
    assert any(name.endswith("shuffle_index.npy") for name in os.listdir(cache))
