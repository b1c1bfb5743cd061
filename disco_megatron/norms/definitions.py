"""Norm definitions of docs/design.md §1, on full tensors, and how a layer group aggregates them.

Every norm is a function of a few sufficient statistics (σ_max, the largest squared row and
column norms, the sum of squares, the largest |w|). :func:`matrix_norms_from_stats` is the one
place the formulas live; :func:`matrix_stats` computes the statistics of a whole matrix
(exact SVD), and :mod:`disco_megatron.norms.sharded` computes the same statistics from TP
shards, so full and sharded norms cannot disagree on a definition.

W is ``[d_out, d_in]`` as in ``nn.Linear``:
``rms_to_rms = σ_max·√(d_in/d_out)``, ``rms_to_inf = max_j ‖row_j‖₂·√d_in``,
``l1_to_rms = max_i ‖col_i‖₂/√d_out``, ``frobenius``, ``rms = frobenius/√(d_out·d_in)``,
``supremum = max|w_ij|``, opt-in ``condition_number = σ_max/σ_min`` (σ_min: the
min(d_out, d_in)-th singular value; ``inf`` for a rank-deficient matrix).
1-D tensors (gains, biases) are the diagonal matrix ``diag(b)``, as the reference
(rakkit/disco ``norm_helper.calculate_norm``) treats them: σ_max = max|b|, so
``rms_to_rms = max|b|``, ``rms_to_inf = max|b|·√n``, ``l1_to_rms = max|b|/√n``,
``condition_number = max|b|/min|b|``; ``frobenius = ‖b‖₂`` and ``rms = ‖b‖₂/√n`` stay the
statistics of the stored entries (the reference logs neither).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

MATRIX_NORMS: tuple[str, ...] = ("rms_to_rms", "rms_to_inf", "l1_to_rms", "frobenius", "rms", "supremum")
CONDITION = "condition_number"
# Not a norm: the bound on σ_max's relative error that sharded (Lanczos) norms record with a matrix.
SIGMA_BOUND = "sigma_max_rel_bound"
# Group aggregation: operator norms, supremum and condition number take the max over the
# group's members (the group's worst layer); frobenius is the root-sum-square (the Frobenius
# norm of all members stacked); rms is that over the group's total entry count. A NaN member
# makes the group value NaN (a diverged layer must not hide behind max()).
MAX_NORMS: tuple[str, ...] = ("rms_to_rms", "rms_to_inf", "l1_to_rms", "supremum", CONDITION)


@dataclass(frozen=True)
class MatrixStats:
    """Sufficient statistics of a ``[d_out, d_in]`` matrix for every norm of this module."""

    d_out: int
    d_in: int
    sigma_max: float
    max_row_sq: float
    max_col_sq: float
    sum_sq: float
    max_abs: float
    sigma_min: float | None = None


@dataclass(frozen=True)
class VectorStats:
    """Sufficient statistics of a 1-D tensor."""

    numel: int
    sum_sq: float
    max_abs: float
    min_abs: float | None = None


def matrix_norms_from_stats(s: MatrixStats) -> dict[str, float]:
    """The norms of a matrix from its statistics (plus ``condition_number`` when σ_min is known)."""
    frobenius = math.sqrt(s.sum_sq)
    norms = {
        "rms_to_rms": s.sigma_max * math.sqrt(s.d_in / s.d_out),
        "rms_to_inf": math.sqrt(s.max_row_sq) * math.sqrt(s.d_in),
        "l1_to_rms": math.sqrt(s.max_col_sq) / math.sqrt(s.d_out),
        "frobenius": frobenius,
        "rms": frobenius / math.sqrt(s.d_out * s.d_in),
        "supremum": s.max_abs,
    }
    if s.sigma_min is not None:
        norms[CONDITION] = s.sigma_max / s.sigma_min if s.sigma_min > 0 else math.inf
    return norms


def vector_norms_from_stats(s: VectorStats) -> dict[str, float]:
    """The norms of ``diag(b)`` from the statistics of ``b`` (``rms``: of the n stored entries)."""
    norms = matrix_norms_from_stats(MatrixStats(
        d_out=s.numel, d_in=s.numel, sigma_max=s.max_abs, max_row_sq=s.max_abs ** 2, max_col_sq=s.max_abs ** 2,
        sum_sq=s.sum_sq, max_abs=s.max_abs, sigma_min=s.min_abs))
    norms["rms"] = norms["frobenius"] / math.sqrt(s.numel)
    return norms


def matrix_stats(W: torch.Tensor, with_condition: bool = False) -> MatrixStats:
    """Statistics of a whole matrix in float64, σ_max (and σ_min) by exact SVD."""
    if W.dim() != 2:
        raise ValueError(f"matrix norms need a 2-D tensor, got shape {tuple(W.shape)}")
    W = W.detach().double()
    singular = torch.linalg.svdvals(W)
    return MatrixStats(
        d_out=W.size(0),
        d_in=W.size(1),
        sigma_max=float(singular[0]),
        max_row_sq=float(W.square().sum(dim=1).max()),
        max_col_sq=float(W.square().sum(dim=0).max()),
        sum_sq=float(W.square().sum()),
        max_abs=float(W.abs().max()),
        sigma_min=float(singular[-1]) if with_condition else None,
    )


def matrix_norms(W: torch.Tensor, with_condition: bool = False) -> dict[str, float]:
    """Every matrix norm of ``W`` (``[d_out, d_in]``), exact; the reference for sharded norms."""
    return matrix_norms_from_stats(matrix_stats(W, with_condition))


def vector_norms(b: torch.Tensor, with_condition: bool = False) -> dict[str, float]:
    """The norms of ``diag(b)`` of a 1-D tensor, in float64 (see the module docstring)."""
    if b.dim() != 1:
        raise ValueError(f"vector norms need a 1-D tensor, got shape {tuple(b.shape)}")
    b = b.detach().double()
    return vector_norms_from_stats(VectorStats(b.numel(), float(b.square().sum()), float(b.abs().max()),
                                               float(b.abs().min()) if with_condition else None))


def aggregate_groups(norms: Mapping[str, Mapping[str, float]], numels: Mapping[str, int],
                     group_of: Callable[[str], str]) -> dict[str, dict[str, float]]:
    """Per-group norms from per-parameter norms (see ``MAX_NORMS`` for the rule).

    ``numels`` gives each parameter's global entry count, needed for the group rms.
    """
    members: dict[str, list[str]] = {}
    for name in norms:
        members.setdefault(group_of(name), []).append(name)
    groups = {}
    for group, names in members.items():
        sum_sq = sum(norms[n]["frobenius"] ** 2 for n in names)
        out = {"frobenius": math.sqrt(sum_sq), "rms": math.sqrt(sum_sq / sum(numels[n] for n in names))}
        for norm in MAX_NORMS:
            values = [norms[n][norm] for n in names if norm in norms[n]]
            if values:
                out[norm] = math.nan if any(math.isnan(v) for v in values) else max(values)
        groups[group] = out
    return groups
