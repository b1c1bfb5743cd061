"""TransformerEngine / FP8 paths: recipe checks, precision of the master-weight refresh, TE-spec names.

Bounds used below (round to nearest; ``u`` = half the relative spacing of a format):

- bf16 keeps 8 significant bits: ``|bf16(x) - x| <= 2^-8 |x|``.
- e4m3 keeps 4 significant bits (``u = 2^-4``) down to its smallest normal ``2^-6``; below, the
  spacing is the fixed subnormal step ``2^-9``. With per-tensor scaling ``q = e4m3(s x)`` and
  ``s = 448 / amax(x)`` (448: the largest e4m3 value, so nothing saturates) the dequantised
  ``q / s`` is off by ``|q/s - x| <= max(2^-4 |x|, 2^-10 / s)``.

The optimizer's fp32 master ``m`` equals the fp32 reference ``r`` up to round-off ``d = |m - r|``
(measured); the refreshed model weight ``Q(m)`` then obeys ``|Q(m) - r| <= bound(|r| + d) + d``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_map

from _dist import free_port, run_workers
from test_scion_megatron import SCION, _reference

from disco_megatron.config import ConfigError, ModelConfig
from disco_megatron.models.fp8 import FP8_RECIPES, MIN_TE_VERSION, check_fp8_flags, fp8_problem

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
             seq_length=16, vocab_size=128, make_vocab_size_divisible_by=64)
BF16_U = 2.0 ** -8
E4M3_U = 2.0 ** -4
E4M3_SUBNORMAL_HALF_STEP = 2.0 ** -10
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
FP32_SLACK = 1 + 2.0 ** -20  # fp32 round-off of the scaling multiply and of 1/s
HIDDEN_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")  # TE makes these weights FP8


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor current scaling: (e4m3 data of s x, 1/s) with s = 448 / amax(x)."""
    amax = x.detach().abs().max().float()
    scale = E4M3_MAX / amax if amax > 0 else torch.tensor(1.0)
    return (x.detach().float() * scale).to(torch.float8_e4m3fn), (1.0 / scale).reshape(1)


class EmulatedFp8Tensor(torch.Tensor):
    """TE's QuantizedTensor protocol on the CPU: e4m3 data, per-tensor scale, nominal dtype.

    As in TE, ``copy_`` into it quantises and other ops see the dequantised value; unlike TE,
    any other in-place op raises, so an optimizer touching FP8 data directly fails the test.
    """

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype):
        self = torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=dtype, device=data.device)
        self._data, self._scale_inv = data, scale_inv
        return self

    @classmethod
    def quantized(cls, x: torch.Tensor, dtype: torch.dtype) -> "EmulatedFp8Tensor":
        return cls(*quantize_e4m3(x), dtype)

    def dequantize(self, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self._data.float() * self._scale_inv).to(dtype or self.dtype)

    def quantize_(self, src: torch.Tensor) -> "EmulatedFp8Tensor":
        data, scale_inv = quantize_e4m3(src)
        self._data.copy_(data)
        self._scale_inv.copy_(scale_inv)
        return self

    def detach(self) -> "EmulatedFp8Tensor":
        return EmulatedFp8Tensor(self._data, self._scale_inv, self.dtype)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.detach.default:
            return args[0].detach()
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            src = src.dequantize() if isinstance(src, cls) else src
            if isinstance(dst, cls):
                return dst.quantize_(src)
            return dst.copy_(src)
        if func._schema.is_mutable:
            raise AssertionError(f"in-place {func} on FP8 data: the optimizer must step an fp32 master")
        unwrap = lambda a: a.dequantize() if isinstance(a, cls) else a  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


# ---------------------------------------------------------------- recipe and flag checks (pure)

@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_problem_version_gates(recipe: str) -> None:
    minimum = MIN_TE_VERSION[recipe]
    major, minor = (int(x) for x in minimum.split(".")[:2])
    older = f"{major}.{minor - 1}.0" if minor else f"{major - 1}.9.0"
    assert fp8_problem("hybrid", recipe, minimum, (True, "")) is None
    assert fp8_problem("e4m3", recipe, "2.20.0", None) is None
    message = fp8_problem("hybrid", recipe, older, (True, ""))
    assert message is not None and f"--fp8-recipe {recipe}" in message and minimum in message and older in message


def test_fp8_problem_names_the_flag() -> None:
    assert "--fp8-format e5m2" in fp8_problem("e5m2", "delayed", "2.5.0", None)
    assert "--fp8-recipe nvfp4" in fp8_problem("hybrid", "nvfp4", "2.5.0", None)
    assert "not importable" in fp8_problem("hybrid", "delayed", None, None)
    message = fp8_problem("hybrid", "mxfp8", "2.5.0", (False, "MXFP8 needs compute capability 10.0"))
    assert "--fp8-recipe mxfp8" in message and "compute capability 10.0" in message


def test_fp8_flag_combinations() -> None:
    with pytest.raises(ConfigError, match="--fp8-param-gather .* needs --fp8-format"):
        check_fp8_flags(ModelConfig(fp8_param_gather=True, bf16=True))
    with pytest.raises(ConfigError, match="--fp8-param-gather needs --bf16"):
        check_fp8_flags(ModelConfig(transformer_impl="transformer_engine", fp8_format="hybrid", fp8_param_gather=True))
    check_fp8_flags(ModelConfig(transformer_impl="transformer_engine", fp8_format="hybrid", fp8_param_gather=True,
                                bf16=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message (no TransformerEngine)")
def test_fp8_without_transformer_engine_is_refused_with_the_flag() -> None:
    from disco_megatron.models.gpt import transformer_config

    cfg = ModelConfig(**MODEL, transformer_impl="transformer_engine", fp8_format="hybrid", bf16=True)
    with pytest.raises(ConfigError, match="--fp8-format needs TransformerEngine"):
        transformer_config(cfg, 1, 1)


def test_fp8_te_flags_reach_transformer_config(monkeypatch) -> None:
    """--fp8-format/--fp8-recipe/--fp8-param-gather/--bf16 land in megatron's TransformerConfig fields."""
    from disco_megatron.models import fp8, gpt

    built = []
    monkeypatch.setattr(fp8, "installed_te_version", lambda: "2.8.0")
    monkeypatch.setattr(fp8, "te_hardware_support", lambda recipe: (True, ""))
    monkeypatch.setattr(fp8, "fp8_recipe", lambda config: built.append(config))
    cfg = ModelConfig(**MODEL, transformer_impl="transformer_engine", fp8_format="e4m3", fp8_recipe="tensorwise",
                      fp8_param_gather=True, bf16=True)
    config = gpt.transformer_config(cfg, 1, 1)
    assert (config.fp8, config.fp8_recipe, config.fp8_param) == ("e4m3", "tensorwise", True)
    assert config.bf16 and config.params_dtype == torch.bfloat16 and built == [config]
    plain = gpt.transformer_config(dataclasses.replace(cfg, fp8_format=None, fp8_param_gather=False), 1, 1)
    assert plain.fp8 is None and not plain.fp8_param and len(built) == 1


def test_master_weight_sources() -> None:
    from disco_megatron.models.fp8 import is_quantized, master_weight

    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    bf16 = x.to(torch.bfloat16)
    assert not is_quantized(bf16) and torch.equal(master_weight(bf16), bf16.float())
    fp8 = EmulatedFp8Tensor.quantized(x, torch.bfloat16)
    assert is_quantized(fp8)
    assert torch.equal(master_weight(fp8), fp8.dequantize(dtype=torch.float32))
    assert not torch.equal(master_weight(fp8), x)  # the quantised value, not the init
    kept = {"value": x.clone()}
    fp8.get_high_precision_init_val = lambda: kept["value"]
    fp8.clear_high_precision_init_val = lambda: kept.update(value=None)
    master = master_weight(fp8)
    assert master.dtype == torch.float32 and torch.equal(master, x) and kept["value"] is None


# ---------------------------------------------------------------- master-weight refresh precision

def _bits(fp8: torch.Tensor) -> torch.Tensor:
    return fp8.view(torch.uint8)


def precision_worker(rank: int, world: int, fp8_weights: bool) -> None:
    """One Scion step on a bf16 GPTModel (optionally with emulated FP8 hidden weights) vs the fp32 reference."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from disco_megatron.models import build_gpt_model
    from disco_megatron.optim.config import ScionConfig
    from disco_megatron.optim.megatron import get_scion_optimizer
    from disco_megatron.runtime import initialize_parallel

    initialize_parallel(1, 1)
    cfg = ModelConfig(**MODEL, bf16=True)
    model = build_gpt_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(5))

    def loss(module) -> torch.Tensor:
        return module(tokens[:, :-1], torch.arange(16).expand(2, -1), None, labels=tokens[:, 1:]).float().mean()

    if fp8_weights:
        loss(model).backward()
        for p in model.parameters():
            p.main_grad, p.grad = p.grad.float(), None
        for name, module in model.named_modules():
            if name.endswith(HIDDEN_LINEARS):
                old = module.weight
                new = torch.nn.Parameter(EmulatedFp8Tensor.quantized(old.detach(), torch.bfloat16))
                for attr in ("tensor_model_parallel", "partition_dim", "partition_stride", "main_grad"):
                    setattr(new, attr, getattr(old, attr))
                module.weight = new
        chunk = model
    else:
        chunk = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        loss(chunk).backward()
        chunk.finish_grad_sync()
    config = ScionConfig(**SCION, scion_qkv_split="qkv", bf16=True)
    opt = get_scion_optimizer(config, [chunk])
    names = {p: n for n, p in model.named_parameters()}
    masters = dict(zip(opt.model_params, opt.main_params))
    assert len(masters) == len(names)
    quantized = {p for p in masters if isinstance(p, EmulatedFp8Tensor)}
    # fp32 masters, never FP8/bf16 data; megatron's torch norms stay fp32 and are their own master.
    assert all(m.dtype == torch.float32 and not isinstance(m, EmulatedFp8Tensor) and
               (m is p) == (p.dtype == torch.float32 and p not in quantized) for p, m in masters.items())
    assert len(quantized) == (4 * cfg.num_layers if fp8_weights else 0)
    start = {names[p]: m.detach().clone() for p, m in masters.items()}
    ref_params = {n: t.clone() for n, t in start.items()}
    ref = _reference(ref_params, config, model.config)
    for p in masters:
        ref_params[names[p]].grad = p.main_grad.float().clone()
    fp8_before = {p: p._data.clone() for p in quantized}
    assert opt.step()[0]
    ref.step()
    tightness = {"bf16": 0.0, "e4m3": 0.0}
    for p, m in masters.items():
        name, r = names[p], ref_params[names[p]]
        delta = (m - r).abs()
        assert delta.max() <= 1e-5 * (r - start[name]).abs().max(), f"{name}: master differs from the reference"
        if p in quantized:
            assert torch.equal(_bits(p._data), _bits(quantize_e4m3(m)[0])), \
                f"{name}: FP8 weight is not the requantised master"
            assert not torch.equal(_bits(p._data), _bits(fp8_before[p])), f"{name}: FP8 weight not refreshed"
            model_value = p.dequantize(dtype=torch.float32)
            rounding = torch.clamp(E4M3_U * (r.abs() + delta), min=E4M3_SUBNORMAL_HALF_STEP * p._scale_inv) * FP32_SLACK
            kind = "e4m3"
        elif p.dtype == torch.bfloat16:
            assert torch.equal(p.detach(), m.to(torch.bfloat16)), f"{name}: bf16 weight is not the rounded master"
            model_value = p.detach().float()
            rounding = BF16_U * (r.abs() + delta)
            kind = "bf16"
        else:
            model_value, rounding, kind = p.detach(), torch.zeros_like(r), "fp32"
        error = (model_value - r).abs()
        assert (error <= rounding + delta).all(), \
            f"{name}: |model - reference| {float((error - rounding - delta).max()):.3e} over the {kind} bound"
        if kind != "fp32":
            tightness[kind] = max(tightness[kind], float(((error - delta) / rounding).max()))
    # The bounds are tight: somewhere the rounding error reaches more than half of them.
    assert tightness["bf16"] > 0.5, tightness
    assert (tightness["e4m3"] > 0.5) == fp8_weights, tightness


@pytest.mark.parametrize("fp8_weights", [False, True], ids=["bf16-weights", "emulated-fp8-weights"])
def test_scion_step_refreshes_low_precision_weights_within_bound(fp8_weights: bool) -> None:
    run_workers(precision_worker, 1, fp8_weights)


# ---------------------------------------------------------------- TE-spec parameter names

# Parameters each TE module of megatron-core's TE spec registers (TransformerEngine modules:
# LayerNormLinear = fused norm + linear, Linear, and megatron's TENorm), with the TP partition
# dim megatron gives them (column-parallel rows 0, row-parallel columns 1, norms replicated).
TE_MODULE_PARAMS = {
    "TELayerNormColumnParallelLinear": {"layer_norm_weight": None, "layer_norm_bias": None, "weight": 0, "bias": 0},
    "TEColumnParallelLinear": {"weight": 0, "bias": 0},
    "TERowParallelLinear": {"weight": 1, "bias": None},
    "TENorm": {"weight": None, "bias": None},
    "TEDotProductAttention": {},
}
# A one-layer GPT on the TE spec (RMSNorm, no biases), then LayerNorm + biases + QK layer norm.
TE_NAMES_RMSNORM = [
    "embedding.word_embeddings.weight",
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.linear_fc2.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
]
TE_NAMES_LAYERNORM_BIAS_QK = [
    "embedding.word_embeddings.weight",
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.linear_qkv.bias",
    "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.self_attention.linear_proj.bias",
    "decoder.layers.0.self_attention.q_layernorm.weight",
    "decoder.layers.0.self_attention.q_layernorm.bias",
    "decoder.layers.0.self_attention.k_layernorm.weight",
    "decoder.layers.0.self_attention.k_layernorm.bias",
    "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
    "decoder.layers.0.mlp.linear_fc1.layer_norm_bias",
    "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.linear_fc1.bias",
    "decoder.layers.0.mlp.linear_fc2.weight",
    "decoder.layers.0.mlp.linear_fc2.bias",
    "decoder.final_layernorm.weight",
    "decoder.final_layernorm.bias",
    "output_layer.weight",
]


def _te_spec(monkeypatch, qk_layernorm: bool):
    """megatron-core's real TE layer spec, built without TransformerEngine.

    Without TE, megatron's TE wrapper classes are placeholder objects and the spec function
    lacks its ``TESpecProvider`` and TE version check; both are supplied here, nothing else.
    """
    import importlib

    from megatron.core.models.gpt import gpt_layer_specs

    provider = importlib.import_module("megatron.core.extensions.transformer_engine_spec_provider")
    monkeypatch.setattr(provider, "is_te_min_version", lambda *args, **kwargs: True)
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", provider.TESpecProvider, raising=False)
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


def _te_modules(spec, prefix: str) -> dict[str, str]:
    """Submodule path -> TE class name, walking the ModuleSpec tree as megatron builds it."""
    import megatron.core.extensions.transformer_engine as te_ext
    from megatron.core.transformer.spec_utils import ModuleSpec

    te_classes = {id(getattr(te_ext, name)): name for name in TE_MODULE_PARAMS}
    assert len(te_classes) == len(TE_MODULE_PARAMS)
    found = {}
    for field in dataclasses.fields(spec.submodules):
        value = getattr(spec.submodules, field.name)
        path = f"{prefix}{field.name}"
        if isinstance(value, ModuleSpec) and value.submodules is not None:
            found.update(_te_modules(value, path + "."))
        elif id(value.module if isinstance(value, ModuleSpec) else value) in te_classes:
            found[path] = te_classes[id(value.module if isinstance(value, ModuleSpec) else value)]
    return found


def _te_param_present(te_class: str, leaf: str, normalization: str, bias: bool) -> bool:
    """TE registers norm biases for LayerNorm only, and linear biases only with --add-bias-linear."""
    if leaf == "layer_norm_bias" or (te_class == "TENorm" and leaf == "bias"):
        return normalization == "LayerNorm"
    return bias if leaf == "bias" else True


@pytest.mark.parametrize("normalization,bias,qk_layernorm,stored", [
    ("RMSNorm", False, False, TE_NAMES_RMSNORM),
    ("LayerNorm", True, True, TE_NAMES_LAYERNORM_BIAS_QK),
], ids=["rmsnorm", "layernorm-bias-qk"])
def test_layout_maps_every_te_spec_parameter(monkeypatch, normalization: str, bias: bool, qk_layernorm: bool,
                                             stored: list[str]) -> None:
    from types import SimpleNamespace

    from disco_megatron.models.naming import param_group
    from disco_megatron.optim.layout import build_layout

    modules = _te_modules(_te_spec(monkeypatch, qk_layernorm), "decoder.layers.0.")
    expected_dims = {f"{path}.{leaf}": dim for path, te_class in modules.items()
                     for leaf, dim in TE_MODULE_PARAMS[te_class].items()
                     if _te_param_present(te_class, leaf, normalization, bias)}
    assert sorted(expected_dims) == sorted(n for n in stored if n.startswith("decoder.layers."))
    shape = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                            ffn_hidden_size=96, gated_linear_unit=True)
    rows = {"linear_qkv": (4 + 2 * 2) * 16, "linear_proj": 64, "linear_fc1": 2 * 96, "linear_fc2": 64}
    cols = {"linear_qkv": 64, "linear_proj": 4 * 16, "linear_fc1": 64, "linear_fc2": 96}
    for name in stored:
        parts = name.split(".")
        module, leaf = parts[-2], parts[-1]
        if name.startswith(("embedding.", "output_layer.")):
            full, dim = (256, 64), 0
        elif leaf == "weight" and module in rows:
            full, dim = (rows[module], cols[module]), expected_dims[name]
        elif leaf == "bias" and module in rows:
            full, dim = (rows[module],), expected_dims[name]
        else:  # norm gains and biases: layer_norm_*, q/k_layernorm, final_layernorm
            full, dim = ((16,) if module in ("q_layernorm", "k_layernorm") else (64,)), None
        group = ("gains" if len(full) == 1 else "embedding" if module == "word_embeddings" else
                 "output" if module == "output_layer" else "attention" if "self_attention" in name else "mlp")
        assert param_group(name) == group, name
        for tp in (1, 2):
            local = tuple(s // tp if i == dim else s for i, s in enumerate(full))
            layout = build_layout(name, local, shape, tp_size=tp, tp_rank=tp - 1, qkv_split="qkv")
            assert layout.partition_dim == dim, f"{name}: layout dim {layout.partition_dim}, TE/megatron {dim}"
            assert layout.lmo == ("bias_rms" if len(full) == 1 else "embedding" if group == "embedding" else
                                  "rownorm" if group == "output" else "spectral"), name


# ---------------------------------------------------------------- GPU: FP8 training end to end

def _have_te() -> bool:
    from disco_megatron.models.fp8 import have_transformer_engine

    return torch.cuda.is_available() and have_transformer_engine()


@pytest.mark.gpu
@pytest.mark.skipif(not _have_te(), reason="needs a CUDA GPU with TransformerEngine")
@pytest.mark.parametrize("weights", [[], ["--fp8-param-gather"]], ids=["bf16-weights", "fp8-weights"])
def test_fp8_training_on_gpu(tmp_path: Path, weights: list[str]) -> None:
    """20 FP8 steps (TE spec, hybrid format, bf16 or FP8 weights): loss falls, every logged norm is finite."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(free_port()),
           "-m", "disco_megatron.train", "--transformer-impl", "transformer_engine", "--fp8-format", "hybrid",
           "--fp8-recipe", os.environ.get("DISCO_FP8_RECIPE", "delayed"), "--bf16", *weights,
           "--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--ffn-hidden-size", "512",
           "--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "20",
           "--lr", "0.02", "--log-interval", "1", "--norm-log-interval", "5", "--run-dir", str(run_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    losses = [r["loss"] for r in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    records = [json.loads(line) for line in (run_dir / "norms.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    values = [v for r in records for kind in ("params", "updates") for norms in r[kind].values()
              for v in norms.values()]
    assert values and all(v is not None and v == v and abs(v) != float("inf") for v in values)
