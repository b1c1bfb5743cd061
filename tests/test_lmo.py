"""Dualize maps against their definitions and hand-computed values."""

import math

import pytest
import torch

from disco_megatron.optim.lmo import (
    LMOS,
    bias_rms,
    col_norm,
    dualize,
    dualize_many,
    embedding_row_rms,
    row_norm,
    sign,
    spectral,
)

# Rows [3, 4, 0, 0] (‖·‖₂ = 5), [0, 0, 0, 2] (‖·‖₂ = 2), [0, 0, 0, 0].
HAND = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rms_to_inf(W: torch.Tensor) -> torch.Tensor:
    return W.norm(dim=-1).max() * math.sqrt(W.size(-1))


@pytest.mark.parametrize("shape", [(24, 72), (72, 24), (40, 40)])
def test_spectral_singular_values_equal_scale(shape):
    G = torch.randn(*shape, generator=_gen(1))
    s = torch.linalg.svdvals(spectral(G, backend="svd").double())
    torch.testing.assert_close(s, torch.full_like(s, math.sqrt(shape[0] / shape[1])),
                               rtol=0, atol=1e-5)


def test_spectral_attains_dual_norm():
    """⟨G, spectral(G)⟩ = √(d_out/d_in)·‖G‖_nuclear: the LMO maximises over the unit ball."""
    G = torch.randn(16, 48, generator=_gen(2), dtype=torch.float64)
    inner = (G * spectral(G, backend="svd")).sum()
    expected = math.sqrt(16 / 48) * torch.linalg.matrix_norm(G, ord="nuc")
    torch.testing.assert_close(inner, expected)


def test_spectral_batched_equals_per_matrix():
    G = torch.randn(3, 16, 32, generator=_gen(3))
    out = spectral(G, backend="ns5")
    for i in range(3):
        torch.testing.assert_close(out[i], spectral(G[i], backend="ns5"), rtol=0, atol=2e-6)


def test_row_norm_hand_values():
    expected = torch.tensor([[0.3, 0.4, 0.0, 0.0],    # [3, 4, 0, 0] / (5·√4)
                             [0.0, 0.0, 0.0, 0.5],    # [0, 0, 0, 2] / (2·√4)
                             [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(row_norm(HAND), expected)


def test_row_norm_rows_have_unit_rms_to_inf():
    out = row_norm(torch.randn(10, 36, generator=_gen(4)))
    torch.testing.assert_close(out.norm(dim=1) * 6.0, torch.ones(10))
    torch.testing.assert_close(_rms_to_inf(out), torch.tensor(1.0))


def test_col_norm_hand_values():
    # Columns [3,0,0] (‖·‖=3), [4,0,0] (4), [0,0,0], [0,2,0] (2); d_out = 3.
    r3 = math.sqrt(3.0)
    expected = torch.tensor([[r3, r3, 0.0, 0.0], [0.0, 0.0, 0.0, r3], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(col_norm(HAND), expected)


def test_col_norm_columns_have_rms_one():
    out = col_norm(torch.randn(25, 8, generator=_gen(5)))
    torch.testing.assert_close(out.square().mean(dim=0).sqrt(), torch.ones(8))


def test_embedding_rows_have_rms_one():
    # Row [3, 4, 0, 0]: RMS = 5/2 -> [1.2, 1.6, 0, 0]; row [0, 0, 0, 2]: RMS = 1 -> unchanged.
    expected = torch.tensor([[1.2, 1.6, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(embedding_row_rms(HAND), expected)
    out = embedding_row_rms(torch.randn(50, 12, generator=_gen(6)))
    torch.testing.assert_close(out.square().mean(dim=1).sqrt(), torch.ones(50))


def test_sign_hand_values():
    G = torch.tensor([[-2.0, 0.0, 3.0], [1e-9, -5.0, 7.0]])
    expected = torch.tensor([[-1.0, 0.0, 1.0], [1.0, -1.0, 1.0]]) / 3.0
    torch.testing.assert_close(sign(G), expected)


def test_bias_rms_hand_values():
    # [3, 4]: RMS = √12.5.
    out = bias_rms(torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(out, torch.tensor([3.0, 4.0]) / math.sqrt(12.5))
    torch.testing.assert_close(out.square().mean().sqrt(), torch.tensor(1.0))


@pytest.mark.parametrize("name", list(LMOS))
def test_zero_input_gives_zeros(name):
    shape = (7,) if name == "bias_rms" else (6, 10)
    out = dualize(name, torch.zeros(shape))
    assert torch.equal(out, torch.zeros(shape))


@pytest.mark.parametrize("name", list(LMOS))
def test_scale_invariant_and_keeps_dtype(name):
    shape = (9,) if name == "bias_rms" else (12, 20)
    G = torch.randn(shape, generator=_gen(7))
    torch.testing.assert_close(dualize(name, 0.01 * G), dualize(name, G), rtol=1e-5, atol=2e-5)
    out = dualize(name, G.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == G.shape


@pytest.mark.parametrize("name,local", [("rownorm", True), ("embedding", True), ("sign", True),
                                        ("colnorm", False)])
def test_row_locality(name, local):
    """Row-local maps dualize a row shard on its own; col_norm does not."""
    G = torch.randn(16, 8, generator=_gen(8))
    shard_then_map = dualize(name, G[4:12])
    map_then_shard = dualize(name, G)[4:12]
    assert torch.allclose(shard_then_map, map_then_shard, atol=1e-6) == local


def test_dualize_dispatch_and_errors():
    assert set(LMOS) == {"spectral", "rownorm", "colnorm", "embedding", "sign", "bias_rms"}
    G = torch.randn(8, 16, generator=_gen(9))
    torch.testing.assert_close(dualize("spectral", G, ns_backend="svd"), spectral(G, "svd"))
    torch.testing.assert_close(dualize("rownorm", G), row_norm(G))
    with pytest.raises(ValueError, match="choose one of spectral, rownorm, colnorm"):
        dualize("frobenius", G)
    with pytest.raises(ValueError, match="1-D"):
        bias_rms(G)
    with pytest.raises(ValueError, match=r"\[d_out, d_in\]"):
        row_norm(torch.ones(4))


@pytest.mark.parametrize("name", ["spectral", "rownorm"])
def test_dualize_many_equals_one_by_one(name):
    gen = _gen(10)
    mats = [torch.randn(8, 16, generator=gen), torch.randn(16, 8, generator=gen),
            torch.randn(8, 16, generator=gen)]
    out = dualize_many(name, mats)
    assert len(out) == 3
    for G, D in zip(mats, out):
        torch.testing.assert_close(D, dualize(name, G), rtol=0, atol=2e-6)
