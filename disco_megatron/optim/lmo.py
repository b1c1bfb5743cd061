"""Dualize maps (linear minimization oracles up to sign); the matching inits are ``models/init.py``.

Each map takes a gradient-like tensor G of a parameter with the nn.Linear / Megatron layout
``[d_out, d_in]`` and returns the unit-norm direction of steepest ascent in that layer's norm
(Scion subtracts ``lr·ρ·dualize(d)``). Every map returns G's shape and dtype, computes in at
least fp32, and maps a zero row / vector / matrix to zeros (no NaN).

Locality, which the distributed optimizer relies on:

- ``row_norm``, ``embedding_row_rms``: each output row depends on that row only, so a
  row-sharded shard (vocab-parallel output layer / embedding) is dualized locally, as long as
  its rows are whole (sharded along dim 0).
- ``sign``: element-wise; only the scale needs the full d_in (whole rows again).
- ``col_norm``: each column needs all rows (‖col_i‖₂ sums over d_out): NOT row-local; a
  row-sharded shard needs the column norms reduced over the shards first.
- ``bias_rms``: needs the RMS of the whole vector: local only where the vector is whole
  (replicated 1-D params); a sharded vector needs its sum of squares reduced first.
- ``spectral``: needs the whole logical matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from disco_megatron.optim.newton_schulz import orthogonalize

_EPS = 1e-12


def _compute_dtype(G: Tensor) -> torch.dtype:
    return torch.promote_types(G.dtype, torch.float32)


def _check_matrix(G: Tensor, name: str) -> None:
    if G.ndim < 2:
        raise ValueError(f"LMO {name!r} needs a matrix [d_out, d_in], got shape {tuple(G.shape)}")


def spectral(G: Tensor, backend: str = "ns5", steps: int = 5,
             dtype: torch.dtype | None = None) -> Tensor:
    """RMS→RMS dualizer √(d_out/d_in)·U Vᵀ, batched over leading dims (same-shape stack)."""
    _check_matrix(G, "spectral")
    d_out, d_in = G.shape[-2:]
    return orthogonalize(G, backend=backend, steps=steps, dtype=dtype) * math.sqrt(d_out / d_in)


def row_norm(G: Tensor) -> Tensor:
    """RMS→∞ dualizer row_j / (√d_in·‖row_j‖₂): every row gets ‖row‖₂·√d_in = 1."""
    _check_matrix(G, "rownorm")
    X = G.to(_compute_dtype(G))
    norms = X.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return (X / (norms * math.sqrt(X.size(-1)))).to(G.dtype)


def col_norm(G: Tensor) -> Tensor:
    """ℓ1→RMS dualizer col_i·√d_out / ‖col_i‖₂: every column gets RMS 1 (not row-local)."""
    _check_matrix(G, "colnorm")
    X = G.to(_compute_dtype(G))
    norms = X.norm(dim=-2, keepdim=True).clamp_min(_EPS)
    return (X * (math.sqrt(X.size(-2)) / norms)).to(G.dtype)


def embedding_row_rms(G: Tensor) -> Tensor:
    """ℓ1→RMS dualizer for a ``[vocab, hidden]`` embedding: each token row scaled to RMS 1.

    The embedding is the transpose of an nn.Linear acting on one-hot inputs, so this is
    col_norm of Gᵀ.
    """
    _check_matrix(G, "embedding")
    return col_norm(G.mT).mT


def sign(G: Tensor) -> Tensor:
    """RMS→∞ (max-norm) dualizer sign(G)/d_in."""
    _check_matrix(G, "sign")
    return torch.sign(G) / G.size(-1)


def bias_rms(b: Tensor) -> Tensor:
    """RMS dualizer b/‖b‖_RMS for 1-D gains and biases."""
    if b.ndim != 1:
        raise ValueError(f"LMO 'bias_rms' needs a 1-D tensor, got shape {tuple(b.shape)}")
    X = b.to(_compute_dtype(b))
    rms = X.square().mean().sqrt().clamp_min(_EPS)
    return (X / rms).to(b.dtype)


LMOS: dict[str, Callable[..., Tensor]] = {
    "spectral": spectral,
    "rownorm": row_norm,
    "colnorm": col_norm,
    "embedding": embedding_row_rms,
    "sign": sign,
    "bias_rms": bias_rms,
}

# Number of dimensions a parameter must have for each LMO (the matrix maps take 2-D params).
LMO_PARAM_NDIM: dict[str, int] = {name: 2 for name in LMOS} | {"bias_rms": 1}


def check_lmo_name(name: str) -> None:
    """Raise a ValueError naming the valid LMOs when ``name`` is not one of them."""
    if name not in LMOS:
        raise ValueError(f"unknown LMO {name!r}; choose one of {', '.join(LMOS)}")


def dualize(name: str, G: Tensor, *, ns_backend: str = "ns5", ns_steps: int = 5,
            ns_dtype: torch.dtype | None = None) -> Tensor:
    """Apply the LMO called ``name``; the ``ns_*`` options only matter for ``"spectral"``."""
    check_lmo_name(name)
    if name == "spectral":
        return spectral(G, backend=ns_backend, steps=ns_steps, dtype=ns_dtype)
    return LMOS[name](G)


def dualize_many(name: str, matrices: Sequence[Tensor], *, ns_backend: str = "ns5",
                 ns_steps: int = 5, ns_dtype: torch.dtype | None = None) -> list[Tensor]:
    """Dualize each tensor separately, in input order.

    Same-shape spectral matrices go through one batched ``orthogonalize`` call (stacked),
    which is where the time goes; the other maps are cheap and run one by one.
    """
    check_lmo_name(name)
    if name != "spectral":
        return [LMOS[name](G) for G in matrices]
    out: list[Tensor | None] = [None] * len(matrices)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, G in enumerate(matrices):
        by_shape.setdefault(tuple(G.shape), []).append(i)
    for indices in by_shape.values():
        stacked = torch.stack([matrices[i] for i in indices])
        result = spectral(stacked, backend=ns_backend, steps=ns_steps, dtype=ns_dtype)
        for i, r in zip(indices, result.unbind(0)):
            out[i] = r
    return out  # type: ignore[return-value]
