"""Checkpoint conversion: to-hf / from-hf / reshard / legacy / inspect on real trained checkpoints.

A tiny GQA model (8 heads, 4 query groups: TP4 needs groups divisible by 4, 2 heads per group
keeps GQA) is trained 4 steps at TP2xPP2 with a checkpoint at step 2 and 4. Conversions run
in this process through the CLI's ``main`` (reshard spawns its own gloo processes).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tests._launch import TINY_MODEL, torchrun, train_losses

_GQA4 = {"--num-attention-heads": "8", "--num-query-groups": "4"}
MODEL = [_GQA4.get(TINY_MODEL[i - 1], flag) if i % 2 else flag for i, flag in enumerate(TINY_MODEL)]
LR = {"scion": "0.01", "adam": "1e-3"}
SEQ, VOCAB, LAYERS, HEADS, GROUPS = 32, 4096, 4, 8, 4


def _train_args(run_dir: Path, optimizer: str, tp: int, pp: int, extra: list[str] = ()) -> list[str]:
    return [*MODEL, "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--log-interval", "1",
            "--optimizer", optimizer, "--lr", LR[optimizer], "--run-dir", str(run_dir), *extra]


def _train(run_dir: Path, optimizer: str, tp: int = 2, pp: int = 2, extra: list[str] = ()) -> Path:
    result = torchrun(4, _train_args(run_dir, optimizer, tp, pp, ["--save-interval", "2", *extra]))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def scion_run(tmp_path_factory, embedded_data) -> Path:
    return _train(tmp_path_factory.mktemp("scion"), "scion")


@pytest.fixture(scope="module")
def hf_dir(scion_run, tmp_path_factory) -> Path:
    """The export of the TP2xPP2 run, its tokenizer taken from the run's run_config.json."""
    out = tmp_path_factory.mktemp("hf") / "model"
    assert _convert("to-hf", "--load", scion_run / "checkpoints", "--out", out) == 0
    return out


def _convert(*argv) -> int:
    from disco_megatron.checkpoint.cli import main

    return main([str(a) for a in argv])


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    x, y = _safetensors(a), _safetensors(b)
    assert sorted(x) == sorted(y)
    for name in x:
        assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name


def test_to_hf_logits_equal_megatron(scion_run, hf_dir):
    """transformers' LlamaForCausalLM on the export == the TP1 megatron model loaded from the TP2xPP2 checkpoint."""
    transformers = pytest.importorskip("transformers")
    from disco_megatron.checkpoint.convert import load_full_model, single_process_parallel

    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (VOCAB, 64, LAYERS)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == \
        (HEADS, GROUPS, 128)
    assert config["tie_word_embeddings"] is False and config["rope_theta"] == 10000.0
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with single_process_parallel():
        model, cfg = load_full_model(str(scion_run / "checkpoints"))
        model.eval()
        with torch.no_grad():
            reference = model(tokens, torch.arange(SEQ).expand(2, -1), None)[..., :cfg.vocab_size]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).float().eval()
    with torch.no_grad():
        logits = hf(tokens).logits
    diff = (logits - reference).abs().max().item()
    print(f"max |HF logits - megatron logits| = {diff:.3e} (logit scale {reference.abs().max().item():.2f})")
    assert diff <= 1e-4



def test_to_hf_tokenizer_gives_the_sentencepiece_ids_of_corpus_text(hf_dir, embedded_data):
    """AutoTokenizer on the export (the tokenizer the run recorded) == sentencepiece, on stdlib source
    documents (the most whitespace-heavy among them included) and on odd whitespace and unicode."""
    transformers = pytest.importorskip("transformers")
    import sentencepiece

    from disco_megatron.data.corpus import build_embedded_corpus, read_jsonl_texts

    assert (hf_dir / "tokenizer.model").read_bytes() == Path(embedded_data[1]).read_bytes()
    sp = sentencepiece.SentencePieceProcessor(model_file=embedded_data[1])
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    documents = [text for _, text in zip(range(400), read_jsonl_texts(build_embedded_corpus().path))]
    whitespace_heavy = max(documents, key=lambda t: sum(c.isspace() for c in t) / max(len(t), 1))
    texts = [*documents[:20], whitespace_heavy, "def f(x):\n\tif x:\n\t\treturn  x + 1  # two  spaces\n\n\n",
             "  leading spaces", "trailing   \n", "ünïcödé 🙂 € \x00"]
    assert sum(c.isspace() for c in whitespace_heavy) > 0.3 * len(whitespace_heavy)
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text), text[:200]
        assert tokenizer.decode(sp.encode(text)) == text


def test_to_hf_loss_on_a_validation_batch_equals_megatron(scion_run, hf_dir, embedded_data):
    """LlamaForCausalLM's loss on a validation batch == the megatron model's loss on it (loaded from the
    TP2xPP2 checkpoint at TP1), both masked means of next-token cross entropy."""
    transformers = pytest.importorskip("transformers")
    from disco_megatron.checkpoint.convert import load_full_model, single_process_parallel
    from disco_megatron.data import SentencePieceTokenizer, build_gpt_datasets, micro_batches

    with single_process_parallel():
        _, valid, _ = build_gpt_datasets(embedded_data[0], SentencePieceTokenizer(embedded_data[1]), SEQ,
                                         (16, 16, 0), "98,2,0", 1234, str(scion_run / "index"))
        batch = next(micro_batches(valid, 4))
        model, cfg = load_full_model(str(scion_run / "checkpoints"))
        model.eval()
        with torch.no_grad():
            per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"].float()
    megatron_loss = (per_token.float() * mask).sum() / mask.sum()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).float().eval()
    with torch.no_grad():
        logits = hf(batch["tokens"]).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                           reduction="none")
    hf_loss = (ce * mask.reshape(-1)).sum() / mask.sum()
    diff = abs(hf_loss.item() - megatron_loss.item())
    print(f"validation batch loss: HF {hf_loss.item():.6f}, megatron {megatron_loss.item():.6f}, |diff| {diff:.3e}")
    assert diff <= 1e-4 and 4 < megatron_loss.item() < 9


def test_from_hf_to_hf_round_trip_is_bit_identical(hf_dir, tmp_path, capsys):
    from disco_megatron.config import parse_run_config
    from disco_megatron.checkpoint.storage import check_compatible, read_common_state

    save, back = tmp_path / "save", tmp_path / "back"
    (save / "stale").mkdir(parents=True)
    assert _convert("from-hf", "--hf", hf_dir, "--out", save) == 2
    assert "--force" in capsys.readouterr().err
    assert _convert("from-hf", "--hf", hf_dir, "--out", save, "--force") == 0
    printed = capsys.readouterr().out
    assert not (save / "stale").exists() and (save / "latest_checkpointed_iteration.txt").read_text() == "0"
    flags = printed.split("--no-load-optim", 1)[1].splitlines()[0].split()
    assert flags[-2:] == ["--tokenizer-model", str(hf_dir / "tokenizer.model")]
    _, common = read_common_state(str(save))
    assert "optimizer_type" not in common and common["train_state"]["iteration"] == 0
    check_compatible(str(save), common["model_config"], asdict(parse_run_config(flags).model))
    assert _convert("to-hf", "--load", save, "--out", back, "--tokenizer-model", hf_dir / "tokenizer.model") == 0
    _assert_same_weights(hf_dir, back)
    assert json.loads((back / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_from_hf_pads_a_tied_odd_vocab_and_to_hf_trims_it(hf_dir, tmp_path, capsys):
    """vocab 4000 (megatron pads to 4096 rows) with tied embeddings survives HF -> megatron -> HF exactly."""
    from safetensors.torch import save_file

    source = tmp_path / "tied"
    source.mkdir()
    weights = {k: v[:4000].clone() if k == "model.embed_tokens.weight" else v
               for k, v in _safetensors(hf_dir).items() if k != "lm_head.weight"}
    save_file(weights, str(source / "model.safetensors"))
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(vocab_size=4000, tie_word_embeddings=True)
    (source / "config.json").write_text(json.dumps(config))
    assert _convert("from-hf", "--hf", source, "--out", tmp_path / "save") == 0
    assert _convert("inspect", "--load", tmp_path / "save") == 0
    text = capsys.readouterr().out
    assert "embedding.word_embeddings.weight  (4096, 64)" in text and "output_layer" not in text
    assert "--tie-embeddings-and-output-weights" in text
    assert _convert("to-hf", "--load", tmp_path / "save", "--out", tmp_path / "back") == 0
    _assert_same_weights(source, tmp_path / "back")
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["vocab_size"] == 4000 and back["tie_word_embeddings"] is True


def test_qkv_split_follows_megatron_group_layout():
    """Fused rows per query group [q heads of the group | k | v], built here by an explicit loop."""
    from disco_megatron.checkpoint.hf_llama import fuse_qkv, split_qkv

    heads, groups, head_dim, hidden = 8, 2, 3, 5
    q = torch.randn(heads * head_dim, hidden)
    k, v = torch.randn(groups * head_dim, hidden), torch.randn(groups * head_dim, hidden)
    rows = []
    for g in range(groups):
        for h in range(g * heads // groups, (g + 1) * heads // groups):
            rows.append(q[h * head_dim:(h + 1) * head_dim])
        rows += [k[g * head_dim:(g + 1) * head_dim], v[g * head_dim:(g + 1) * head_dim]]
    fused = torch.cat(rows)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, heads, groups), (q, k, v)))
    assert torch.equal(fuse_qkv(q, k, v, heads, groups), fused)


def _plain_checkpoint(ckpt_dir: Path) -> tuple[dict, dict]:
    """(global tensors, common values) of one iteration directory, independent of its layout."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        plain = dist_checkpointing.load_plain_tensors(str(ckpt_dir))
    finally:
        if owns:
            dist.destroy_process_group()
    tensors = {k: v for k, v in plain.items() if torch.is_tensor(v)}
    return tensors, {k: v for k, v in plain.items() if k not in tensors and k != "rng_state"}


@pytest.mark.parametrize("source,tp,pp", [("scion", 1, 1), ("scion", 4, 1), ("adam", 1, 2), ("scion-sharded", 1, 1)])
def test_reshard_keeps_optimizer_state_and_training_continues(scion_run, tmp_path_factory, source, tp, pp):
    """Every global tensor (weights and optimizer state: Scion momentum, Adam moments) and the common
    state (iteration, consumed samples, scheduler, param groups) survive TP2xPP2 -> TPxPP unchanged;
    resumed training then repeats the uninterrupted run's losses to 1e-6 (relative: a float32 loss
    near 8 is only resolved to 1e-6, and TP1 sums in another order than TP2xPP2). ``scion-sharded``:
    a TP2xDP2 run whose Scion state lives on its owners (--scion-dp-mode sharded) resumes
    replicated at TP1."""
    optimizer = source.split("-")[0]
    run = {"scion": lambda: scion_run, "adam": lambda: _train(tmp_path_factory.mktemp("adam"), "adam"),
           "scion-sharded": lambda: _train(tmp_path_factory.mktemp("sharded"), "scion", 2, 1,
                                           ["--scion-dp-mode", "sharded"])}[source]()
    out = tmp_path_factory.mktemp("reshard") / f"tp{tp}pp{pp}"
    assert _convert("reshard", "--load", run / "checkpoints", "--ckpt-step", "2", "--out", out,
                    "--target-tp", tp, "--target-pp", pp) == 0
    source, source_common = _plain_checkpoint(run / "checkpoints" / "iter_0000002")
    target, target_common = _plain_checkpoint(out / "iter_0000002")
    assert sorted(target) == sorted(source) and any(k.startswith("optimizer.state.") for k in source)
    for name in source:
        assert torch.equal(source[name], target[name]), name
    assert target_common.pop("parallel") == {"tp": tp, "pp": pp, "dp": 1}
    source_common.pop("parallel")
    assert target_common == source_common
    resumed = tmp_path_factory.mktemp("resumed")
    result = torchrun(tp * pp, _train_args(resumed, optimizer, tp, pp, ["--load", str(out)]))
    assert result.returncode == 0, result.stderr[-3000:]
    expected, again = train_losses(run), train_losses(resumed)
    assert sorted(again) == [3, 4]
    for iteration in (3, 4):
        assert abs(again[iteration] - expected[iteration]) <= 1e-6 * abs(expected[iteration]), \
            (iteration, again, expected)


def _megatron_shard(name: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Megatron-LM's TP layout, written out here independently of disco_megatron.models.sharding."""
    if "linear_fc1" in name:
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]]).clone()
    if any(k in name for k in ("linear_qkv", "word_embeddings", "output_layer")):
        return full.chunk(tp)[rank].clone()
    if any(k in name for k in ("linear_proj", "linear_fc2")):
        return full.chunk(tp, dim=1)[rank].clone()
    return full.clone()


def _rank_state_dicts(full: dict, tp: int, pp: int) -> dict[tuple[int, int], dict]:
    """Per (tp, pp) rank: the stage's parameters with stage-local layer numbers, as megatron-core names them."""
    per_stage = LAYERS // pp
    states = {}
    for t in range(tp):
        for p in range(pp):
            state = {}
            for name, tensor in full.items():
                layer = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
                if layer:
                    if int(layer[1]) // per_stage != p:
                        continue
                    local = f"decoder.layers.{int(layer[1]) % per_stage}.{layer[2]}"
                    if "linear_" in local:
                        state[local.replace(".weight", "._extra_state")] = None
                elif (name.startswith("embedding.") and p != 0) or (not name.startswith("embedding.") and p != pp - 1):
                    continue
                else:
                    local = name
                state[local] = _megatron_shard(name, tensor, t, tp)
            states[(t, p)] = state
    return states


_OLD_LAYER_NAMES = {"input_layernorm": "input_norm", "self_attention.linear_qkv": "self_attention.query_key_value",
                    "self_attention.linear_proj": "self_attention.dense", "pre_mlp_layernorm": "post_attention_norm",
                    "mlp.linear_fc1": "mlp.dense_h_to_4h", "mlp.linear_fc2": "mlp.dense_4h_to_h"}


def _old_format(state: dict) -> dict:
    """The nested pre-megatron-core ``language_model`` state dict of one rank (PP 1)."""
    encoder = {}
    for name, tensor in state.items():
        layer = re.match(r"decoder\.layers\.(\d+)\.(.*)\.weight", name)
        if layer:
            encoder[f"layers.{layer[1]}.{_OLD_LAYER_NAMES[layer[2]]}.weight"] = tensor
    encoder["final_norm.weight"] = state["decoder.final_layernorm.weight"]
    return {"language_model": {"embedding": {"word_embeddings": {"weight": state["embedding.word_embeddings.weight"]}},
                               "encoder": encoder, "output_layer": {"weight": state["output_layer.weight"]}}}


@pytest.mark.parametrize("names,tp,pp", [("mcore", 2, 2), ("old", 2, 1)])
def test_legacy_checkpoint_converts_exactly(hf_dir, tmp_path, names, tp, pp):
    from disco_megatron.checkpoint.hf_llama import hf_to_megatron, model_config_from_hf

    cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()), "config.json")
    full = hf_to_megatron(_safetensors(hf_dir), cfg, "model.safetensors")
    args = argparse.Namespace(
        num_layers=LAYERS, hidden_size=64, num_attention_heads=HEADS, group_query_attention=True,
        num_query_groups=GROUPS, ffn_hidden_size=128, seq_length=SEQ, max_position_embeddings=SEQ,
        padded_vocab_size=VOCAB, make_vocab_size_divisible_by=128, normalization="RMSNorm", norm_epsilon=1e-5,
        swiglu=True, position_embedding_type="rope", rotary_base=10000, untie_embeddings_and_output_weights=True,
        add_bias_linear=False, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, vocab_size=None)
    legacy = tmp_path / "legacy"
    for (t, p), state in _rank_state_dicts(full, tp, pp).items():
        rank_dir = legacy / "iter_0000004" / (f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
        rank_dir.mkdir(parents=True)
        model = state if names == "mcore" else _old_format(state)
        torch.save({"args": args, "iteration": 4, "checkpoint_version": 3.0, "model": model},
                   rank_dir / "model_optim_rng.pt")
    (legacy / "latest_checkpointed_iteration.txt").write_text("4")
    save, back = tmp_path / "save", tmp_path / "back"
    assert _convert("legacy", "--load", legacy, "--out", save) == 2  # args hold only the padded vocab
    assert _convert("legacy", "--load", legacy, "--out", save, "--tokenizer-model", hf_dir / "tokenizer.model") == 0
    assert _convert("to-hf", "--load", save, "--out", back) == 0
    _assert_same_weights(hf_dir, back)


def test_inspect_prints_layout_progress_and_tensors(scion_run, capsys):
    assert _convert("inspect", "--load", scion_run / "checkpoints", "--ckpt-step", "2") == 0
    text = capsys.readouterr().out
    assert "iteration: 2  consumed samples: 8" in text
    assert "parallel layout: TP 2 x PP 2 x DP 1" in text
    assert "optimizer: ScionOptimizer" in text
    assert f"{LAYERS} layers, hidden 64, heads {HEADS}, query groups {GROUPS}, ffn 128, vocab {VOCAB}" in text
    assert f"  embedding.word_embeddings.weight  ({VOCAB}, 64)  float32" in text
    assert f"  decoder.layers.mlp.linear_fc1.weight  ({LAYERS}, 256, 64)  float32" in text
    assert re.search(r"  optimizer\.state\.\w+\.output_layer\.weight  \(4096, 64\)  float32", text)


def _edited_hf(hf_dir: Path, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(hf_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_mismatched_vocab_and_hidden_size_are_refused(hf_dir, scion_run, tmp_path, capsys):
    from disco_megatron.data import train_sentencepiece

    small = tmp_path / "small.model"
    lines = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)]
    small.write_bytes(train_sentencepiece(lines, 300))
    assert _convert("to-hf", "--load", scion_run / "checkpoints", "--out", tmp_path / "a",
                    "--tokenizer-model", small) == 2
    err = capsys.readouterr().err
    assert f"--tokenizer-model {small} has 300 pieces" in err and f"vocab_size {VOCAB}" in err
    assert _convert("from-hf", "--hf", _edited_hf(hf_dir, tmp_path, vocab_size=4000), "--out", tmp_path / "b") == 2
    assert "has 4096 pieces but" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "edited")
    edited = _edited_hf(hf_dir, tmp_path, hidden_size=128, head_dim=None)
    assert _convert("from-hf", "--hf", edited, "--out", tmp_path / "c") == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "config.json implies" in err
    assert _convert("reshard", "--load", scion_run / "checkpoints", "--out", tmp_path / "d",
                    "--target-tp", "3", "--target-pp", "1") == 2
    assert "--target-tp 3" in capsys.readouterr().err
    adam_config = tmp_path / "run_config.json"
    adam_config.write_text(json.dumps({**json.loads((scion_run / "run_config.json").read_text()), "optimizer": "adam"}))
    assert _convert("reshard", "--load", scion_run / "checkpoints", "--out", tmp_path / "d",
                    "--target-tp", "1", "--target-pp", "1", "--run-config", adam_config) == 2
    assert "says --optimizer adam but" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    from disco_megatron.checkpoint.convert import staged_output

    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_output(str(out)) as tmp:
            Path(tmp, "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with staged_output(str(out)) as tmp:
        Path(tmp, "done.bin").write_bytes(b"y")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "done.bin").read_bytes() == b"y"
