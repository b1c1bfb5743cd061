"""Polar factor U Vᵀ of a matrix (or a stack of same-shape matrices).

The spectral LMO needs polar(G) = U Vᵀ for G = U Σ Vᵀ. Three backends (``--scion-ns-backend``):

- ``"ns5"``: quintic Newton–Schulz with the fixed (a, b, c) = (3.4445, −4.7750, 2.0315) of
  Muon. It does not converge to U Vᵀ: it pushes every singular value into a band around 1
  (about [0.7, 1.2]) in few steps, which is what the optimizer needs.
- ``"polar_express"``: Polar Express (Amsel et al. 2025, arXiv 2505.16932): a different
  optimal odd quintic per step, so the composition approximates sign(σ) best in the
  worst case; with a safety factor it converges to U Vᵀ.
- ``"svd"``: exact, via ``torch.linalg.svd``; the reference for tests.

All backends batch over leading dimensions: a stack ``[..., m, n]`` costs one call.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from disco_megatron.scion_options import check_option

NS5_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

# Polar Express degree-5 coefficients (a, b, c) of p(x) = a·x + b·x³ + c·x⁵ per step, for an
# initial spectrum in [1e-3, 1] (paper, Algorithm 1). Steps past the list reuse the last one,
# which is the classical quintic Newton–Schulz polynomial (15x − 10x³ + 3x⁵)/8.
_POLAR_EXPRESS_RAW: tuple[tuple[float, float, float], ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)

# Safety factor s (paper, section 4.4): each step but the last evaluates p(x/s), i.e. divides
# (a, b, c) by (s, s³, s⁵), so a singular value that rounding pushed slightly above the design
# interval is still mapped near 1 instead of blowing up; the input is divided by s·‖G‖_F for
# the same reason. The last polynomial is the convergent classical one and is kept as is.
POLAR_EXPRESS_SAFETY: float = 1.01
POLAR_EXPRESS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = tuple(
    (a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY**3, c / POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)

_NORM_EPS = 1e-7
# Folding a·X into B (B + a·I, then X ← B·X) saves a fused addmm's copy of the k×n X but costs one
# strided diagonal add. Measured (one thread, fp32), fold vs fused: +3% on a 96×192 X, even from 2^16
# to 10^5 elements, −1.5% on 256×512 and 512×512.
_FOLD_MIN_NUMEL = 1 << 17


# The Gram form (below) iterates on the k×k matrix X·Xᵀ instead of the k×n X: 2·k²·n + (4·L − 3)·k³
# multiply-adds for a segment of L steps against L·(2·k²·n + k³) in the standard form, so it is
# taken from n ≥ GRAM_MIN_ASPECT·k (flop ratio gram/standard for 5 NS5 steps: 0.88 at n = 2k, 0.67
# at n = 4k; times in docs/newton_schulz_precision.md).
GRAM_MIN_ASPECT = 2
# Steps per Gram segment, by backend: each segment starts again from the iteration's X (X ← Q·X, then
# X·Xᵀ), since within a segment the k×k products carry round-off that small singular values cannot
# absorb. Measured, relative difference from the fp64 iteration after 5 steps, fp32, singular values
# log-spaced in [1e-6, 1]: NS5 on 64×256: standard form 6.5e-6, segments of 3: 7.2e-6, one segment
# 3.6e-4; Polar Express (larger early coefficients) on 64×256 / 128×512: standard 1.2e-5 / 1.2e-5,
# segments of 2: 1.1e-5 / 1.2e-5, of 3: 2.5e-5 / 2.0e-5. In bf16 the Gram form is far off on such
# inputs even with restarts (24×80, condition 30, Polar Express, segments of 3: 0.37 against 0.03
# standard), so it runs only in fp32 and fp64.
GRAM_SEGMENT = {"ns5": 3, "polar_express": 2}
NS_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def ns_coefficients(backend: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of ``steps`` steps of an iterative backend (``ns5``, ``polar_express``)."""
    if backend == "ns5":
        return [NS5_COEFFICIENTS] * steps
    schedule = list(POLAR_EXPRESS_COEFFICIENTS[:steps])
    return schedule + [POLAR_EXPRESS_COEFFICIENTS[-1]] * (steps - len(schedule))


def gram_segments(k: int, n: int, steps: int, dtype: torch.dtype, backend: str = "ns5") -> list[int]:
    """Steps per Gram segment for a wide k×n X in ``dtype``, or [] when the standard form runs."""
    if (backend not in GRAM_SEGMENT or steps < 2 or n < GRAM_MIN_ASPECT * k
            or torch.finfo(dtype).eps > torch.finfo(torch.float32).eps):
        return []
    return [min(GRAM_SEGMENT[backend], steps - start) for start in range(0, steps, GRAM_SEGMENT[backend])]


def ns_flops(m: int, n: int, steps: int = 5, dtype: torch.dtype = torch.float32, backend: str = "ns5") -> int:
    """Flops of ``steps`` Newton–Schulz steps of ``backend`` on an m×n matrix in the form the kernel
    takes (the owner plan's cost; for ``svd`` the standard form's, a proxy)."""
    k, n = min(m, n), max(m, n)
    segments = gram_segments(k, n, steps, dtype, backend)
    if segments:
        return sum(2 * (2 * k * k * n + (4 * length - 3) * k**3) for length in segments)
    return 2 * steps * (2 * k * k * n + k**3)


def _default_dtype(G: Tensor) -> torch.dtype:
    """bf16 on CUDA (speed); on CPU fp32, or fp64 for fp64 input (exact references)."""
    if G.device.type == "cuda":
        return torch.bfloat16
    return torch.promote_types(G.dtype, torch.float32)


def _newton_schulz(G: Tensor, coefficients: list[tuple[float, float, float]], scale: float,
                   dtype: torch.dtype, backend: str) -> Tensor:
    """X ← (a·I + b·A + c·A²)·X with A = X·Xᵀ, one (a, b, c) per step, from X = G/(s·‖G‖_F).

    A tall input is copied once, transposed, into a contiguous wide buffer (X·Xᵀ is then min(m, n)²
    and every product reads rows), and the last product writes straight back into G's orientation, so
    the result is contiguous either way (the optimizer then slices its row pieces without copies).
    A wide-enough X (:func:`gram_segments`) takes the Gram form, any other the standard one.
    """
    tall = G.size(-2) > G.size(-1)
    wide = G.mT if tall else G
    k, n = wide.shape[-2:]
    # A matrix takes mm/addmm, a stack (even of one) bmm/baddbmm, as before: a stacked matrix gets the
    # same kernel whatever the count stacked with it (owner and duplicated modes stack different counts).
    shape = (k, n) if G.dim() == 2 else (math.prod(wide.shape[:-2]), k, n)
    mm, addmm = (torch.mm, torch.addmm) if G.dim() == 2 else (torch.bmm, torch.baddbmm)
    X = torch.empty(shape, dtype=dtype, device=G.device)
    norm = torch.linalg.vector_norm(wide, dim=(-2, -1), keepdim=True, dtype=torch.promote_types(dtype, G.dtype))
    torch.div(wide, norm.mul_(scale).add_(_NORM_EPS), out=X.view(wide.shape))  # the copy is the division
    segments = gram_segments(k, n, len(coefficients), dtype, backend)
    steps = _gram_steps if segments else _standard_steps
    return steps(X, torch.empty_like(X), tall, coefficients, segments, mm, addmm).view(G.shape)


def _tall(Y: Tensor) -> Tensor:
    """The spare k×n buffer viewed n×k, for a tall result written by the last product."""
    return Y.view(*Y.shape[:-2], Y.size(-1), Y.size(-2))


def _standard_steps(X: Tensor, Y: Tensor, tall: bool, coefficients: list[tuple[float, float, float]],
                    segments: list[int], mm: Callable, addmm: Callable) -> Tensor:
    """Each step three products into buffers allocated once (as fast as megatron Muon's
    ``newton_schulz``, one thread, fp32): A = X·Xᵀ; B = b·A + c·A·A fused (``addmm``); X ← a·X + B·X
    fused alike, or for a large X, a·I added to B's diagonal and X ← B·X as a plain product (no copy
    of X inside the fused product)."""
    k, n = X.shape[-2:]
    A = torch.empty((*X.shape[:-1], k), dtype=X.dtype, device=X.device)
    B = torch.empty_like(A)
    fold = k * n >= _FOLD_MIN_NUMEL
    for step, (a, b, c) in enumerate(coefficients):
        mm(X, X.mT, out=A)
        addmm(A, A, A, beta=b, alpha=c, out=B)
        if fold:
            B.diagonal(dim1=-2, dim2=-1).add_(a)
        if tall and step == len(coefficients) - 1:
            # (a·X + B·X)ᵀ = a·Xᵀ + Xᵀ·B (B is symmetric): the same products, written tall.
            return mm(X.mT, B, out=_tall(Y)) if fold else addmm(X.mT, X.mT, B, beta=a, out=_tall(Y))
        if fold:
            mm(B, X, out=Y)
        else:
            addmm(X, B, X, beta=a, out=Y)
        X, Y = Y, X
    return X


def _gram_steps(X: Tensor, Y: Tensor, tall: bool, coefficients: list[tuple[float, float, float]],
                segments: list[int], mm: Callable, addmm: Callable) -> Tensor:
    """The same iterates on the k×k Gram matrix R = X·Xᵀ of a wide X (Gram Newton–Schulz).

    X_j = Q_j·X for a k×k Q_j that is a polynomial in R, so Q_j and R commute and
    A_j = X_j·X_jᵀ = Q_j·R·Q_j; each step forms P = a·I + b·A + c·A² and Q ← P·Q with k×k products
    only, and X ← Q·X once per segment (:func:`gram_segments`), the segment's start being
    the iteration's X again (the restart that keeps ill-conditioned inputs as accurate as the
    standard form).
    """
    k = X.shape[-2]
    R, A, P, Q, T = (torch.empty((*X.shape[:-1], k), dtype=X.dtype, device=X.device) for _ in range(5))
    start = 0
    for segment, length in enumerate(segments):
        mm(X, X.mT, out=R)
        for j, (a, b, c) in enumerate(coefficients[start:start + length]):
            if j:
                mm(R, Q, out=T)
                mm(Q, T, out=A)
            base = A if j else R
            addmm(base, base, base, beta=b, alpha=c, out=P)
            P.diagonal(dim1=-2, dim2=-1).add_(a)
            if j:
                mm(P, Q, out=T)
                Q, T = T, Q
            else:
                Q, P = P, Q
        start += length
        if tall and segment == len(segments) - 1:
            return mm(X.mT, Q, out=_tall(Y))  # (Q·X)ᵀ = Xᵀ·Q (Q is symmetric), written tall
        mm(Q, X, out=Y)
        X, Y = Y, X
    return X


def _svd_polar(G: Tensor, dtype: torch.dtype) -> Tensor:
    """Exact polar factor; directions with σ ≤ tol map to 0 (as Newton–Schulz maps 0 to 0)."""
    X = G.to(torch.promote_types(dtype, torch.float32))
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    tol = S.amax(dim=-1, keepdim=True) * max(X.shape[-2:]) * torch.finfo(X.dtype).eps
    mask = (S > tol).to(X.dtype)
    return (U * mask.unsqueeze(-2)) @ Vh


def orthogonalize(
    G: Tensor,
    backend: str = "ns5",
    steps: int = 5,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Polar factor U Vᵀ of each matrix of ``G`` (``[..., m, n]``), in G's dtype.

    ``dtype`` is the compute precision: by default bf16 on CUDA, and on CPU fp32 (fp64 for
    fp64 input); the SVD backend always computes in at least fp32. ``steps`` is ignored by
    ``"svd"``.
    """
    check_option("ns_backend", backend)
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix [..., m, n], got shape {tuple(G.shape)}")
    if backend != "svd":
        check_option("ns_steps", steps)
    compute_dtype = dtype if dtype is not None else _default_dtype(G)
    if backend == "svd":
        out = _svd_polar(G, compute_dtype)
    else:
        scale = 1.0 if backend == "ns5" else POLAR_EXPRESS_SAFETY
        out = _newton_schulz(G, ns_coefficients(backend, steps), scale, compute_dtype, backend)
    return out.to(G.dtype)
