"""Megatron GPT full state <-> HuggingFace Llama state dict and config.json (pure mapping, no I/O).

"Full state" here means the TP1/PP1 parameter names of megatron-core's local-spec GPTModel
(``decoder.layers.N.self_attention.linear_qkv.weight`` ...) with the vocab rows unpadded
(exactly ``vocab_size`` rows), so it matches HuggingFace row for row. Conventions mapped:

- fused ``linear_qkv`` rows are ordered per query group ``[q heads of the group | k | v]``;
  HF keeps ``q_proj`` (heads in order), ``k_proj`` and ``v_proj`` separate;
- SwiGLU ``linear_fc1`` is ``[gate | up]`` -> ``gate_proj`` / ``up_proj``;
- megatron-core's default RoPE (non-interleaved, rotate-half over the whole head) is the
  convention of HF Llama, so q/k rows need no permutation.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from disco_megatron.checkpoint import ConversionError
from disco_megatron.config import ModelConfig

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
    h, heads, groups = cfg.hidden_size, cfg.num_attention_heads, cfg.query_groups
    head_dim = h // heads
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attention.linear_qkv.weight"] = ((heads + 2 * groups) * head_dim, h)
        shapes[p + "self_attention.linear_proj.weight"] = (h, heads * head_dim)
        shapes[p + "pre_mlp_layernorm.weight"] = (h,)
        shapes[p + "mlp.linear_fc1.weight"] = (2 * cfg.ffn_size, h)
        shapes[p + "mlp.linear_fc2.weight"] = (h, cfg.ffn_size)
    shapes["decoder.final_layernorm.weight"] = (h,)
    if cfg.untie_embeddings_and_output_weights:
        shapes["output_layer.weight"] = (cfg.vocab_size, h)
    return shapes


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Expected HF Llama tensor shapes for the same model."""
    h, heads, groups = cfg.hidden_size, cfg.num_attention_heads, cfg.query_groups
    head_dim = h // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (heads * head_dim, h)
        shapes[p + "self_attn.k_proj.weight"] = (groups * head_dim, h)
        shapes[p + "self_attn.v_proj.weight"] = (groups * head_dim, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, heads * head_dim)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (cfg.ffn_size, h)
        shapes[p + "mlp.up_proj.weight"] = (cfg.ffn_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, cfg.ffn_size)
    shapes["model.norm.weight"] = (h,)
    if cfg.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


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


def split_qkv(qkv: Tensor, heads: int, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Fused per-group ``[q heads | k | v]`` rows -> (q, k, v) row blocks."""
    per_group = heads // groups
    head_dim = qkv.shape[0] // (heads + 2 * groups)
    grouped = qkv.reshape(groups, per_group + 2, head_dim, -1)
    q = grouped[:, :per_group].reshape(heads * head_dim, -1)
    k = grouped[:, per_group].reshape(groups * head_dim, -1)
    v = grouped[:, per_group + 1].reshape(groups * head_dim, -1)
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int, groups: int) -> Tensor:
    """Inverse of :func:`split_qkv`."""
    per_group = heads // groups
    head_dim = q.shape[0] // heads
    columns = q.shape[1]
    grouped = torch.cat([q.reshape(groups, per_group, head_dim, columns),
                         k.reshape(groups, 1, head_dim, columns),
                         v.reshape(groups, 1, head_dim, columns)], dim=1)
    return grouped.reshape(-1, columns).contiguous()


_LAYER_PAIRS = (  # (megatron suffix, HF suffix) of tensors that map one to one inside a layer
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
)


def megatron_to_hf(full: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF Llama state dict of a full megatron state (checked against ``cfg`` first)."""
    check_shapes(full, megatron_shapes(cfg), "megatron state", "the checkpoint's model_config")
    heads, groups = cfg.num_attention_heads, cfg.query_groups
    hf = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"],
          "model.norm.weight": full["decoder.final_layernorm.weight"]}
    if cfg.untie_embeddings_and_output_weights:
        hf["lm_head.weight"] = full["output_layer.weight"]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for m_name, h_name in _LAYER_PAIRS:
            hf[h + h_name] = full[m + m_name]
        q, k, v = split_qkv(full[m + "self_attention.linear_qkv.weight"], heads, groups)
        hf[h + "self_attn.q_proj.weight"] = q
        hf[h + "self_attn.k_proj.weight"] = k
        hf[h + "self_attn.v_proj.weight"] = v
        gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"] = gate, up
    return {name: t.contiguous() for name, t in hf.items()}


def hf_to_megatron(hf: Mapping[str, Tensor], cfg: ModelConfig, source: str) -> dict[str, Tensor]:
    """Full megatron state of an HF Llama state dict (checked against ``cfg`` first).

    A tied model's ``lm_head.weight`` (some exporters write it) is dropped: it is the embedding.
    """
    if not cfg.untie_embeddings_and_output_weights:
        hf = {k: v for k, v in hf.items() if k != "lm_head.weight"}
    check_shapes(hf, hf_shapes(cfg), source, "config.json")
    heads, groups = cfg.num_attention_heads, cfg.query_groups
    full = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
            "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if cfg.untie_embeddings_and_output_weights:
        full["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for m_name, h_name in _LAYER_PAIRS:
            full[m + m_name] = hf[h + h_name]
        full[m + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf[h + "self_attn.q_proj.weight"], hf[h + "self_attn.k_proj.weight"],
            hf[h + "self_attn.v_proj.weight"], heads, groups)
        full[m + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]])
    return {name: t.contiguous() for name, t in full.items()}


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
