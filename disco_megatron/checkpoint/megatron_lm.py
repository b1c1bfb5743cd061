"""Megatron-LM's own checkpoints: the run's ``args`` -> ModelConfig, and its ``torch_dist`` layout.

A Megatron-LM ``--ckpt-format torch_dist`` iteration (its default) is a dist_checkpointing
directory whose ``common.pt`` holds ``args`` (the run's argparse Namespace), ``iteration``,
``checkpoint_version``, ``opt_param_scheduler``, ``content_metadata`` and the optimizer's
non-tensor state. Its tensor keys are megatron-core's ``sharded_state_dict`` keys, the same a
disco_megatron GPTModel asks for (the local spec maps its norms onto TransformerEngine's keys),
so weights and optimizer state load through megatron-core at any TP/PP layout; only the common
state differs from a disco_megatron checkpoint. The legacy ``torch`` format has the same
``args`` and reads its model config here too (:func:`model_config_from_args`).
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import replace
from typing import Optional

import torch

from disco_megatron.checkpoint import ConversionError
from disco_megatron.checkpoint.storage import checkpoint_dir, write_latest_iteration
from disco_megatron.config import ConfigError, ModelConfig

ARGS = "args"
CHECKPOINT_VERSION = 3.0
# Megatron-LM's sharded_state_dict content metadata for a non-distributed optimizer (its
# _build_sharded_state_dict_metadata); it changes how models and optimizers name their shards.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
# (args attribute, the value disco_megatron's GPT supports, the feature as a Megatron-LM flag).
_UNSUPPORTED_ARGS = (
    ("num_experts", None, "--num-experts (mixture of experts)"),
    ("multi_latent_attention", False, "--multi-latent-attention (MLA)"),
    ("mtp_num_layers", None, "--mtp-num-layers (multi-token prediction)"),
    ("heterogeneous_layers_config_path", None, "--heterogeneous-layers-config-path"),
    ("use_legacy_models", False, "--use-legacy-models"),
    ("qk_layernorm", False, "--qk-layernorm"),
    ("qk_l2_norm", False, "--qk-l2-norm"),
    ("layernorm_zero_centered_gamma", False, "--apply-layernorm-1p (zero-centered norm gamma)"),
    ("apply_residual_connection_post_layernorm", False, "--apply-residual-connection-post-layernorm"),
    ("window_size", None, "--window-size (sliding-window attention)"),
    ("squared_relu", False, "--squared-relu"),
    ("rotary_interleaved", False, "--rotary-interleaved"),
    ("rotary_percent", 1.0, "--rotary-percent != 1"),
    ("rotary_seq_len_interpolation_factor", None, "--rotary-seq-len-interpolation-factor"),
    ("use_rope_scaling", False, "--use-rope-scaling"),
    ("no_rope_freq", None, "--no-rope-freq"),
    ("mrope_section", None, "--mrope-section"),
)
_POSITIONS = ("rope", "learned_absolute")


def is_megatron_lm(common: dict) -> bool:
    """Whether a dist_checkpointing common state was written by Megatron-LM (it holds the run's args)."""
    return ARGS in common and "model_config" not in common


def _arg(args: object, name: str, source: str, *fallbacks: str):
    for attr in (name, *fallbacks):
        if getattr(args, attr, None) is not None:
            return getattr(args, attr)
    raise ConversionError(f"{source}: args has no {name!r}; the checkpoint is too old or not a GPT run")


def real_vocab_size(args: object, source: str) -> int:
    """The tokenizer's vocab as the run had it (padding rows excluded where the args tell).

    NullTokenizer adds its EOD token after ``--vocab-size`` ids; tokenizers read from files leave
    ``vocab_size`` unset, and then every padded row is kept.
    """
    vocab = getattr(args, "vocab_size", None)
    if vocab is not None:
        return int(vocab) + (1 if getattr(args, "tokenizer_type", None) == "NullTokenizer" else 0)
    return int(_arg(args, "padded_vocab_size", source))


def model_config_from_args(args: object, source: str, vocab_size: Optional[int] = None) -> ModelConfig:
    """ModelConfig of a Megatron-LM run's args, refusing any feature disco_megatron's GPT lacks.

    ``vocab_size`` (the tokenizer's, when the caller knows it) overrides the vocab the args imply.
    """
    unsupported = [f"{text} ({attr}={getattr(args, attr)!r})" for attr, supported, text in _UNSUPPORTED_ARGS
                   if getattr(args, attr, supported) not in (supported, None)]
    position = getattr(args, "position_embedding_type", "learned_absolute")
    if position not in _POSITIONS:
        unsupported.append(f"--position-embedding-type {position}")
    if getattr(args, "add_qkv_bias", False) and not getattr(args, "add_bias_linear", True):
        unsupported.append("--add-qkv-bias without --add-bias-linear")
    hidden, heads = int(_arg(args, "hidden_size", source)), int(_arg(args, "num_attention_heads", source))
    kv_channels = getattr(args, "kv_channels", None)
    if kv_channels is not None and kv_channels * heads != hidden:
        unsupported.append(f"--kv-channels {kv_channels} != hidden size / heads")
    if unsupported:
        raise ConversionError(f"{source}: the run used {'; '.join(unsupported)}, which disco_megatron's GPT does "
                              "not support")
    groups = _arg(args, "num_query_groups", source) if getattr(args, "group_query_attention", False) else None
    seq = int(_arg(args, "seq_length", source))
    return ModelConfig(
        num_layers=int(_arg(args, "num_layers", source)), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=groups, ffn_hidden_size=_arg(args, "ffn_hidden_size", source),
        seq_length=seq, max_position_embeddings=getattr(args, "max_position_embeddings", None) or seq,
        vocab_size=vocab_size or real_vocab_size(args, source),
        make_vocab_size_divisible_by=int(getattr(args, "make_vocab_size_divisible_by", 128)),
        normalization=getattr(args, "normalization", "LayerNorm"),
        norm_epsilon=float(_arg(args, "norm_epsilon", source, "layernorm_epsilon")),
        swiglu=bool(getattr(args, "swiglu", False)), position_embedding_type=position,
        rotary_base=int(getattr(args, "rotary_base", 10000)),
        untie_embeddings_and_output_weights=bool(getattr(args, "untie_embeddings_and_output_weights", False)),
        add_bias_linear=bool(getattr(args, "add_bias_linear", True)),
        init_method_std=float(getattr(args, "init_method_std", 0.02)),
        bf16=bool(getattr(args, "bf16", False)),
    )


def saved_layout(args: object) -> tuple[int, int]:
    """(TP, PP) the checkpoint was saved at."""
    return int(getattr(args, "tensor_model_parallel_size", 1)), int(getattr(args, "pipeline_model_parallel_size", 1))


def checkpoint_model_config(common: dict, source: str) -> ModelConfig:
    """ModelConfig whose TP1 model has the checkpoint's vocab rows (its padding was made at the saved TP)."""
    args = common[ARGS]
    cfg = model_config_from_args(args, source)
    tp, _ = saved_layout(args)
    return replace(cfg, make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by * tp)


def optimizer_kind(common: dict) -> Optional[str]:
    """"scion" (the plug-in's momentum), "adam"-like (megatron-core's state) or None (weights only)."""
    from disco_megatron.optim.megatron import DIST_FORMAT

    state = common.get("optimizer")
    if state is None:
        return None
    return "scion" if isinstance(state, dict) and state.get("format") == DIST_FORMAT else "megatron-core"


def summary(common: dict) -> tuple[dict, dict, str]:
    """(progress, parallel layout, optimizer) of a Megatron-LM checkpoint for ``inspect``."""
    args = common[ARGS]
    tp, pp = saved_layout(args)
    train = {"iteration": common.get("iteration"), "consumed_samples": getattr(args, "consumed_train_samples", None),
             "skipped_steps": getattr(args, "skipped_train_samples", None)}
    kind = optimizer_kind(common)
    optimizer = {None: "none (weights only)", "scion": "ScionOptimizer (Megatron-LM plug-in, --optimizer scion)",
                 "megatron-core": f"megatron-core --optimizer {getattr(args, 'optimizer', '?')}"}[kind]
    return train, {"tp": tp, "pp": pp, "dp": getattr(args, "data_parallel_size", None)}, \
        f"{optimizer}; written by Megatron-LM (--ckpt-format torch_dist)"


# ---- loading and saving through megatron-core -----------------------------------------------------

def _sharding_metadata(content: Optional[dict]) -> dict:
    from megatron.core import parallel_state as ps

    return {**(content or CONTENT_METADATA), "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}


def _sharded_state(model, optimizer, metadata: dict, is_loading: bool) -> dict:
    """Megatron-LM's ``generate_state_dict`` tensors: ``model`` and, with an optimizer, ``optimizer``."""
    state = {"model": model.sharded_state_dict(metadata=metadata)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


def load(ckpt: str, model, optimizer=None) -> dict:
    """Load a Megatron-LM torch_dist iteration into ``model`` (and ``optimizer``) at this process's layout.

    Returns the common state. dist_checkpointing reshards every tensor, optimizer state included.
    """
    from megatron.core import dist_checkpointing

    content = dist_checkpointing.load_content_metadata(ckpt)
    sharded = _sharded_state(model, optimizer, _sharding_metadata(content), is_loading=True)
    try:
        loaded = dist_checkpointing.load(sharded, ckpt)
    except Exception as exc:
        raise ConversionError(f"--load {ckpt}: cannot load the Megatron-LM checkpoint ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[-1]})") from exc
    model.load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return loaded


def save(out: str, iteration: int, args: argparse.Namespace, model, optimizer=None,
         extra: Optional[dict] = None) -> str:
    """Write ``OUT/iter_N`` as Megatron-LM's save_checkpoint does (torch_dist), then its tracker file.

    Call on every rank; ``extra`` adds common entries (``opt_param_scheduler``, flop count).
    """
    from megatron.core import dist_checkpointing

    final = checkpoint_dir(out, iteration)
    if torch.distributed.get_rank() == 0:
        os.makedirs(final, exist_ok=True)
    torch.distributed.barrier()
    state = _sharded_state(model, optimizer, _sharding_metadata(CONTENT_METADATA), is_loading=False)
    state.update({ARGS: args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, **(extra or {})})
    dist_checkpointing.save(state, final, content_metadata=CONTENT_METADATA)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        write_latest_iteration(out, iteration)
    return final


# ---- args of a written checkpoint ---------------------------------------------------------------

def args_for(cfg: ModelConfig) -> argparse.Namespace:
    """The ``args`` a TP1/PP1 weights-only checkpoint of ``cfg`` carries (what Megatron-LM reads back)."""
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_size,
        num_attention_heads=cfg.num_attention_heads, group_query_attention=cfg.num_query_groups is not None,
        num_query_groups=cfg.num_query_groups, kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        seq_length=cfg.seq_length, max_position_embeddings=cfg.max_position_embeddings or cfg.seq_length,
        vocab_size=cfg.vocab_size, padded_vocab_size=cfg.padded_vocab_size(1), tokenizer_type=None,
        make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by, normalization=cfg.normalization,
        norm_epsilon=cfg.norm_epsilon, swiglu=cfg.swiglu, position_embedding_type=cfg.position_embedding_type,
        add_position_embedding=cfg.position_embedding_type == "learned_absolute", rotary_base=cfg.rotary_base,
        rotary_percent=1.0, untie_embeddings_and_output_weights=cfg.untie_embeddings_and_output_weights,
        add_bias_linear=cfg.add_bias_linear, add_qkv_bias=cfg.add_bias_linear, init_method_std=cfg.init_method_std,
        bf16=cfg.bf16, fp16=False, params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, data_parallel_size=1, world_size=1,
        ckpt_format="torch_dist", iteration=0, consumed_train_samples=0, skipped_train_samples=0,
        consumed_valid_samples=0, no_save_optim=True, no_save_rng=True,
    )


def pretrain_flags(cfg: ModelConfig) -> list[str]:
    """Megatron-LM ``pretrain_gpt.py`` flags that build exactly this model (tokenizer flags are the user's)."""
    flags = ["--num-layers", cfg.num_layers, "--hidden-size", cfg.hidden_size,
             "--num-attention-heads", cfg.num_attention_heads, "--ffn-hidden-size", cfg.ffn_size,
             "--seq-length", cfg.seq_length, "--max-position-embeddings", cfg.max_position_embeddings or cfg.seq_length,
             "--make-vocab-size-divisible-by", cfg.make_vocab_size_divisible_by,
             "--normalization", cfg.normalization, "--norm-epsilon", cfg.norm_epsilon,
             "--position-embedding-type", cfg.position_embedding_type, "--rotary-base", cfg.rotary_base]
    if cfg.num_query_groups is not None:
        flags += ["--group-query-attention", "--num-query-groups", cfg.num_query_groups]
    flags += [flag for on, flag in ((cfg.swiglu, "--swiglu"), (not cfg.add_bias_linear, "--disable-bias-linear"),
                                    (cfg.untie_embeddings_and_output_weights, "--untie-embeddings-and-output-weights"),
                                    (cfg.bf16, "--bf16")) if on]
    return [str(f) for f in flags]


def resharded_args(args: argparse.Namespace, tp: int, pp: int) -> argparse.Namespace:
    """The run's args at another layout; RNG state is not carried (ranks' generators do not map across TP)."""
    world = tp * pp * int(getattr(args, "data_parallel_size", 1) or 1)
    return argparse.Namespace(**{**vars(args), "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                 "world_size": world, "no_save_rng": True})


# ---- reshard ------------------------------------------------------------------------------------

def _optimizer_for(args: argparse.Namespace, ddp):
    """The optimizer Megatron-LM builds for ``args``: the plug-in's Scion, else megatron-core's."""
    if args.optimizer == "scion":
        from disco_megatron.optim.config import scion_config_from_args
        from disco_megatron.optim.megatron import get_scion_optimizer

        return get_scion_optimizer(scion_config_from_args(args), [ddp])
    from dataclasses import fields

    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(**{f.name: getattr(args, f.name) for f in fields(OptimizerConfig)
                                if hasattr(args, f.name)})
    return get_megatron_optimizer(config, [ddp])


def _reshard_worker(rank: int, world: int, common: dict, ckpt: str, save_dir: str, tp: int, pp: int) -> None:
    """One rank of the target layout: model + optimizer as Megatron-LM builds them, load, save."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from disco_megatron.models import build_gpt_model
    from disco_megatron.runtime import initialize_parallel, quiet_known_warnings

    quiet_known_warnings()
    args = common[ARGS]
    initialize_parallel(tp, pp, int(getattr(args, "seed", 1234)))
    model = build_gpt_model(model_config_from_args(args, ckpt))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=bool(getattr(args, "accumulate_allreduce_grads_in_fp32", False)),
        use_distributed_optimizer=bool(getattr(args, "use_distributed_optimizer", False))), model)
    optimizer = _optimizer_for(args, ddp) if optimizer_kind(common) else None
    load(ckpt, model, optimizer)  # the unwrapped model: its keys are the checkpoint's (DDP's add "module.")
    extra = {k: common[k] for k in ("opt_param_scheduler", "num_floating_point_operations_so_far") if k in common}
    save(save_dir, int(common.get("iteration", 0)), resharded_args(args, tp, pp), model, optimizer, extra)


def check_reshard(common: dict, source: str, tp: int, pp: int) -> None:
    """Refuse what cannot move: Scion state under another optimizer, vocab padding that changes with TP."""
    args = common[ARGS]
    kind, wanted = optimizer_kind(common), getattr(args, "optimizer", "adam")
    if kind is not None and (kind == "scion") != (wanted == "scion"):
        held = "Scion momentum" if kind == "scion" else "megatron-core optimizer state"
        raise ConversionError(f"--load {source}: its args say --optimizer {wanted} but it holds {held}; Scion and "
                              "Adam state do not convert into each other: resume with the optimizer that saved it, "
                              "or start the other one fresh with Megatron-LM's --no-load-optim")
    if getattr(args, "use_distributed_optimizer", False):
        raise ConversionError(f"--load {source}: saved with --use-distributed-optimizer; Megatron-LM reshards that "
                              "state itself when it loads at another TP/PP (save with --ckpt-fully-parallel-save)")
    cfg = model_config_from_args(args, source)
    saved_rows = int(_arg(args, "padded_vocab_size", source))
    if cfg.padded_vocab_size(tp) != saved_rows:
        raise ConversionError(f"--target-tp {tp}: Megatron-LM pads the vocab to {cfg.padded_vocab_size(tp)} rows at "
                              f"TP {tp} but {source} has {saved_rows}; reshard to a TP that keeps the padding, or "
                              "convert the weights (to-hf, then from-hf --format megatron-lm)")
    try:
        cfg.validate(tp, pp)
    except ConfigError as exc:
        raise ConversionError(f"--target-tp {tp} --target-pp {pp}: {exc}") from exc


def reshard(ckpt: str, common: dict, out: str, tp: int, pp: int) -> None:
    """Write a Megatron-LM torch_dist iteration into ``out`` at TP ``tp`` x PP ``pp``, optimizer state included."""
    import torch.multiprocessing as mp

    from disco_megatron.runtime.spawn import run_workers

    check_reshard(common, ckpt, tp, pp)
    try:
        run_workers(_reshard_worker, tp * pp, common, ckpt, out, tp, pp)
    except mp.ProcessRaisedException as exc:
        last = re.sub(r"^[\w.]+(Error|Exception): ", "", str(exc).strip().splitlines()[-1])
        raise ConversionError(f"reshard to TP {tp} x PP {pp} failed: {last}") from exc
