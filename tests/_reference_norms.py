"""The reference's norm formulas (rakkit/disco ``norm_helper.calculate_norm``), re-implemented
from them with exact SVD in float64, and the HF Llama tensor of each logged matrix key: the
independent side of the norm tests on real runs.

Tolerances: fp32 statistics vs float64 ones differ by ~1e-6 relative (FP32_REL leaves room);
σ_max (rms_to_rms) by Lanczos is held to the issue's 1e-3 (SIGMA_REL), with its recorded residual
bound at most the tracker's 1e-4 tolerance (BOUND).
"""
from __future__ import annotations

import math

import torch

from disco_megatron.models.naming import hf_names
from disco_megatron.norms.matrices import param_name

FP32_REL, SIGMA_REL, BOUND = 1e-5, 1e-3, 1e-4


def reference_norms(W: torch.Tensor) -> dict[str, float]:
    """calculate_norm's formulas: W is [d_out, d_in]; a 1-D tensor is diag(b)."""
    W = W.double()
    if W.dim() == 1:
        W = torch.diag(W)
    d_out, d_in = W.shape
    singular = torch.linalg.svdvals(W)
    return {"rms_to_rms": float(singular[0]) * math.sqrt(d_in / d_out),
            "l1_to_rms": float(W.norm(dim=0).max()) / math.sqrt(d_out),
            "rms_to_inf": float(W.norm(dim=1).max()) * math.sqrt(d_in),
            "supremum": float(W.abs().max())}


def hf_name(key: str) -> str:
    """The HF tensor of a logical-matrix key (``...linear_qkv.weight:k`` -> ``...k_proj.weight``)."""
    index = {"": 0, "q": 0, "k": 1, "v": 2, "gate": 0, "up": 1}[key.partition(":")[2]]
    return hf_names(param_name(key))[index]


def hf_matrix(hf: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """That tensor in the reference's orientation (the embedding transposed)."""
    W = hf[hf_name(key)]
    return W.t() if key.startswith("embedding.") else W


def compare_norms(got: dict[str, float], W: torch.Tensor, where: str, rel: float = FP32_REL) -> float:
    """Assert the logged norms equal the reference's (``rel``; σ_max: SIGMA_REL); return σ_max's relative error."""
    expected = reference_norms(W)
    for norm, value in expected.items():
        tolerance = SIGMA_REL if norm == "rms_to_rms" else rel
        assert abs(got[norm] - value) <= tolerance * abs(value), f"{where} {norm}: logged {got[norm]} vs {value}"
    assert got.get("sigma_max_rel_bound", 0.0) <= BOUND, where
    return abs(got["rms_to_rms"] - expected["rms_to_rms"]) / expected["rms_to_rms"]
