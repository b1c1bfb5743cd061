"""Layout (logical matrices of megatron shards) and ownership plan: pure, single process."""
from __future__ import annotations

import math

from types import SimpleNamespace

import pytest
import torch

from disco_megatron.models.naming import tp_partition_dim
from disco_megatron.models.sharding import (
    gather_full_tensor,
    global_param_name,
    layer_to_stage,
    local_param_name,
    shard_full_tensor,
)
from _scion_model import CFG, full_shapes
from disco_megatron.models.naming import param_group
from disco_megatron.optim.layout import build_layout, needs_whole, reference_row_splits
from disco_megatron.optim.newton_schulz import ns_flops
from disco_megatron.optim.plan import build_exchange_plan, plan_balance, plan_owners
from disco_megatron.scion_options import QKV_SPLITS

GQA = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                      ffn_hidden_size=96, gated_linear_unit=True)

LOCAL_SPEC_GROUPS = {
    "embedding.word_embeddings.weight": "embedding",
    "embedding.position_embeddings.weight": "embedding",
    "decoder.layers.0.input_layernorm.weight": "gains",
    "decoder.layers.0.input_layernorm.bias": "gains",
    "decoder.layers.0.self_attention.linear_qkv.weight": "attention",
    "decoder.layers.0.self_attention.linear_qkv.bias": "gains",
    "decoder.layers.0.self_attention.linear_proj.weight": "attention",
    "decoder.layers.0.self_attention.linear_proj.bias": "gains",
    "decoder.layers.0.self_attention.q_layernorm.weight": "gains",
    "decoder.layers.3.pre_mlp_layernorm.weight": "gains",
    "decoder.layers.3.mlp.linear_fc1.weight": "mlp",
    "decoder.layers.3.mlp.linear_fc1.bias": "gains",
    "decoder.layers.3.mlp.linear_fc2.weight": "mlp",
    "decoder.final_layernorm.weight": "gains",
    "output_layer.weight": "output",
}
TE_SPEC_GROUPS = {
    "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight": "gains",
    "decoder.layers.1.self_attention.linear_qkv.layer_norm_bias": "gains",
    "decoder.layers.1.mlp.linear_fc1.layer_norm_weight": "gains",
    "decoder.layers.1.self_attention.linear_qkv.weight": "attention",
    "decoder.layers.1.mlp.linear_fc2.weight": "mlp",
}


@pytest.mark.parametrize("name,group", [*LOCAL_SPEC_GROUPS.items(), *TE_SPEC_GROUPS.items()])
def test_param_group_every_spec_name(name: str, group: str) -> None:
    assert param_group(name) == group
    assert param_group("module.module." + name) == group


def test_param_group_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown parameter"):
        param_group("encoder.blocks.0.weight")


def _qkv_rows_by_part(cfg: SimpleNamespace) -> dict[str, list[int]]:
    """TP1 row indices of Q, K, V in megatron's fused per-group order, built independently."""
    q_per_group = cfg.num_attention_heads // cfg.num_query_groups
    kv = cfg.kv_channels
    rows: dict[str, list[int]] = {"q": [], "k": [], "v": []}
    row = 0
    for _ in range(cfg.num_query_groups):
        for part, count in (("q", q_per_group * kv), ("k", kv), ("v", kv)):
            rows[part] += list(range(row, row + count))
            row += count
    return rows


def _reassembled_rows(name: str, full_rows: int, cfg: SimpleNamespace, tp: int, split: str
                      ) -> dict[str, torch.Tensor]:
    """For each logical matrix: TP1 row ids, found by sharding an id column and concatenating
    each rank's layout pieces in rank order."""
    ids = torch.arange(full_rows).unsqueeze(1)
    pieces: dict[str, list[torch.Tensor]] = {}
    for rank in range(tp):
        shard = shard_full_tensor(name, ids, rank, tp, 0, cfg.gated_linear_unit)
        layout = build_layout(name, (shard.shape[0], cfg.hidden_size), cfg, tp_size=tp,
                              tp_rank=rank, qkv_split=split)
        for m in layout.matrices:
            pieces.setdefault(m.key, []).append(torch.cat([shard[a:b, 0] for a, b in m.local_rows]))
    return {key: torch.cat(p) for key, p in pieces.items()}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("split", ["fused", "qkv"])
def test_qkv_logical_matrices_reassemble_tp1_rows(tp: int, split: str) -> None:
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    expected = _qkv_rows_by_part(GQA)
    total = sum(len(v) for v in expected.values())
    got = _reassembled_rows(name, total, GQA, tp, split)
    if split == "fused":
        assert list(got) == [name]
        assert got[name].tolist() == list(range(total))
    else:
        assert {k.rsplit(":", 1)[1]: v.tolist() for k, v in got.items()} == expected
    tp1 = build_layout(name, (total, GQA.hidden_size), GQA, qkv_split=split)
    splits = reference_row_splits(tp1)
    as_lists = [s.tolist() for s in splits] if splits is not None else [list(range(total))]
    assert as_lists == [got[m.key].tolist() for m in tp1.matrices]


def test_qkv_head_split_is_local_and_covers_heads() -> None:
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    expected = _qkv_rows_by_part(GQA)
    got = _reassembled_rows(name, 128, GQA, 2, "head")
    kv = GQA.kv_channels
    assert sorted(got) == sorted(f"{name}:{p}{i}" for p, n in (("q", 4), ("k", 2), ("v", 2)) for i in range(n))
    for part in "qkv":
        heads = sorted((k for k in got if k.rsplit(":", 1)[1][0] == part), key=lambda k: int(k.rsplit(":", 1)[1][1:]))
        assert torch.cat([got[k] for k in heads]).tolist() == expected[part]
        assert all(len(got[k]) == kv for k in heads)
    layout = build_layout(name, (64, 64), GQA, tp_size=2, tp_rank=1, qkv_split="head")
    assert all(m.local and not needs_whole(m, layout.lmo) for m in layout.matrices)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_swiglu_fc1_gate_up_reassemble(tp: int) -> None:
    name = "decoder.layers.2.mlp.linear_fc1.weight"
    full_rows = 2 * GQA.ffn_hidden_size
    got = _reassembled_rows(name, full_rows, GQA, tp, "fused")
    assert got[f"{name}:gate"].tolist() == list(range(GQA.ffn_hidden_size))
    assert got[f"{name}:up"].tolist() == list(range(GQA.ffn_hidden_size, full_rows))


def test_qkv_tp4_with_four_groups() -> None:
    cfg = SimpleNamespace(**{**vars(GQA), "num_attention_heads": 8, "num_query_groups": 4, "kv_channels": 8})
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    expected = _qkv_rows_by_part(cfg)
    got = _reassembled_rows(name, 4 * (2 + 2) * 8, cfg, 4, "qkv")
    assert {k.rsplit(":", 1)[1]: v.tolist() for k, v in got.items()} == expected


@pytest.mark.parametrize("name,pdim", [
    ("embedding.word_embeddings.weight", 0), ("output_layer.weight", 0),
    ("decoder.layers.0.self_attention.linear_proj.weight", 1),
    ("decoder.layers.0.mlp.linear_fc2.weight", 1), ("decoder.layers.0.mlp.linear_fc2.bias", None),
    ("decoder.layers.0.input_layernorm.weight", None),
    ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", None),
])
def test_partition_dims_and_shard_roundtrip(name: str, pdim: int | None) -> None:
    assert tp_partition_dim(name) == pdim
    full = torch.randn(8, 12) if not name.endswith(("bias", "norm.weight", "norm_weight")) else torch.randn(8)
    shards = [shard_full_tensor(name, full, r, 4, pdim, True) for r in range(4)]
    assert torch.equal(gather_full_tensor(name, shards, pdim, True), full)
    layout = build_layout(name, shards[0].shape, GQA, tp_size=4, tp_rank=0)
    (matrix,) = layout.matrices
    assert matrix.shape == tuple(full.shape)
    assert matrix.local == (pdim is None)


def test_glu_fc1_shard_is_gate_up_blocks() -> None:
    full = torch.arange(8).unsqueeze(1)
    shard = shard_full_tensor("decoder.layers.0.mlp.linear_fc1.weight", full, 1, 2, 0, True)
    assert shard[:, 0].tolist() == [2, 3, 6, 7]


def test_lmo_choices() -> None:
    lmo = lambda name, shape, **kw: build_layout(name, shape, GQA, **kw).lmo  # noqa: E731
    assert lmo("decoder.layers.0.mlp.linear_fc2.weight", (64, 96)) == "spectral"
    assert lmo("embedding.word_embeddings.weight", (128, 64)) == "embedding"
    assert lmo("output_layer.weight", (128, 64)) == "rownorm"
    assert lmo("output_layer.weight", (128, 64), output_lmo="sign") == "sign"
    assert lmo("output_layer.weight", (128, 64), shared_embedding=True) == "embedding"
    assert lmo("decoder.final_layernorm.weight", (64,)) == "bias_rms"
    with pytest.raises(ValueError, match="--scion-qkv-split"):
        build_layout("output_layer.weight", (128, 64), GQA, qkv_split="rows")
    with pytest.raises(ValueError, match="--scion-output-lmo"):
        build_layout("output_layer.weight", (128, 64), GQA, output_lmo="spectral")


def test_vocab_parallel_row_lmos_need_no_gather_but_sharded_bias_does() -> None:
    out = build_layout("output_layer.weight", (64, 64), GQA, tp_size=2)
    assert not needs_whole(out.matrices[0], out.lmo)
    bias = build_layout("decoder.layers.0.self_attention.linear_qkv.bias", (64,), GQA, tp_size=2)
    assert needs_whole(bias.matrices[0], bias.lmo)
    proj = build_layout("decoder.layers.0.self_attention.linear_proj.weight", (64, 32), GQA, tp_size=2)
    assert proj.matrices[0].shape == (64, 64) and proj.matrices[0].concat_dim == 1


def test_pipeline_layer_names() -> None:
    assert layer_to_stage(5, 8, 2) == (1, 1)
    assert global_param_name("module.decoder.layers.1.mlp.linear_fc1.weight", 1, 8, 2) == \
        "decoder.layers.5.mlp.linear_fc1.weight"
    assert local_param_name("decoder.layers.5.mlp.linear_fc1.weight", 8, 2) == \
        (1, "decoder.layers.1.mlp.linear_fc1.weight")
    assert local_param_name("output_layer.weight", 8, 2) == (None, "output_layer.weight")
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size"):
        layer_to_stage(0, 6, 4)


def _twelve_layer_matrices() -> list[tuple[str, int, int]]:
    h, heads, groups, kv, ffn = 768, 12, 4, 64, 2048
    out = []
    for layer in range(12):
        p = f"decoder.layers.{layer}."
        out += [(p + "qkv", (heads + 2 * groups) * kv, h), (p + "proj", h, heads * kv),
                (p + "gate", ffn, h), (p + "up", ffn, h), (p + "fc2", h, ffn)]
    return out


@pytest.mark.parametrize("tp,dp", [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_plan_balance_twelve_layers(tp: int, dp: int) -> None:
    matrices = _twelve_layer_matrices()
    ranks = list(range(tp * dp))
    plan = plan_owners(matrices, ranks)
    costs = {k: ns_flops(m, n) for k, m, n in matrices}
    assert set(plan) == {k for k, _, _ in matrices} and set(plan.values()) == set(ranks)
    balance = plan_balance(plan, costs, ranks)
    assert balance <= 1.1, balance
    assert plan_owners(list(reversed(matrices)), ranks) == plan


def test_plan_owners_round_robin_for_equal_costs() -> None:
    matrices = [(f"m{i}", 64, 64) for i in range(7)]
    plan = plan_owners(matrices, [0, 1, 2])
    assert [plan[f"m{i}"] for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert plan_balance(plan, {k: 1.0 for k in plan}, [0, 1, 2]) == pytest.approx(3 / (7 / 3))


def _rank_layouts(tp: int, tp_rank: int, qkv_split: str) -> list:
    """Layouts of TP rank ``tp_rank``'s shards (PP1) of the distributed tests' GQA + SwiGLU model."""
    layouts = []
    for name, shape in full_shapes().items():
        local, dim = list(shape), tp_partition_dim(name)
        if dim is not None:
            local[dim] //= tp
        layouts.append(build_layout(name, tuple(local), CFG, tp_size=tp, tp_rank=tp_rank, qkv_split=qkv_split))
    return layouts


@pytest.mark.parametrize("split", QKV_SPLITS)
def test_exchange_plan_equal_on_every_tp_rank_and_each_matrix_planned_once(split: str) -> None:
    plans = [build_exchange_plan(_rank_layouts(4, r, split), tp_size=4) for r in range(4)]
    assert all(p.buckets == plans[0].buckets and p.fingerprint == plans[0].fingerprint for p in plans)
    assert sorted(set(plans[0].owners.values())) == [0, 1, 2, 3]
    for rank, plan in enumerate(plans):
        layouts = _rank_layouts(4, rank, split)
        exchanged = [(e.param, e.matrix.key) for b in plan.buckets for e in b.entries]
        in_place = [(e.param, e.matrix.key) for g in plan.in_place for e in g.entries]
        assert sorted(exchanged + in_place) == sorted((i, m.key) for i, layout in enumerate(layouts)
                                                      for m in layout.matrices)
        assert sorted(exchanged) == sorted((i, m.key) for i, layout in enumerate(layouts) for m in layout.matrices
                                           if needs_whole(m, layout.lmo))
        for bucket in plan.buckets:
            assert [e.matrix.key for e in bucket.entries] == sorted(e.matrix.key for e in bucket.entries)
            assert {(layouts[e.param].lmo, e.matrix.shape, e.matrix.concat_dim) for e in bucket.entries} == \
                {(bucket.lmo, bucket.shape, bucket.concat_dim)}
        assert all(layouts[e.param].lmo == g.lmo for g in plan.in_place for e in g.entries)


def test_fingerprint_follows_the_plan_inputs_not_the_parameter_order() -> None:
    layouts = _rank_layouts(2, 0, "qkv")
    base = build_exchange_plan(layouts, tp_size=2)
    shuffled = build_exchange_plan(layouts[::-1], tp_size=2)
    assert shuffled.fingerprint == base.fingerprint and shuffled.owners == base.owners
    variants = [
        build_exchange_plan(_rank_layouts(2, 0, "fused"), tp_size=2),
        build_exchange_plan(layouts, tp_size=2, ns_steps=6),
        build_exchange_plan(layouts, tp_size=2, ns_backend="polar_express"),
        build_exchange_plan(layouts, tp_size=2, ns_dtype="bf16"),
        build_exchange_plan(layouts, tp_size=2, tp_mode="duplicated"),
        build_exchange_plan(layouts, tp_size=2, dp_size=2, dp_mode="sharded"),
        build_exchange_plan(_rank_layouts(4, 0, "qkv"), tp_size=4),
    ]
    assert len({base.fingerprint, *(v.fingerprint for v in variants)}) == 1 + len(variants)
    assert build_exchange_plan(layouts, tp_size=2, tp_mode="local").buckets == ()
    with pytest.raises(ValueError, match="--scion-dp-mode sharded .* --scion-tp-mode owner"):
        build_exchange_plan(layouts, tp_size=2, dp_size=2, tp_mode="duplicated", dp_mode="sharded")


@pytest.mark.parametrize("tp, dp", [(1, 2), (2, 2), (1, 4), (4, 1)])
def test_sharded_dp_gives_every_logical_matrix_one_owner_with_balanced_bytes(tp: int, dp: int) -> None:
    """Sharded: nothing in place, each matrix owned whole by one slot or split into row blocks
    (vocab rows: over the DP replicas of its TP piece), all slots' state adds up to the stage's
    matrices, and the largest slot holds little more than the mean."""
    plans = [build_exchange_plan(_rank_layouts(tp, r, "qkv"), tp_size=tp, dp_size=dp, tp_rank=r,
                                 dp_mode="sharded") for r in range(tp)]
    assert all(p.in_place == () and p.fingerprint == plans[0].fingerprint for p in plans)
    layouts = _rank_layouts(1, 0, "qkv")
    keys = sorted(m.key for layout in layouts for m in layout.matrices)
    blocked = {rb.entry.matrix.key for rb in plans[0].row_blocks}
    assert sorted([*plans[0].owners, *blocked]) == keys
    assert blocked == {m.key for layout in layouts if layout.lmo in ("embedding", "rownorm") for m in layout.matrices}
    for r, plan in enumerate(plans):
        for rb in plan.row_blocks:
            assert rb.owners == tuple(d * tp + r for d in range(dp)) and rb.bounds[-1] == rb.entry.matrix.shape[0] // tp
    held = [plans[slot % tp].owned_numel(slot) for slot in range(tp * dp)]
    assert sum(held) == sum(math.prod(m.shape) for layout in layouts for m in layout.matrices)
    assert max(held) <= 1.1 * sum(held) / len(held), held


def test_sharded_dp_refuses_a_per_head_split_at_tp2() -> None:
    with pytest.raises(ValueError, match="--scion-qkv-split head .* --scion-dp-mode sharded"):
        build_exchange_plan(_rank_layouts(2, 0, "head"), tp_size=2, dp_size=2, dp_mode="sharded")
    assert build_exchange_plan(_rank_layouts(1, 0, "head"), tp_size=1, dp_size=2, dp_mode="sharded").in_place == ()
