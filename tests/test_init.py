"""--init-method: Scion's inits against their definitions, and the same full weights (and losses) at
every parallel layout for one seed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests._dist import run_workers
from tests._launch import TINY_MODEL, torchrun, train_losses

from disco_megatron.config import ConfigError, ModelConfig, parse_run_config
from disco_megatron.models.init import full_init, random_sign, scaled_orthogonal, scion_normal, stream
from disco_megatron.models.naming import param_rule, split_qkv

# Biases, GQA (8 heads, 4 groups: TP4 holds one each), SwiGLU: every kind of parameter the inits tell apart.
CFG = dict(num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=96,
           seq_length=16, vocab_size=256, make_vocab_size_divisible_by=64, add_bias_linear=True)
LAYOUTS = [(1, 1), (2, 2), (4, 1)]  # (TP, PP) on 4 ranks: DP 4, 1, 1
# (method, tied embedding/output, --scion-output-lmo): the tied run checks the last stage's copy.
VARIANTS = [("scion", False, "rownorm"), ("scion", False, "sign"), ("megatron", True, "rownorm")]


def _full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """TP1 names and shapes of a local-spec GPT of ``cfg`` (independent of megatron: written out)."""
    h, f, heads, groups = cfg.hidden_size, cfg.ffn_size, cfg.num_attention_heads, cfg.query_groups
    qkv = (heads + 2 * groups) * (h // heads)
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (cfg.padded_vocab_size(1), h)}
    for layer in range(cfg.num_layers):
        p = f"decoder.layers.{layer}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "self_attention.linear_qkv.weight": (qkv, h),
                   p + "self_attention.linear_qkv.bias": (qkv,), p + "self_attention.linear_proj.weight": (h, h),
                   p + "self_attention.linear_proj.bias": (h,), p + "pre_mlp_layernorm.weight": (h,),
                   p + "mlp.linear_fc1.weight": (2 * f, h), p + "mlp.linear_fc1.bias": (2 * f,),
                   p + "mlp.linear_fc2.weight": (h, f), p + "mlp.linear_fc2.bias": (h,)}
    return shapes | {"decoder.final_layernorm.weight": (h,), "output_layer.weight": (cfg.padded_vocab_size(1), h)}


def _logical(name: str, W: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """The matrices the reference's model holds separately: wq, wk, wv; w1 (gate), w3 (up)."""
    role = param_rule(name).role
    if role == "qkv":
        return list(split_qkv(W, cfg.num_attention_heads, cfg.query_groups))
    if role == "fc1":
        return list(W.chunk(2))
    return [W]


@pytest.mark.parametrize("output_lmo", ["rownorm", "sign"])
def test_scion_init_matches_its_definition(output_lmo):
    cfg = ModelConfig(**CFG)
    hidden = 0
    for name, shape in _full_shapes(cfg).items():
        W = full_init(name, shape, method="scion", seed=3, model=cfg, output_lmo=output_lmo)
        assert W.shape == shape, name
        role = param_rule(name).role
        if len(shape) == 1:
            assert torch.equal(W, torch.zeros(shape, dtype=W.dtype) if role == "bias" else torch.ones(shape, dtype=W.dtype)), name
        elif role == "embedding":  # rakkit/disco scion_normal_input: every token row RMS 1
            torch.testing.assert_close(W.square().mean(dim=1).sqrt(), torch.ones(shape[0], dtype=W.dtype), rtol=0, atol=1e-12)
        elif role == "output" and output_lmo == "rownorm":  # scion_normal_output: ‖row‖₂ = 1/√d_in
            torch.testing.assert_close(W.norm(dim=1) * math.sqrt(shape[1]), torch.ones(shape[0], dtype=W.dtype),
                                       rtol=0, atol=1e-12)
        elif role == "output":  # LIONS-EPFL/scion Sign.init: ±1/d_in, a fair coin
            assert set(W.unique().tolist()) == {-1 / shape[1], 1 / shape[1]}
            assert 0.45 < (W > 0).double().mean().item() < 0.55
        else:  # scaled_orthogonal per logical matrix: every singular value √(d_out/d_in)
            for M in _logical(name, W, cfg):
                s = torch.linalg.svdvals(M.float().double())  # as the fp32 parameter holds it
                target = math.sqrt(M.shape[0] / M.shape[1])
                assert (s - target).abs().max().item() <= 1e-5 * target, (name, M.shape, s.min(), s.max())
                hidden += 1
    assert hidden == cfg.num_layers * 7  # q, k, v, proj, gate, up, fc2


def test_megatron_init_statistics():
    """N(0, σ), σ/√(2·layers) for linear_proj and linear_fc2 (megatron-core's defaults), ones, zeros."""
    cfg = ModelConfig(**CFG, init_method_std=0.03)
    scaled = 0.03 / math.sqrt(2 * cfg.num_layers)
    for name, shape in _full_shapes(cfg).items():
        W = full_init(name, shape, method="megatron", seed=3, model=cfg)
        role = param_rule(name).role
        if len(shape) == 1:
            assert torch.equal(W, torch.full(shape, 0.0 if role == "bias" else 1.0, dtype=W.dtype)), name
            continue
        std = scaled if role in ("proj", "fc2") else 0.03
        n = W.numel()  # the sample std of n normals is within 5/√(2n) of σ (relative) with overwhelming odds
        assert abs(W.std().item() / std - 1) < 5 / math.sqrt(2 * n), (name, W.std().item(), std)
        assert abs(W.mean().item()) < 5 * std / math.sqrt(n), name


def test_streams_depend_on_seed_and_name_only():
    cfg = ModelConfig(**CFG)
    name, shape = "decoder.layers.2.mlp.linear_fc2.weight", (64, 96)
    W = full_init(name, shape, method="scion", seed=3, model=cfg)
    assert torch.equal(W, full_init(name, shape, method="scion", seed=3, model=cfg))
    assert not torch.equal(W, full_init(name, shape, method="scion", seed=4, model=cfg))
    assert not torch.equal(W, full_init("decoder.layers.1.mlp.linear_fc2.weight", shape, method="scion", seed=3,
                                        model=cfg))
    # The TransformerEngine spec's fused norm weight draws the local spec's stream.
    assert torch.equal(full_init("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", (64,),
                                 method="scion", seed=3, model=cfg), torch.ones(64, dtype=W.dtype))
    # The functions are the reference's definitions on a fresh stream.
    torch.testing.assert_close(torch.linalg.svdvals(scaled_orthogonal((8, 32), generator=stream(1, "a"))),
                               torch.full((8,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(scion_normal((4, 9), scale_type="input", generator=stream(1, "b")) / 9,
                               scion_normal((4, 9), scale_type="output", generator=stream(1, "b")), rtol=1e-14, atol=0)
    assert random_sign((3, 5), generator=stream(1, "c")).abs().eq(0.2).all()
    with pytest.raises(ValueError, match="--init-method"):
        full_init(name, shape, method="xavier", seed=3, model=cfg)


def test_init_method_flag_resolves_per_optimizer(tmp_path):
    assert parse_run_config([]).init_method == "scion"
    assert parse_run_config(["--optimizer", "adam"]).init_method == "megatron"
    explicit = parse_run_config(["--optimizer", "adam", "--init-method", "scion"]).to_dict()
    assert explicit["init_method"] == "scion"
    with pytest.raises(ConfigError, match="--init-method xavier: choose one of scion, megatron"):
        parse_run_config(["--init-method", "xavier"])
    # --config: a recorded default follows a new --optimizer; a choice that was not the default stays.
    for recorded, argv, want in ((parse_run_config([]).to_dict(), ["--optimizer", "adam"], "megatron"),
                                 (explicit, [], "scion")):
        path = tmp_path / "run_config.json"
        path.write_text(json.dumps(recorded))
        assert parse_run_config(["--config", str(path), *argv]).init_method == want, (recorded["optimizer"], argv)


def _layout_worker(rank: int, world: int, out: str) -> None:
    from megatron.core import parallel_state as ps

    from disco_megatron.models import build_gpt_model
    from disco_megatron.models.init import initialize_weights
    from disco_megatron.models.weights import gather_full_weights
    from disco_megatron.runtime import initialize_parallel

    for tp, pp in LAYOUTS:
        info = initialize_parallel(tp, pp, seed=100 + rank)  # megatron's own init differs per rank
        for method, tied, output_lmo in VARIANTS:
            cfg = ModelConfig(**CFG, untie_embeddings_and_output_weights=not tied)
            model = build_gpt_model(cfg)
            initialize_weights(model, cfg, method=method, seed=7, output_lmo=output_lmo)
            full = gather_full_weights(model, cfg)
            if info.tp_rank == 0:
                torch.save(full, Path(out) / f"{method}-{tied}-{output_lmo}-tp{tp}pp{pp}-rank{rank}.pt")
        ps.destroy_model_parallel()


def test_full_initial_weights_equal_at_tp1_tp2pp2_tp4(tmp_path):
    run_workers(_layout_worker, 4, str(tmp_path))
    for method, tied, output_lmo in VARIANTS:
        cfg = ModelConfig(**CFG, untie_embeddings_and_output_weights=not tied)
        want = {name: full_init(name, shape, method=method, seed=7, model=cfg, output_lmo=output_lmo).float()
                for name, shape in _full_shapes(cfg).items()}
        if tied:  # the last stage's copy of the embedding exists only with PP > 1
            want["output_layer.weight"] = want["embedding.word_embeddings.weight"]
        for tp, pp in LAYOUTS:
            files = sorted(tmp_path.glob(f"{method}-{tied}-{output_lmo}-tp{tp}pp{pp}-rank*.pt"))
            assert len(files) == 4 // tp  # every DP replica and PP stage: TP rank 0 of each
            seen: set[str] = set()
            for file in files:
                for name, tensor in torch.load(file).items():
                    assert torch.equal(tensor, want[name]), (method, tp, pp, file.name, name)
                    seen.add(name)
            expected = set(want) - ({"output_layer.weight"} if tied and pp == 1 else set())
            assert seen == expected, (method, tp, pp, expected ^ seen)


def _four_losses(run_dir: Path, nproc: int, layout: list[str], data: tuple[str, str]) -> dict[int, float]:
    prefix, tokenizer = data
    args = [*TINY_MODEL, *layout, "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4",
            "--log-interval", "1", "--scion-ns-backend", "svd", "--data-path", prefix, "--tokenizer-model", tokenizer,
            "--run-dir", str(run_dir)]
    result = torchrun(nproc, args)
    assert result.returncode == 0, result.stderr[-3000:]
    return train_losses(run_dir)


def test_first_losses_tp2pp2_equal_tp1(tmp_path, embedded_data):
    tp1 = _four_losses(tmp_path / "tp1", 1, [], embedded_data)
    tp2pp2 = _four_losses(tmp_path / "tp2pp2", 4, ["--tensor-model-parallel-size", "2",
                                                    "--pipeline-model-parallel-size", "2"], embedded_data)
    assert sorted(tp1) == sorted(tp2pp2) == [1, 2, 3, 4]
    for step in tp1:
        assert abs(tp2pp2[step] - tp1[step]) <= 1e-5, (step, tp1[step], tp2pp2[step])
