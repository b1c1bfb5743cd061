"""What each megatron-core GPT parameter is, by name: one table, :data:`PARAM_RULES`.

A row gives a parameter's role, its norm-statistics group (and from that its lr group), the
dim megatron splits it along under tensor parallelism, whether it holds SwiGLU's ``[gate |
up]`` halves and its HuggingFace Llama name(s). The optimizer layout, the shard mapping, the
norm tracker, the checkpoint converters and the tools read these facts from here only.

Names are megatron-core names as ``named_parameters()`` gives them: ``module.`` wrapper
prefixes are ignored, layer parameters are ``decoder.layers.N.<suffix>`` with ``N`` stage-local
or global (:func:`layer_number` / :func:`renumber_layer` rewrite it). Both layer specs are
covered: the local spec's separate norms (``input_layernorm``) and TransformerEngine's norms
fused into the next linear layer (``linear_qkv.layer_norm_weight``), which
:func:`local_spec_name` maps onto the local spec, as it maps pre-megatron-core Megatron-LM names.

Megatron conventions in the table:

- ColumnParallel ``linear_qkv``, ``linear_fc1`` (weights and biases), vocab-parallel
  ``word_embeddings`` and ``output_layer``: partition dim 0 (TP rank r holds row block r).
- RowParallel ``linear_proj``, ``linear_fc2`` weights: dim 1 (column blocks); their biases,
  every norm and the learned position embedding are replicated (None).
- Fused ``linear_qkv`` rows: per query group ``[q heads of the group | k | v]``
  (:func:`qkv_group_layout`); TP ranks hold whole groups, so plain row blocks shard it.
- Gated ``linear_fc1`` rows: ``[gate | up]`` (``models.sharding`` shards each half).
- megatron-core's RoPE (non-interleaved, rotate-half over the whole head) is HF Llama's, so
  Q/K rows map to ``q_proj``/``k_proj`` without a permutation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

# Norm-statistics group -> learning-rate / radius group: attention and mlp share "hidden".
_LR_GROUP_OF = {"embedding": "embedding", "attention": "hidden", "mlp": "hidden", "output": "output",
                "gains": "gains"}
PARAM_GROUPS: tuple[str, ...] = tuple(_LR_GROUP_OF)
LR_GROUPS: tuple[str, ...] = tuple(dict.fromkeys(_LR_GROUP_OF.values()))
_LAYER_PREFIX, _HF_LAYER_PREFIX = "decoder.layers.", "model.layers."
_LAYER_RE = re.compile(rf"^{re.escape(_LAYER_PREFIX)}(\d+)\.(.+)$")


@dataclass(frozen=True)
class ParamRule:
    """One row of :data:`PARAM_RULES`: what the parameter named ``suffix`` is.

    ``suffix`` is the whole name, or what follows ``decoder.layers.N.`` when ``layer``.
    ``role``: embedding, position_embedding, qkv, proj, fc1, fc2, output (matrices), gain (norm
    weights and biases) or bias (linear biases). ``group``: the norm-statistics group (every
    1-D tensor is in "gains"). ``tp_dim``: megatron's TP partition dim. ``glu``: rows are
    ``[gate | up]`` when the model is gated. ``hf``: the HF Llama name(s), after
    ``model.layers.N.`` when ``layer``, one per piece of a fused tensor, in row order.
    ``local``: the local-spec suffix a TransformerEngine fused-norm parameter stands for.
    """

    suffix: str
    layer: bool
    role: str
    group: str
    tp_dim: int | None
    glu: bool = False
    hf: tuple[str, ...] = ()
    local: str | None = None

    @property
    def lr_group(self) -> str:
        return lr_group(self.group)


def _norm(module: str, layer: bool, hf: str | None = None) -> tuple[ParamRule, ParamRule]:
    """The weight and bias rows of a norm (the bias exists with LayerNorm only)."""
    return (ParamRule(f"{module}.weight", layer, "gain", "gains", None, hf=(f"{hf}.weight",) if hf else ()),
            ParamRule(f"{module}.bias", layer, "gain", "gains", None))


def _te_norm(linear: str, local: str) -> tuple[ParamRule, ...]:
    """The rows of the norm TransformerEngine fuses into ``linear``: the local spec's ``local`` norm."""
    return tuple(ParamRule(f"{linear}.layer_norm_{leaf}", True, "gain", "gains", None, local=f"{local}.{leaf}")
                 for leaf in ("weight", "bias"))


PARAM_RULES: tuple[ParamRule, ...] = (
    ParamRule("embedding.word_embeddings.weight", False, "embedding", "embedding", 0,
              hf=("model.embed_tokens.weight",)),
    ParamRule("embedding.position_embeddings.weight", False, "position_embedding", "embedding", None),
    *_norm("input_layernorm", True, hf="input_layernorm"),
    *_te_norm("self_attention.linear_qkv", "input_layernorm"),
    ParamRule("self_attention.linear_qkv.weight", True, "qkv", "attention", 0,
              hf=("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    ParamRule("self_attention.linear_qkv.bias", True, "bias", "gains", 0),
    *_norm("self_attention.q_layernorm", True),
    *_norm("self_attention.k_layernorm", True),
    ParamRule("self_attention.linear_proj.weight", True, "proj", "attention", 1, hf=("self_attn.o_proj.weight",)),
    ParamRule("self_attention.linear_proj.bias", True, "bias", "gains", None),
    *_norm("pre_mlp_layernorm", True, hf="post_attention_layernorm"),
    *_te_norm("mlp.linear_fc1", "pre_mlp_layernorm"),
    ParamRule("mlp.linear_fc1.weight", True, "fc1", "mlp", 0, glu=True,
              hf=("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    ParamRule("mlp.linear_fc1.bias", True, "bias", "gains", 0, glu=True),
    ParamRule("mlp.linear_fc2.weight", True, "fc2", "mlp", 1, hf=("mlp.down_proj.weight",)),
    ParamRule("mlp.linear_fc2.bias", True, "bias", "gains", None),
    *_norm("decoder.final_layernorm", False, hf="model.norm"),
    ParamRule("output_layer.weight", False, "output", "output", 0, hf=("lm_head.weight",)),
)
_RULE_OF = {(rule.layer, rule.suffix): rule for rule in PARAM_RULES}

# Pre-megatron-core Megatron-LM names -> megatron-core local-spec names, applied in order.
_LEGACY_RENAMES = (
    (r"^language_model\.embedding\.", "embedding."),
    (r"^language_model\.output_layer\.", "output_layer."),
    (r"^language_model\.encoder\.final_(?:norm|layernorm)\.", "decoder.final_layernorm."),
    (r"^language_model\.encoder\.layers\.", "decoder.layers."),
    (r"\.input_(?:norm|layernorm)\.", ".input_layernorm."),
    (r"\.post_attention_(?:norm|layernorm)\.", ".pre_mlp_layernorm."),
    (r"\.self_attention\.query_key_value\.", ".self_attention.linear_qkv."),
    (r"\.self_attention\.dense\.", ".self_attention.linear_proj."),
    (r"\.mlp\.dense_h_to_4h\.", ".mlp.linear_fc1."),
    (r"\.mlp\.dense_4h_to_h\.", ".mlp.linear_fc2."),
)


def canonical_name(name: str) -> str:
    """Strip wrapper prefixes (megatron DDP / Float16Module ``module.``) from a parameter name."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def layer_number(name: str) -> int | None:
    """N of a ``decoder.layers.N.`` parameter; None for the embedding, final norm and output."""
    match = _LAYER_RE.match(canonical_name(name))
    return int(match.group(1)) if match else None


def renumber_layer(name: str, layer: int) -> str:
    """The same parameter of layer ``layer`` (the name must be a layer parameter's)."""
    match = _LAYER_RE.match(canonical_name(name))
    if match is None:
        raise ValueError(f"{name!r} is not a decoder.layers.N. parameter")
    return f"{_LAYER_PREFIX}{layer}.{match.group(2)}"


def param_rule(name: str) -> ParamRule:
    """The table row of a megatron-core GPT parameter name (local or TransformerEngine spec)."""
    canonical = canonical_name(name)
    match = _LAYER_RE.match(canonical)
    rule = _RULE_OF.get((True, match.group(2)) if match else (False, canonical))
    if rule is None:
        raise ValueError(
            f"unknown parameter {name!r}: expected a megatron-core GPT parameter (embedding, "
            "decoder.layers.N.self_attention/mlp, layer norms, output_layer)"
        )
    return rule


def param_group(name: str) -> str:
    """Norm-statistics group of a parameter: embedding, attention, mlp, output or gains."""
    return param_rule(name).group


def lr_group(group: str) -> str:
    """Learning-rate / radius group of a norm-statistics group."""
    return _LR_GROUP_OF[group]


def tp_partition_dim(name: str) -> int | None:
    """Megatron TP partition dim of a parameter: 0 (row blocks), 1 (column blocks) or None."""
    return param_rule(name).tp_dim


def is_glu_fc1(name: str, glu: bool) -> bool:
    """True when the parameter is a gated ``linear_fc1`` weight/bias ([gate | up] halves)."""
    return glu and param_rule(name).glu


def local_spec_name(name: str) -> str:
    """The local-spec megatron-core name of a TransformerEngine-spec or pre-megatron-core name."""
    name = canonical_name(name)
    for pattern, replacement in _LEGACY_RENAMES:
        name = re.sub(pattern, replacement, name)
    local = param_rule(name).local
    return name if local is None else f"{_LAYER_PREFIX}{layer_number(name)}.{local}"


def hf_names(name: str) -> tuple[str, ...]:
    """HF Llama name(s) of a parameter: one per piece of a fused tensor (q, k, v; gate, up), in order."""
    local = local_spec_name(name)
    rule = param_rule(local)
    if not rule.hf:
        raise ValueError(f"{name!r} has no HuggingFace Llama counterpart (Llama: RMSNorm, SwiGLU, RoPE, no biases)")
    layer = layer_number(local)
    return tuple(hf if layer is None else f"{_HF_LAYER_PREFIX}{layer}.{hf}" for hf in rule.hf)


def llama_param_names(num_layers: int, untied: bool) -> list[str]:
    """Local-spec names of every parameter of a Llama-shaped GPT (those with HF names), in model order."""
    rules = [r for r in PARAM_RULES if r.hf and (untied or r.role != "output")]
    first_layer_row = next(i for i, r in enumerate(rules) if r.layer)
    layer_rows = [r for r in rules if r.layer]
    return ([r.suffix for r in rules[:first_layer_row]]
            + [f"{_LAYER_PREFIX}{i}.{r.suffix}" for i in range(num_layers) for r in layer_rows]
            + [r.suffix for r in rules[first_layer_row:] if not r.layer])


def qkv_group_layout(q_per_group: int, head_dim: int) -> tuple[tuple[str, int, int], ...]:
    """(part, first row, end row) of q, k and v inside one query group's rows of fused ``linear_qkv``."""
    layout, row = [], 0
    for part, heads in (("q", q_per_group), ("k", 1), ("v", 1)):
        layout.append((part, row, row + heads * head_dim))
        row += heads * head_dim
    return tuple(layout)


def split_qkv(qkv: Tensor, heads: int, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Fused ``linear_qkv`` rows (weight or bias) -> the (q, k, v) row blocks, heads in order."""
    head_dim = qkv.shape[0] // (heads + 2 * groups)
    grouped = qkv.reshape(groups, -1, *qkv.shape[1:])
    q, k, v = (grouped[:, a:b].reshape(-1, *qkv.shape[1:]).contiguous()
               for _, a, b in qkv_group_layout(heads // groups, head_dim))
    return q, k, v


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int, groups: int) -> Tensor:
    """Inverse of :func:`split_qkv`."""
    head_dim = q.shape[0] // heads
    layout = qkv_group_layout(heads // groups, head_dim)
    grouped = q.new_empty(groups, layout[-1][2], *q.shape[1:])
    for (_, a, b), part in zip(layout, (q, k, v)):
        grouped[:, a:b] = part.reshape(groups, b - a, *q.shape[1:])
    return grouped.reshape(-1, *q.shape[1:])
