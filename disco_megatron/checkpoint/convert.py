"""The conversions: to-hf, from-hf, reshard, legacy, inspect.

Whole models are read and written through megatron itself: a TP1/PP1 GPTModel in a 1-process
gloo group loads a checkpoint of any TP/PP layout (dist_checkpointing reshards, SwiGLU included),
and checkpoints are written with the trainer's own ``storage.save_checkpoint``. Resharding builds
model + optimizer at the target layout in ``TP x PP`` processes with the trainer's builders, so
optimizer state (Scion momentum, Adam moments) moves with its parameter's sharding.
Every output is written to a temporary directory beside the target and renamed at the end.
Checkpoints Megatron-LM wrote (its args in place of model_config) go through :mod:`megatron_lm`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, replace
from typing import Iterator, Optional

import torch
from torch import Tensor

from disco_megatron.checkpoint import ConversionError, hf_llama, megatron_lm, storage
from disco_megatron.checkpoint.legacy import read_legacy_checkpoint
from disco_megatron.config import ConfigError, ModelConfig, RunConfig, RunDir

HF_WEIGHTS, HF_INDEX = "model.safetensors", "model.safetensors.index.json"
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")
_TP1 = {"tp": 1, "pp": 1, "dp": 1}


# ---- output directories ----------------------------------------------------------------------

def check_output(out: str, force: bool, *inputs: str) -> None:
    """Refuse an output that is an input, a file, or a non-empty directory (unless ``--force``)."""
    if any(os.path.abspath(out) == os.path.abspath(i) for i in inputs):
        raise ConversionError(f"--out {out} is also the input; write to another directory")
    if os.path.isfile(out):
        raise ConversionError(f"--out {out} is a file; give a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ConversionError(f"--out {out} exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def staged_output(out: str) -> Iterator[str]:
    """A temporary directory beside ``out`` that replaces it only when the block succeeds."""
    parent, name = os.path.split(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)
    if os.path.exists(out):
        old = os.path.join(parent, os.path.basename(tmp).replace(".tmp-", ".old-"))
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


# ---- whole models through megatron ------------------------------------------------------------

@contextlib.contextmanager
def single_process_parallel() -> Iterator[None]:
    """megatron TP1/PP1 state in a 1-process gloo group (an in-memory store: no port, no env)."""
    import torch.distributed as dist

    from disco_megatron.runtime import destroy_parallel, initialize_parallel
    from disco_megatron.runtime.parallel import init_process_group

    owns_group = not dist.is_initialized()
    if owns_group:
        init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        initialize_parallel(1, 1)
        yield
    finally:
        if owns_group:
            destroy_parallel()


def checkpoint_model_config(common: dict, source: str) -> ModelConfig:
    """The ModelConfig a checkpoint was saved with (Megatron-LM's: from its args), for CPU (local layers, no FP8)."""
    try:
        cfg = megatron_lm.checkpoint_model_config(common, source) if megatron_lm.is_megatron_lm(common) \
            else ModelConfig(**common["model_config"])
    except (KeyError, TypeError) as exc:
        raise ConversionError(f"--load {source}: no usable model_config in the checkpoint ({exc})") from exc
    return replace(cfg, transformer_impl="local", fp8_format=None, fp8_param_gather=False)


def load_full_model(load: str, iteration: Optional[int] = None):
    """(TP1/PP1 GPTModel holding the checkpoint's weights, its ModelConfig); needs TP1/PP1 parallel state."""
    from disco_megatron.models import build_gpt_model

    ckpt, common = storage.read_common_state(load, iteration)
    cfg = checkpoint_model_config(common, load)
    model = build_gpt_model(cfg)
    if megatron_lm.is_megatron_lm(common):
        megatron_lm.load(ckpt, model)
        return model, cfg
    storage.load_checkpoint(load, model, None, None, asdict(cfg), _TP1, load_optim=False, load_rng=False,
                                  iteration=iteration)
    return model, cfg


def resize_vocab_rows(full: dict[str, Tensor], vocab_size: int, rows: int) -> dict[str, Tensor]:
    """Embedding/output rows cut to the real vocab, then zero-padded to ``rows`` (megatron's padding)."""
    resized = dict(full)
    for name in _VOCAB_ROWS:
        if name in full:
            real = full[name][:vocab_size]
            pad = real.new_zeros((rows - vocab_size,) + tuple(real.shape[1:]))
            resized[name] = torch.cat([real, pad]).contiguous()
    return resized


def read_full_state(load: str, iteration: Optional[int] = None) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(ModelConfig, full TP1/PP1 state with unpadded vocab rows) of a checkpoint at any TP/PP layout."""
    with single_process_parallel():
        model, cfg = load_full_model(load, iteration)
        full = {name: p.detach().clone() for name, p in model.named_parameters()}
    return cfg, resize_vocab_rows(full, cfg.vocab_size, cfg.vocab_size)


def write_full_checkpoint(save: str, full: dict[str, Tensor], cfg: ModelConfig, source: str,
                          for_megatron_lm: bool = False) -> str:
    """Write a full state as a TP1/PP1 checkpoint at iteration 0 (no optimizer state), disco_megatron's
    or (``for_megatron_lm``) Megatron-LM's torch_dist with args."""
    from disco_megatron.models import build_gpt_model
    from disco_megatron.models.weights import load_full_weights

    with single_process_parallel():
        model = build_gpt_model(cfg)
        expected = dict(model.named_parameters())
        padded = resize_vocab_rows(full, cfg.vocab_size, cfg.padded_vocab_size(1))
        missing, extra = sorted(set(expected) - set(padded)), sorted(set(padded) - set(expected))
        if missing or extra:
            raise ConversionError(f"{source}: tensors do not fit the model of its config "
                                  f"(missing {missing[:4]}, unexpected {extra[:4]})")
        try:
            load_full_weights(model, padded, cfg)
        except ValueError as exc:
            raise ConversionError(f"{source}: {exc}") from exc
        if for_megatron_lm:
            return megatron_lm.save(save, 0, megatron_lm.args_for(cfg), model)
        return storage.save_checkpoint(save, model, None, None, storage.TrainState(), asdict(cfg), _TP1)


def data_flags(tokenizer: Optional[str]) -> list[str]:
    """Data flags to continue training with the converted model's tokenizer (DATA_PREFIX: your data)."""
    return ["--data-path", "DATA_PREFIX", "--tokenizer-model", tokenizer] if tokenizer else []


def model_flags(cfg: ModelConfig) -> list[str]:
    """The disco-pretrain flags that rebuild exactly this model shape."""
    flags = ["--num-layers", cfg.num_layers, "--hidden-size", cfg.hidden_size,
             "--num-attention-heads", cfg.num_attention_heads, "--num-query-groups", cfg.query_groups,
             "--ffn-hidden-size", cfg.ffn_size,
             "--max-position-embeddings", cfg.max_position_embeddings or cfg.seq_length,
             "--vocab-size", cfg.vocab_size, "--make-vocab-size-divisible-by", cfg.make_vocab_size_divisible_by,
             "--normalization", cfg.normalization, "--norm-epsilon", cfg.norm_epsilon,
             "--position-embedding-type", cfg.position_embedding_type, "--rotary-base", cfg.rotary_base,
             "--swiglu" if cfg.swiglu else "--no-swiglu",
             "--untie-embeddings-and-output-weights" if cfg.untie_embeddings_and_output_weights
             else "--tie-embeddings-and-output-weights",
             "--add-bias-linear" if cfg.add_bias_linear else "--disable-bias-linear"]
    return [str(f) for f in flags]


# ---- tokenizer ----------------------------------------------------------------------------------

def _sentencepiece(path: str):
    import sentencepiece

    if not os.path.isfile(path):
        raise ConversionError(f"--tokenizer-model {path}: no such file")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=path)
    except Exception as exc:
        raise ConversionError(f"--tokenizer-model {path}: not a sentencepiece model ({exc})") from exc


def check_tokenizer_vocab(path: str, vocab_size: int, against: str) -> None:
    """Refuse a tokenizer whose vocab differs from the model's."""
    pieces = _sentencepiece(path).get_piece_size()
    if pieces != vocab_size:
        raise ConversionError(f"--tokenizer-model {path} has {pieces} pieces but {against} has vocab_size "
                              f"{vocab_size}; pass the tokenizer the model was trained with")


def _write_tokenizer(path: str, out: str, max_length: int) -> dict[str, int]:
    """tokenizer.model + tokenizer_config.json for LlamaTokenizer; returns the special token ids."""
    sp = _sentencepiece(path)
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    pieces = {kind: sp.id_to_piece(i) for kind, i in {**ids, "unk": sp.unk_id()}.items() if i >= 0}
    shutil.copyfile(path, os.path.join(out, "tokenizer.model"))
    _write_json(os.path.join(out, "tokenizer_config.json"), hf_llama.tokenizer_config(pieces, max_length))
    _write_json(os.path.join(out, "special_tokens_map.json"), {f"{k}_token": v for k, v in pieces.items()})
    return ids


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# ---- operations ---------------------------------------------------------------------------------

def run_tokenizer(load: str) -> Optional[str]:
    """The sentencepiece model the run that wrote ``load`` trained with: the ``tokenizer_model`` of its
    run_config.json (its --tokenizer-model, or the embedded corpus's model the trainer recorded);
    None when there is no run config (checkpoints of from-hf, legacy or Megatron-LM)."""
    path = next((c for c in run_config_candidates(load) if os.path.isfile(c)), None)
    if path is None:
        return None
    tokenizer = read_run_config(path).tokenizer_model
    if tokenizer is None or not os.path.isfile(tokenizer):
        raise ConversionError(f"{path} names tokenizer {tokenizer}, which does not exist (a cleared "
                              "--data-cache-path?); pass --tokenizer-model with the run's sentencepiece model")
    return tokenizer


def to_hf(load: str, out: str, iteration: Optional[int] = None, tokenizer_model: Optional[str] = None,
          force: bool = False) -> tuple[list[str], Optional[str]]:
    """A checkpoint at any TP/PP layout -> HF Llama directory with the tokenizer of ``tokenizer_model``,
    else of the run's config; returns the files written and the tokenizer used (None: weights only)."""
    check_output(out, force, load)
    ckpt, common = storage.read_common_state(load, iteration)
    cfg = checkpoint_model_config(common, load)
    hf_llama.require_llama_shape(cfg, f"--load {ckpt}")
    tokenizer_model = tokenizer_model or run_tokenizer(load)
    if tokenizer_model is not None:
        check_tokenizer_vocab(tokenizer_model, cfg.vocab_size, f"checkpoint {ckpt}")
    cfg, full = read_full_state(load, iteration)
    hf = hf_llama.megatron_to_hf(full, cfg)
    from safetensors.torch import save_file

    with staged_output(out) as tmp:
        ids = _write_tokenizer(tokenizer_model, tmp, cfg.max_position_embeddings or cfg.seq_length) \
            if tokenizer_model else {}
        dtype = hf["model.embed_tokens.weight"].dtype
        _write_json(os.path.join(tmp, "config.json"), hf_llama.hf_config(cfg, dtype, ids))
        save_file(hf, os.path.join(tmp, HF_WEIGHTS), metadata={"format": "pt"})
        os.chmod(os.path.join(tmp, HF_WEIGHTS), 0o644)  # safetensors writes it private
        written = sorted(os.listdir(tmp))
    return written, tokenizer_model


def read_hf_weights(hf_dir: str) -> dict[str, Tensor]:
    """All tensors of an HF directory (one safetensors file or a sharded index)."""
    from safetensors.torch import load_file

    single, index = os.path.join(hf_dir, HF_WEIGHTS), os.path.join(hf_dir, HF_INDEX)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        weight_map = json.load(open(index)).get("weight_map", {})
        files = [os.path.join(hf_dir, f) for f in sorted(set(weight_map.values()))]
    else:
        raise ConversionError(f"--hf {hf_dir}: no {HF_WEIGHTS} or {HF_INDEX} (convert .bin weights to "
                              "safetensors first)")
    tensors: dict[str, Tensor] = {}
    for path in files:
        tensors.update({k: v for k, v in load_file(path).items() if not k.endswith("rotary_emb.inv_freq")})
    return tensors


def from_hf(hf_dir: str, out: str, tokenizer_model: Optional[str] = None, force: bool = False,
            output_format: str = "disco") -> list[str]:
    """HF Llama directory -> TP1/PP1 checkpoint at iteration 0 (fp32, no optimizer); returns the model flags.

    ``output_format`` "megatron-lm": Megatron-LM's torch_dist with args, and its pretrain_gpt.py flags.
    """
    check_output(out, force, hf_dir)
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"--hf {hf_dir}: no config.json (not a HuggingFace model directory)")
    cfg = hf_llama.model_config_from_hf(json.load(open(config_path)), config_path)
    tokenizer = tokenizer_model
    if tokenizer is None and os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        tokenizer = os.path.join(hf_dir, "tokenizer.model")
    if tokenizer is not None:
        check_tokenizer_vocab(tokenizer, cfg.vocab_size, config_path)
    weights = read_hf_weights(hf_dir)
    full = hf_llama.hf_to_megatron(weights, cfg, os.path.join(hf_dir, HF_WEIGHTS))
    full = {name: t.float() for name, t in full.items()}
    with staged_output(out) as tmp:
        write_full_checkpoint(tmp, full, cfg, hf_dir, for_megatron_lm=output_format == "megatron-lm")
    if output_format == "megatron-lm":
        return megatron_lm.pretrain_flags(cfg)
    return model_flags(cfg) + data_flags(tokenizer)


def convert_legacy(load: str, out: str, iteration: Optional[int] = None, tokenizer_model: Optional[str] = None,
                   force: bool = False) -> tuple[int, list[str]]:
    """Megatron-LM legacy torch checkpoint -> TP1/PP1 checkpoint at iteration 0 (weights only).

    Returns the legacy iteration and the model flags.
    """
    check_output(out, force, load)
    vocab = _sentencepiece(tokenizer_model).get_piece_size() if tokenizer_model else None
    legacy = read_legacy_checkpoint(load, iteration, vocab)
    cfg = legacy.model_config
    embedding = legacy.full_state.get("embedding.word_embeddings.weight")
    if embedding is not None and embedding.shape[0] < cfg.vocab_size:
        rows = embedding.shape[0]
        raise ConversionError(f"--load {load}: the embedding has {rows} rows but the vocab has {cfg.vocab_size} "
                              "pieces; pass the --tokenizer-model the run used")
    with staged_output(out) as tmp:
        write_full_checkpoint(tmp, legacy.full_state, cfg, load)
    return legacy.iteration, model_flags(cfg) + data_flags(tokenizer_model)


def run_config_candidates(load: str) -> list[str]:
    """Where a checkpoint directory's run_config.json may be: in it, or in its parent (the run dir)."""
    return [RunDir(load).run_config, RunDir(os.path.dirname(os.path.abspath(load))).run_config]


def find_run_config(load: str, run_config: Optional[str]) -> str:
    """``--run-config``, else run_config.json in the checkpoint directory or its parent (the run dir)."""
    candidates = [run_config] if run_config else run_config_candidates(load)
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise ConversionError(f"--run-config {candidates[0]}: no such file; pass --run-config "
                          f"RUN_DIR/{RunDir.run_config.name} (written by disco-pretrain) so the optimizer is "
                          "rebuilt as it was trained")


def read_run_config(path: str) -> RunConfig:
    """A RunConfig from disco-pretrain's run_config.json."""
    try:
        with open(path) as f:
            return RunConfig.from_dict(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"--run-config {path}: not a disco-pretrain {RunDir.run_config.name} ({exc})") from exc


def _reshard_worker(rank: int, world: int, cfg: RunConfig, model_config: dict, load: str,
                    iteration: Optional[int], save: str) -> None:
    """One rank of the target layout: build model + optimizer as training does, load, save."""
    from disco_megatron.builders import build_trainable
    from disco_megatron.runtime import initialize_parallel, quiet_known_warnings

    quiet_known_warnings()
    info = initialize_parallel(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.seed)
    run = build_trainable(cfg)
    state = storage.load_checkpoint(load, run.model, run.optimizer, run.scheduler, model_config, info.layout,
                                    load_optim=True, load_rng=False, iteration=iteration)
    storage.save_checkpoint(save, run.model, run.optimizer, run.scheduler, state, model_config, info.layout)


def reshard(load: str, out: str, target_tp: int, target_pp: int, iteration: Optional[int] = None,
            run_config: Optional[str] = None, force: bool = False) -> str:
    """A checkpoint at TP a / PP b -> TP c / PP d with optimizer, scheduler and data position; returns its dir."""
    import torch.multiprocessing as mp

    from disco_megatron.runtime.spawn import run_workers

    check_output(out, force, load)
    ckpt, common = storage.read_common_state(load, iteration)
    if megatron_lm.is_megatron_lm(common):
        with staged_output(out) as tmp:
            megatron_lm.reshard(ckpt, common, tmp, target_tp, target_pp)
        return storage.checkpoint_dir(out, int(common.get("iteration", 0)))
    if "optimizer_type" not in common:
        raise ConversionError(f"--load {ckpt}: holds no optimizer state; reshard needs a training checkpoint "
                              "(a weights-only checkpoint loads at any layout as it is)")
    config_path = find_run_config(load, run_config)
    cfg = read_run_config(config_path)
    if (cfg.optimizer == "scion") != (common["optimizer_type"] == "ScionOptimizer"):
        raise ConversionError(f"--run-config {config_path} says --optimizer {cfg.optimizer} but {ckpt} holds "
                              f"{common['optimizer_type']} state; pass the run_config.json of the run that saved it")
    cfg = cfg.at_layout(target_tp, target_pp)
    cfg.model = checkpoint_model_config(common, load)
    cfg.load = cfg.save = cfg.run_dir = None
    try:
        cfg.model.validate(target_tp, target_pp)
    except ConfigError as exc:
        raise ConversionError(f"--target-tp {target_tp} --target-pp {target_pp}: {exc}") from exc
    world = target_tp * target_pp
    with staged_output(out) as tmp:
        try:
            run_workers(_reshard_worker, world, cfg, common["model_config"], load, iteration, tmp)
        except mp.ProcessRaisedException as exc:
            last = re.sub(r"^[\w.]+(Error|Exception): ", "", str(exc).strip().splitlines()[-1])
            raise ConversionError(f"reshard to TP {target_tp} x PP {target_pp} failed: {last}") from exc
        _write_json(RunDir(tmp).run_config, {**cfg.to_dict(), "model": common["model_config"]})
        final = storage.checkpoint_dir(out, storage.read_latest_iteration(tmp))
    return final


def inspect_checkpoint(load: str, iteration: Optional[int] = None) -> str:
    """A readable summary: model shape, layout, progress, optimizer and every tensor's global shape/dtype."""
    from megatron.core import dist_checkpointing

    ckpt, common = storage.read_common_state(load, iteration)
    cfg = checkpoint_model_config(common, load)
    train, parallel, optimizer = megatron_lm.summary(common) if megatron_lm.is_megatron_lm(common) else \
        (common.get("train_state", {}), common.get("parallel", {}), common.get("optimizer_type", "none (weights only)"))
    metadata = dist_checkpointing.load_tensors_metadata(ckpt)
    lines = [
        f"checkpoint: {ckpt}",
        f"iteration: {train.get('iteration')}  consumed samples: {train.get('consumed_samples')}  "
        f"skipped steps: {train.get('skipped_steps')}",
        f"parallel layout: TP {parallel.get('tp')} x PP {parallel.get('pp')} x DP {parallel.get('dp')}",
        f"optimizer: {optimizer}",
        f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}, "
        f"query groups {cfg.query_groups}, ffn {cfg.ffn_size}, vocab {cfg.vocab_size}, {cfg.normalization}, "
        f"{'SwiGLU' if cfg.swiglu else 'GeLU'}, {cfg.position_embedding_type} (base {cfg.rotary_base}), "
        f"{'untied' if cfg.untie_embeddings_and_output_weights else 'tied'} output",
        "model flags: " + " ".join(model_flags(cfg)),
        f"tensors ({len(metadata)}):",
    ]
    for name in sorted(metadata):
        tensor = metadata[name]
        lines.append(f"  {name}  {tuple(tensor.global_shape)}  {str(tensor.dtype).replace('torch.', '')}")
    return "\n".join(lines)
