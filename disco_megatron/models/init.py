"""Weight init that does not depend on the parallel layout: Scion's inits or megatron's normal init.

Every parameter's FULL (TP1) tensor is drawn on CPU from a generator of its own, seeded from
(``--seed``, its global name), and each rank keeps its TP shard: the same seed gives the same full
weights at every TP x PP x DP. Megatron's own init draws from the global RNG, which
``runtime.parallel.set_seeds`` offsets per pipeline stage (as Megatron-LM does), so a layer's
weights depend on which stage holds it. Names are taken in the local spec's spelling
(``naming.local_spec_name``) with global layer numbers, so the TransformerEngine spec (norms
fused into ``linear_qkv``/``linear_fc1``) draws the same streams.

``--init-method scion`` follows the Scion paper's table (docs/design.md, "Initialisation") the
way the paper's reference rakkit/disco implements it (``disco/orthognal_init.py``): hidden
matrices ``scaled_orthogonal_``, the token embedding ``scion_normal_input``, the output layer
``scion_normal_output``, or LIONS-EPFL/scion's ``Sign.init`` with ``--scion-output-lmo sign``.
The functions below build whole tensors from keyword arguments; :func:`initialize_weights` is
the thin shell that writes them into a built model stage.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from disco_megatron.config import INIT_METHODS, ModelConfig
from disco_megatron.models.naming import fuse_qkv, local_spec_name, param_rule, tp_partition_dim
from disco_megatron.models.sharding import global_param_name, shard_full_tensor

_CPU = torch.device("cpu")
# Matrices are drawn and normalised in float64, then cast to the parameter's dtype.
_DRAW_DTYPE = torch.float64


def stream(seed: int, key: str) -> torch.Generator:
    """A CPU generator seeded from (seed, key) alone: the stream of one parameter or logical matrix."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return torch.Generator(device=_CPU).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def scaled_orthogonal(shape: tuple[int, int], *, generator: torch.Generator) -> Tensor:
    """Semi-orthogonal ×√(d_out/d_in): every singular value √(d_out/d_in), RMS→RMS norm 1.

    rakkit/disco ``scaled_orthogonal_`` (``nn.init.orthogonal_`` with gain √(fan_out/fan_in)).
    """
    d_out, d_in = shape
    W = torch.empty(shape, dtype=_DRAW_DTYPE, device=_CPU)
    return torch.nn.init.orthogonal_(W, gain=math.sqrt(d_out / d_in), generator=generator)


def scion_normal(shape: tuple[int, int], *, scale_type: str, generator: torch.Generator) -> Tensor:
    """Gaussian with every row (dim 1 normalised) rescaled: rakkit/disco ``scion_normal_``, ``norm_axis=1``.

    ``scale_type="input"`` (``scion_normal_input``, the ``[vocab, hidden]`` embedding): ‖row‖₂ =
    √d, each token's vector has RMS 1 (ℓ1→RMS norm 1). ``"output"`` (``scion_normal_output``, the
    ``[vocab, hidden]`` output layer): ‖row‖₂ = 1/√d (RMS→∞ norm max_j ‖row_j‖₂·√d_in = 1).
    """
    d = shape[1]
    targets = {"input": math.sqrt(d), "output": 1.0 / math.sqrt(d)}
    if scale_type not in targets:
        raise ValueError(f"unknown scale_type {scale_type!r}; choose one of {', '.join(targets)}")
    X = torch.randn(shape, generator=generator, dtype=_DRAW_DTYPE, device=_CPU)
    return X.mul_(targets[scale_type] / X.norm(dim=1, keepdim=True))


def random_sign(shape: tuple[int, int], *, generator: torch.Generator) -> Tensor:
    """Entries ±1/d_in with a fair coin: LIONS-EPFL/scion ``Sign.init`` (normalized), RMS→∞ norm 1."""
    coin = torch.randint(0, 2, shape, generator=generator, dtype=_DRAW_DTYPE, device=_CPU)
    return (2 * coin - 1) / shape[1]


def normal(shape: tuple[int, ...], *, std: float, generator: torch.Generator) -> Tensor:
    """N(0, std²) entries: megatron's ``init_method_normal``."""
    return torch.randn(shape, generator=generator, dtype=_DRAW_DTYPE, device=_CPU).mul_(std)


def full_init(name: str, shape: tuple[int, ...], *, method: str, seed: int, model: ModelConfig,
              output_lmo: str = "rownorm") -> Tensor:
    """The full (TP1) initial tensor of the parameter with global name ``name`` and full ``shape``.

    Scion: hidden matrices per logical matrix (Q, K, V of a fused ``linear_qkv``; gate and up of a
    SwiGLU ``linear_fc1``), as the reference's models hold them (separate wq/wk/wv, w1/w3).
    Megatron: N(0, σ) with σ = ``--init-method-std``, divided by √(2·layers) for ``linear_proj``
    and ``linear_fc2`` (megatron-core's ``scaled_init_method_normal``). Either way 1-D norm
    weights are ones and biases zeros (megatron's defaults); a tied output layer is the embedding.
    """
    if method not in INIT_METHODS:
        raise ValueError(f"--init-method {method}: choose one of {', '.join(INIT_METHODS)}")
    local = local_spec_name(name)
    role = param_rule(local).role
    if role == "output" and not model.untie_embeddings_and_output_weights:
        local, role = "embedding.word_embeddings.weight", "embedding"
    if len(shape) == 1:
        fill = 0.0 if local.endswith(".bias") else 1.0
        return torch.full(shape, fill, dtype=_DRAW_DTYPE, device=_CPU)

    def gen(part: str = "") -> torch.Generator:
        return stream(seed, local + part)

    if method == "megatron":
        std = model.init_method_std
        if role in ("proj", "fc2"):
            std /= math.sqrt(2.0 * model.num_layers)
        return normal(shape, std=std, generator=gen())
    if role in ("embedding", "position_embedding"):
        return scion_normal(shape, scale_type="input", generator=gen())
    if role == "output":
        if output_lmo == "sign":
            return random_sign(shape, generator=gen())
        return scion_normal(shape, scale_type="output", generator=gen())
    if role == "qkv":
        heads, groups = model.num_attention_heads, model.query_groups
        head_dim = shape[0] // (heads + 2 * groups)
        q, k, v = (scaled_orthogonal((rows * head_dim, shape[1]), generator=gen(f".{part}"))
                   for part, rows in (("q", heads), ("k", groups), ("v", groups)))
        return fuse_qkv(q, k, v, heads, groups)
    if role == "fc1" and model.swiglu:
        half = (shape[0] // 2, shape[1])
        return torch.cat([scaled_orthogonal(half, generator=gen(f".{part}")) for part in ("gate", "up")])
    return scaled_orthogonal(shape, generator=gen())


@torch.no_grad()
def initialize_weights(model: torch.nn.Module, cfg: ModelConfig, *, method: str, seed: int,
                       output_lmo: str = "rownorm", vp_stage: int = 0, vp_size: int = 1) -> None:
    """Overwrite every parameter of this rank's model chunk ``vp_stage`` (of ``vp_size``, the virtual
    pipeline) with its TP shard of :func:`full_init`.

    Call after building the stage and before DDP or the optimizer copy the weights (fp32 masters).
    One full tensor exists at a time; the TP size and rank come from megatron's parallel_state.
    """
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    for name, param in model.named_parameters():
        global_name = global_param_name(name, pp_rank, cfg.num_layers, pp, vp_stage, vp_size)
        dim = tp_partition_dim(global_name)
        shape = list(param.shape)
        if dim is not None:
            shape[dim] *= tp
        full = full_init(global_name, tuple(shape), method=method, seed=seed, model=cfg, output_lmo=output_lmo)
        param.copy_(shard_full_tensor(global_name, full, tp_rank, tp, dim, cfg.swiglu))
        del full  # before the next one is drawn
