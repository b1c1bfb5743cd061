"""Megatron GPT full state <-> HuggingFace Llama state dict and config.json (pure mapping, no I/O).

"Full state" here means the TP1/PP1 parameter names of megatron-core's local-spec GPTModel
(``decoder.layers.N.self_attention.linear_qkv.weight`` ...) with the vocab rows unpadded
(exactly ``vocab_size`` rows), so it matches HuggingFace row for row. The names, the HF name
of each piece and the fused QKV row layout come from :mod:`disco_megatron.models.naming`:
fused ``linear_qkv`` splits into ``q_proj``/``k_proj``/``v_proj``, gated ``linear_fc1`` into
``gate_proj``/``up_proj``, every other tensor maps one to one.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from disco_megatron.checkpoint import ConversionError
from disco_megatron.config import ModelConfig
from disco_megatron.models.naming import fuse_qkv, hf_names, llama_param_names, param_rule, split_qkv

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require_llama_shape(cfg: ModelConfig, source: str) -> None:
    """Refuse model shapes HF Llama cannot express (LayerNorm, GeLU, biases, learned positions)."""
    wrong = [
        (cfg.normalization != "RMSNorm", f"--normalization {cfg.normalization} (Llama uses RMSNorm)"),
        (not cfg.swiglu, "--no-swiglu (Llama uses a SwiGLU MLP)"),
        (cfg.position_embedding_type != "rope",
         f"--position-embedding-type {cfg.position_embedding_type} (Llama uses rope)"),
        (cfg.add_bias_linear, "--add-bias-linear (Llama has no linear biases)"),
    ]
    reasons = [text for bad, text in wrong if bad]
    if reasons:
        raise ConversionError(f"{source}: not a Llama-shaped model: {'; '.join(reasons)}")


def megatron_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected full-state parameter shapes (unpadded vocab) of a Llama-shaped GPT."""
    h, heads, groups, ffn = cfg.hidden_size, cfg.num_attention_heads, cfg.query_groups, cfg.ffn_size
    head_dim = h // heads
    by_role = {"embedding": (cfg.vocab_size, h), "output": (cfg.vocab_size, h), "gain": (h,),
               "qkv": ((heads + 2 * groups) * head_dim, h), "proj": (h, heads * head_dim),
               "fc1": (2 * ffn, h), "fc2": (h, ffn)}
    return {name: by_role[param_rule(name).role]
            for name in llama_param_names(cfg.num_layers, cfg.untie_embeddings_and_output_weights)}


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected HF Llama tensor shapes for the same model (its megatron shapes, mapped)."""
    meta = {name: torch.empty(shape, device="meta") for name, shape in megatron_shapes(cfg).items()}
    return {name: tuple(t.shape) for name, t in _to_hf(meta, cfg).items()}


def check_shapes(state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], source: str,
                 described_by: str) -> None:
    """Every expected tensor present with its shape and nothing else; the error names the source file."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = [f"{what} {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                 for what, names in (("missing", missing), ("unexpected", extra)) if names]
        raise ConversionError(f"{source}: tensors do not match the model of {described_by}: {'; '.join(parts)}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ConversionError(
                f"{source}: {name} has shape {tuple(state[name].shape)} but {described_by} implies {tuple(shape)} "
                "(hidden size, heads, query groups, FFN size or vocab differ); fix the config or the weights"
            )


def _pieces(name: str, tensor: Tensor, cfg: ModelConfig) -> tuple[Tensor, ...]:
    """The tensors of ``hf_names(name)``, in order: QKV split per query group, gated fc1 halved."""
    rule = param_rule(name)
    if rule.role == "qkv":
        return split_qkv(tensor, cfg.num_attention_heads, cfg.query_groups)
    return tensor.chunk(2, dim=0) if rule.glu else (tensor,)


def _fused(name: str, pieces: list[Tensor], cfg: ModelConfig) -> Tensor:
    """Inverse of :func:`_pieces`."""
    if param_rule(name).role == "qkv":
        return fuse_qkv(*pieces, cfg.num_attention_heads, cfg.query_groups)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _to_hf(full: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    return {hf_name: piece for name in megatron_shapes(cfg)
            for hf_name, piece in zip(hf_names(name), _pieces(name, full[name], cfg))}


def megatron_to_hf(full: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF Llama state dict of a full megatron state (checked against ``cfg`` first)."""
    check_shapes(full, megatron_shapes(cfg), "megatron state", "the checkpoint's model_config")
    return {name: t.contiguous() for name, t in _to_hf(full, cfg).items()}


def hf_to_megatron(hf: Mapping[str, Tensor], cfg: ModelConfig, source: str) -> dict[str, Tensor]:
    """Full megatron state of an HF Llama state dict (checked against ``cfg`` first).

    A tied model's ``lm_head.weight`` (some exporters write it) is dropped: it is the embedding.
    """
    if not cfg.untie_embeddings_and_output_weights:
        hf = {k: v for k, v in hf.items() if k != "lm_head.weight"}
    check_shapes(hf, hf_shapes(cfg), source, "config.json")
    return {name: _fused(name, [hf[n] for n in hf_names(name)], cfg).contiguous() for name in megatron_shapes(cfg)}


def dtype_name(dtype: torch.dtype) -> str:
    """HF's ``torch_dtype`` string of a torch dtype."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ConversionError(f"tensor dtype {dtype} has no HF torch_dtype name (expected one of {list(_DTYPES)})")


def hf_config(cfg: ModelConfig, dtype: torch.dtype, special_ids: Mapping[str, int]) -> dict:
    """``config.json`` of ``LlamaForCausalLM`` for this model (rope given both the v4 and v5 way)."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.query_groups,
        "num_hidden_layers": cfg.num_layers,
        "head_dim": cfg.hidden_size // cfg.num_attention_heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": float(cfg.rotary_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
        "max_position_embeddings": cfg.max_position_embeddings or cfg.seq_length,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_method_std,
        "torch_dtype": dtype_name(dtype),
    }
    config.update({f"{kind}_token_id": value for kind, value in special_ids.items() if value >= 0})
    return config


def _rope_theta(config: Mapping, source: str) -> int:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling")
    rope_type = params.get("rope_type", "default")
    if scaling or rope_type != "default":
        raise ConversionError(f"{source}: RoPE scaling {scaling or rope_type!r} is not supported "
                              "(only plain Llama RoPE maps onto megatron's --rotary-base)")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise ConversionError(f"{source}: rope_theta {theta} is not an integer; --rotary-base takes integers")
    return int(theta)


def model_config_from_hf(config: Mapping, source: str) -> ModelConfig:
    """The megatron ModelConfig of an HF Llama ``config.json`` (refusing what megatron's GPT cannot hold)."""
    if config.get("model_type") != "llama":
        raise ConversionError(f"{source}: model_type {config.get('model_type')!r}; only HF Llama (\"llama\") converts")
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        cfg = ModelConfig(
            num_layers=int(config["num_hidden_layers"]), hidden_size=hidden, num_attention_heads=heads,
            num_query_groups=int(config.get("num_key_value_heads") or heads),
            ffn_hidden_size=int(config["intermediate_size"]),
            seq_length=int(config["max_position_embeddings"]),
            max_position_embeddings=int(config["max_position_embeddings"]),
            vocab_size=int(config["vocab_size"]), norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
            rotary_base=_rope_theta(config, source),
            untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
            init_method_std=float(config.get("initializer_range", 0.02)),
        )
    except KeyError as exc:
        raise ConversionError(f"{source}: missing field {exc.args[0]!r}") from exc
    head_dim = config.get("head_dim")
    unsupported = [
        (config.get("hidden_act", "silu") != "silu",
         f"hidden_act {config.get('hidden_act')!r} (megatron SwiGLU is silu)"),
        (bool(config.get("attention_bias")), "attention_bias true"),
        (bool(config.get("mlp_bias")), "mlp_bias true"),
        (head_dim is not None and head_dim * heads != hidden,
         f"head_dim {head_dim} x num_attention_heads {heads} != hidden_size {hidden}"),
        (heads % cfg.query_groups != 0, f"num_attention_heads {heads} not divisible by num_key_value_heads "
                                        f"{cfg.query_groups}"),
    ]
    reasons = [text for bad, text in unsupported if bad]
    if reasons:
        raise ConversionError(f"{source}: unsupported Llama variant: {'; '.join(reasons)}")
    return cfg


def tokenizer_config(pieces: Mapping[str, str], max_length: int) -> dict:
    """``tokenizer_config.json`` making ``LlamaTokenizer`` reproduce the sentencepiece ids exactly.

    ``pieces`` maps bos/eos/unk/pad to their piece strings (absent when the model has none).
    No BOS/EOS are added and no prefix space is inserted, like the sentencepiece model itself.
    """
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
              "legacy": False, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
              "model_max_length": max_length}
    config.update({f"{kind}_token": piece for kind, piece in pieces.items()})
    return config
