"""The parameter-naming table (models/naming.py) against megatron-core itself: every parameter of
real local-spec GPTModels at TP2 (roles and groups from megatron's module types, partition dims
from the attributes megatron sets), megatron's TransformerEngine spec names, HF Llama's own
parameter names, and fused QKV rows built by hand."""
from __future__ import annotations

import pytest
import torch

from _dist import run_workers
from test_fp8_paths import TE_MODULE_PARAMS, _te_modules, _te_param_present, _te_spec

from disco_megatron.checkpoint.hf_llama import hf_config, hf_to_megatron, megatron_to_hf
from disco_megatron.config import ModelConfig
from disco_megatron.models.naming import (
    PARAM_RULES,
    canonical_name,
    fuse_qkv,
    hf_names,
    layer_number,
    local_spec_name,
    param_rule,
    qkv_group_layout,
    renumber_layer,
    split_qkv,
    tp_partition_dim,
)

TP = 2
LLAMA = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
             seq_length=16, vocab_size=128, make_vocab_size_divisible_by=64)
# Every optional parameter of the local spec: LayerNorm biases, linear biases, learned positions and
# QK layer norms (plus a GeLU MLP and a tied output layer, which has no parameter of its own).
OPTIONAL = dict(LLAMA, normalization="LayerNorm", swiglu=False, add_bias_linear=True,
                position_embedding_type="learned_absolute", untie_embeddings_and_output_weights=False)
MODELS = {"llama": (LLAMA, False), "optional": (OPTIONAL, True)}  # (ModelConfig fields, qk_layernorm)


def _describe(model: torch.nn.Module) -> dict[str, dict]:
    """What megatron says about each parameter: module kind and block, TP attributes, shape."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.mlp import MLP

    fc1 = {id(p) for m in model.modules() if isinstance(m, MLP) for p in m.linear_fc1.parameters()}
    kinds = {id(model.embedding.word_embeddings): "word_embeddings", id(model.output_layer): "output_layer"}
    if hasattr(model.embedding, "position_embeddings"):
        kinds[id(model.embedding.position_embeddings)] = "position_embeddings"
    described = {}
    for path, module in model.named_modules():
        blocks = [model.get_submodule(".".join(path.split(".")[:i])) for i in range(1, path.count(".") + 2)]
        block = next((b for t, b in ((SelfAttention, "attention"), (MLP, "mlp"))
                      if any(isinstance(m, t) for m in blocks)), None)
        kind = kinds.get(id(module), "column" if isinstance(module, ColumnParallelLinear) else
                         "row" if isinstance(module, RowParallelLinear) else
                         "norm" if "Norm" in type(module).__name__ else type(module).__name__)
        for leaf, p in module.named_parameters(recurse=False):
            described[f"{path}.{leaf}"] = {
                "kind": kind, "leaf": leaf, "block": block, "fc1": id(p) in fc1, "shape": tuple(p.shape),
                "pdim": p.partition_dim if getattr(p, "tensor_model_parallel", False) else None}
    return described


def _describe_worker(rank: int, world: int, out: str) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from disco_megatron.models import gpt
    from disco_megatron.models.weights import gather_full_weights
    from disco_megatron.runtime import initialize_parallel

    initialize_parallel(world, 1, seed=3)
    found = {}
    for key, (fields, qk_layernorm) in MODELS.items():
        cfg = ModelConfig(**fields)
        gpt.layer_spec = lambda c, qk=qk_layernorm: get_gpt_layer_local_spec(normalization=c.normalization,
                                                                             qk_layernorm=qk)
        model = gpt.build_gpt_model(cfg)
        found[key] = _describe(model)
        if key == "llama":
            found["llama_full"] = gather_full_weights(model, cfg)
    if rank == 0:
        torch.save(found, out)
    ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """_describe of both MODELS at TP2 (rank 0), and the llama model's full weights."""
    out = tmp_path_factory.mktemp("naming") / "described.pt"
    run_workers(_describe_worker, TP, str(out))
    return torch.load(out)


def test_table_covers_every_real_parameter_with_megatron_partition_dims(real: dict) -> None:
    used = set()
    for key in MODELS:
        for name, info in real[key].items():
            rule = param_rule(name)
            used.add(rule)
            assert param_rule(f"module.module.{name}") is rule and local_spec_name(name) == name
            assert rule.tp_dim == info["pdim"], f"{key} {name}: table dim {rule.tp_dim}, megatron {info['pdim']}"
    te_only = {r for r in PARAM_RULES if r.local is not None}
    assert set(PARAM_RULES) - te_only - used == set(), "table rows no real local-spec parameter has"


def _expected_role_and_group(info: dict) -> tuple[str, str]:
    """Role and norm group from megatron's module types alone (not from the name)."""
    kind = info["kind"]
    if kind == "norm":
        return "gain", "gains"
    if info["leaf"] == "bias":
        return "bias", "gains"
    by_module = {"word_embeddings": ("embedding", "embedding"), "output_layer": ("output", "output"),
                 "position_embeddings": ("position_embedding", "embedding")}
    if kind in by_module:
        return by_module[kind]
    roles = {("attention", "column"): "qkv", ("attention", "row"): "proj", ("mlp", "column"): "fc1",
             ("mlp", "row"): "fc2"}
    return roles[(info["block"], kind)], info["block"]


@pytest.mark.parametrize("key", list(MODELS))
def test_roles_groups_and_glu_follow_megatron_modules(real: dict, key: str) -> None:
    cfg = ModelConfig(**MODELS[key][0])
    for name, info in real[key].items():
        rule = param_rule(name)
        assert (rule.role, rule.group) == _expected_role_and_group(info), name
        assert rule.lr_group == ("hidden" if rule.group in ("attention", "mlp") else rule.group), name
        assert rule.glu == info["fc1"], name
        if rule.glu:  # megatron's fc1 output is [gate | up] (twice the FFN width) exactly when gated
            assert info["shape"][0] == (2 if cfg.swiglu else 1) * cfg.ffn_size // TP, name


@pytest.mark.parametrize("normalization,bias,qk_layernorm,key", [
    ("RMSNorm", False, False, "llama"), ("LayerNorm", True, True, "optional")], ids=["rmsnorm", "layernorm-bias-qk"])
def test_te_spec_names_map_onto_the_local_spec(monkeypatch, real: dict, normalization: str, bias: bool,
                                               qk_layernorm: bool, key: str) -> None:
    modules = _te_modules(_te_spec(monkeypatch, qk_layernorm), "decoder.layers.1.")
    te_dims = {f"{path}.{leaf}": dim for path, te_class in modules.items()
               for leaf, dim in TE_MODULE_PARAMS[te_class].items()
               if _te_param_present(te_class, leaf, normalization, bias)}
    for name, dim in te_dims.items():
        assert tp_partition_dim(name) == dim, f"{name}: table dim {tp_partition_dim(name)}, TE/megatron {dim}"
        assert param_rule(local_spec_name(name)).tp_dim == dim and layer_number(local_spec_name(name)) == 1
    local_layer = {n for n in real[key] if n.startswith("decoder.layers.1.")}
    assert {local_spec_name(n) for n in te_dims} == local_layer
    assert hf_names("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight") == \
        ("model.layers.1.input_layernorm.weight",)


def test_hf_names_match_llama_and_round_trip(real: dict) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(**LLAMA)
    full = real["llama_full"]
    hf = megatron_to_hf(full, cfg)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(cfg, torch.float32, {})))
    assert {n: tuple(t.shape) for n, t in hf.items()} == {n: tuple(t.shape) for n, t in llama.state_dict().items()}
    back = hf_to_megatron(hf, cfg, "test")
    assert back.keys() == full.keys() and all(torch.equal(back[n], full[n]) for n in full)
    assert sorted(n for name in full for n in hf_names(name)) == sorted(hf)


@pytest.mark.parametrize("heads,groups", [(6, 2), (4, 4), (4, 1)])
def test_qkv_rows_per_query_group(heads: int, groups: int) -> None:
    """Fused rows labelled (part, head, row within head) one by one in megatron's order, then split."""
    head_dim, per_group = 3, heads // groups
    labels = []
    for g in range(groups):
        labels += [("q", g * per_group + h, r) for h in range(per_group) for r in range(head_dim)]
        labels += [(part, g, r) for part in "kv" for r in range(head_dim)]
    code = {"q": 0, "k": 1, "v": 2}
    fused = torch.tensor([[code[p], h, r] for p, h, r in labels], dtype=torch.float32)
    for tensor in (fused, fused[:, 0] * 100 + fused[:, 1] * 10 + fused[:, 2]):  # a weight and a bias
        q, k, v = split_qkv(tensor, heads, groups)
        for part, piece, count in (("q", q, heads), ("k", k, groups), ("v", v, groups)):
            in_head_order = sorted((label for label in labels if label[0] == part), key=lambda x: (x[1], x[2]))
            expected = torch.tensor([[code[p], h, r] for p, h, r in in_head_order], dtype=torch.float32)
            assert piece.shape[0] == count * head_dim
            assert torch.equal(piece, expected if tensor.dim() == 2 else expected @ torch.tensor([100.0, 10, 1]))
        assert torch.equal(fuse_qkv(q, k, v, heads, groups), tensor)
    assert qkv_group_layout(per_group, head_dim)[-1][2] * groups == len(labels)


def test_names_refused_renamed_and_renumbered() -> None:
    for bad in ("encoder.blocks.0.weight", "decoder.layers.0.mlp.router.weight",
                "decoder.layers.x.mlp.linear_fc1.weight", "mlp.linear_fc1.weight"):
        with pytest.raises(ValueError, match="unknown parameter"):
            param_rule(bad)
    assert local_spec_name("language_model.encoder.layers.3.self_attention.query_key_value.bias") == \
        "decoder.layers.3.self_attention.linear_qkv.bias"
    assert local_spec_name("module.language_model.encoder.final_norm.weight") == "decoder.final_layernorm.weight"
    assert local_spec_name("decoder.layers.2.mlp.linear_fc1.layer_norm_bias") == \
        "decoder.layers.2.pre_mlp_layernorm.bias"
    assert hf_names("language_model.encoder.layers.3.mlp.dense_h_to_4h.weight") == \
        ("model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="no HuggingFace Llama counterpart"):
        hf_names("decoder.layers.0.self_attention.linear_qkv.bias")
    layer_12 = "module.decoder.layers.12.input_layernorm.weight"
    assert layer_number(layer_12) == 12 and layer_number("output_layer.weight") is None
    assert renumber_layer(layer_12, 3) == "decoder.layers.3.input_layernorm.weight"
    assert canonical_name("module.module.output_layer.weight") == "output_layer.weight"
