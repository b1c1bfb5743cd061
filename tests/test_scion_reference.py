"""Reference Scion against explicit hand-written update loops."""

import copy
import io
import math

import pytest
import torch

from disco_megatron.optim.lmo import bias_rms, embedding_row_rms, row_norm, spectral
from disco_megatron.optim.scion import Scion, ScionLight, apply_update_, update_momentum_


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# (name, shape, lmo, lr, radius): two same-shape hidden matrices (batched NS), a tall one,
# an embedding, an output layer and a bias, with per-group lr and radius.
LAYERS = [
    ("hidden_a", (16, 32), "spectral", 0.05, 3.0),
    ("hidden_b", (16, 32), "spectral", 0.05, 3.0),
    ("hidden_c", (32, 16), "spectral", 0.05, 3.0),
    ("embedding", (40, 16), "embedding", 0.2, 1.5),
    ("output", (40, 16), "rownorm", 0.02, 50.0),
    ("bias", (16,), "bias_rms", 0.1, 0.5),
]
HAND_LMO = {
    "spectral": lambda d: spectral(d, backend="svd"),
    "embedding": embedding_row_rms,
    "rownorm": row_norm,
    "bias_rms": bias_rms,
}


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = _gen(seed)
    return {name: torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
            for name, shape, *_ in LAYERS}


def _grads(steps: int, seed: int = 100) -> list[dict[str, torch.Tensor]]:
    gen = _gen(seed)
    return [{name: torch.randn(shape, generator=gen, dtype=torch.float64)
             for name, shape, *_ in LAYERS} for _ in range(steps)]


def _groups(params, **common):
    by_lmo: dict[str, dict] = {}
    for name, _, lmo, lr, radius in LAYERS:
        group = by_lmo.setdefault(lmo, {"params": [], "lmo": lmo, "lr": lr, "radius": radius})
        group["params"].append(params[name])
    return [{**g, **common} for g in by_lmo.values()]


def _hand_scion(params, grads, *, momentum, constrained, weight_decay):
    """Explicit Scion formulas, layer by layer, no batching, exact SVD polar factor."""
    W = {k: v.detach().clone() for k, v in params.items()}
    d = {k: torch.zeros_like(v) for k, v in W.items()}
    for g in grads:
        for name, _, lmo, lr, radius in LAYERS:
            d[name] = (1 - momentum) * d[name] + momentum * g[name]
            w = W[name] * (1 - lr * weight_decay)
            if constrained:
                w = (1 - lr) * w
            W[name] = w - lr * radius * HAND_LMO[lmo](d[name])
    return W


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("constrained,weight_decay", [(False, 0.0), (True, 0.0), (False, 0.3),
                                                       (True, 0.3)])
def test_matches_hand_loop(steps, constrained, weight_decay):
    params = _params()
    grads = _grads(steps)
    expected = _hand_scion(params, grads, momentum=0.1, constrained=constrained,
                           weight_decay=weight_decay)
    opt = Scion(_groups(params, constrained=constrained, weight_decay=weight_decay,
                        ns_backend="svd"), momentum=0.1)
    for g in grads:
        for name, p in params.items():
            p.grad = g[name].clone()
        opt.step()
    for name, p in params.items():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-10, msg=name)
        assert not torch.equal(p.detach(), _params()[name].detach())


def test_ns5_step_matches_hand_ns5():
    """Batched NS5 inside the optimizer equals per-matrix NS5 by hand."""
    gen = _gen(1)
    params = [torch.randn(16, 32, generator=gen).requires_grad_() for _ in range(3)]
    grads = [torch.randn(16, 32, generator=gen) for _ in range(3)]
    expected = [p.detach() - 0.1 * 2.0 * spectral(0.5 * g, backend="ns5")
                for p, g in zip(params, grads)]
    opt = Scion(params, lr=0.1, radius=2.0, momentum=0.5, lmo="spectral", ns_backend="ns5")
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)


def test_update_helpers_hand_values():
    buf = torch.full((2,), 4.0)
    update_momentum_(buf, torch.full((2,), 2.0), 0.25)  # 0.75·4 + 0.25·2
    torch.testing.assert_close(buf, torch.full((2,), 3.5))
    W = torch.ones(2, 2)
    apply_update_(W, torch.ones(2, 2), lr=0.1, radius=2.0, constrained=True, weight_decay=0.5)
    # 1·(1 − 0.1·0.5)·(1 − 0.1) − 0.1·2·1 = 0.855 − 0.2
    torch.testing.assert_close(W, torch.full((2, 2), 0.655))
    W = torch.ones(2)
    apply_update_(W, torch.ones(2), lr=0.1, radius=2.0, constrained=False, weight_decay=0.0)
    torch.testing.assert_close(W, torch.full((2,), 0.8))


def test_momentum_is_weight_of_new_gradient():
    W = torch.zeros(4, 8, requires_grad=True)
    g1 = torch.randn(4, 8, generator=_gen(2))
    g2 = torch.randn(4, 8, generator=_gen(3))
    opt = Scion([W], lr=0.0, momentum=0.1, lmo="rownorm")
    W.grad = g1
    opt.step()
    buf = opt.state[W]["momentum_buffer"]
    assert buf.dtype == torch.float32
    torch.testing.assert_close(buf, 0.1 * g1)
    W.grad = g2
    opt.step()
    torch.testing.assert_close(buf, 0.09 * g1 + 0.1 * g2)


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_momentum_alpha_sets_the_direction_of_the_second_step(alpha):
    """After g₁ = 1 and g₂ = −c, d = α(1 − α − c) under d ← (1−α)d + αg, so the sign LMO's second
    step has sign(1 − α − c) per entry. α = 1 uses only the current gradient (every entry −1); at
    α = 0.25 the entries with c < 0.75 keep the first gradient's sign. The other convention
    (α weighting the OLD momentum) would flip at c = α instead."""
    c = torch.linspace(0.05, 0.95, 8).expand(4, 8)
    W = torch.zeros(4, 8, requires_grad=True)
    opt = Scion([W], lr=1.0, radius=1.0, momentum=alpha, lmo="sign")
    W.grad = torch.ones(4, 8)
    opt.step()
    assert torch.equal(W.detach(), torch.full((4, 8), -1 / 8))
    W.grad = -c.clone()
    opt.step()
    expected_sign = torch.sign(1 - alpha - c)
    assert (expected_sign > 0).sum() == (0 if alpha == 1.0 else 24)
    assert torch.equal(W.detach(), -1 / 8 - expected_sign / 8)


def _qkv_splits() -> list[torch.Tensor]:
    """Fused QKV of 2 GQA groups, 2 query heads each, head dim 4, interleaved per group:
    rows [q0 q1 k v | q0 q1 k v] -> one Q, K, V matrix per group (non-contiguous indices ok)."""
    splits = []
    for grp in range(2):
        base = grp * 16
        splits += [torch.arange(base, base + 8), torch.arange(base + 8, base + 12),
                   torch.arange(base + 12, base + 16)]
    return splits


@pytest.mark.parametrize("backend", ["svd", "ns5"])
def test_row_splits_dualize_each_logical_matrix(backend):
    gen = _gen(4)
    W = torch.randn(32, 16, generator=gen, requires_grad=True)
    g = torch.randn(32, 16, generator=gen)
    splits = _qkv_splits()
    direction = torch.empty(32, 16)
    for idx in splits:
        direction[idx] = spectral(0.1 * g[idx], backend=backend)
    expected = W.detach() - 0.1 * 2.0 * direction
    whole = W.detach() - 0.1 * 2.0 * spectral(0.1 * g, backend=backend)
    opt = Scion([W], lr=0.1, radius=2.0, lmo="spectral", ns_backend=backend,
                row_splits={W: splits})
    W.grad = g
    opt.step()
    torch.testing.assert_close(W.detach(), expected, rtol=0, atol=2e-6)
    assert (W.detach() - whole).abs().max() > 1e-2  # splitting changes the update


def test_row_splits_permuted_indices():
    """Index sets need not be contiguous: dualize gate/up halves stored interleaved."""
    W = torch.randn(8, 6, generator=_gen(5), requires_grad=True)
    g = torch.randn(8, 6, generator=_gen(6))
    even, odd = torch.arange(0, 8, 2), torch.arange(1, 8, 2)
    direction = torch.empty(8, 6)
    direction[even] = spectral(g[even], backend="svd")
    direction[odd] = spectral(g[odd], backend="svd")
    expected = W.detach() - 0.5 * direction
    opt = Scion([W], lr=0.5, momentum=1.0, ns_backend="svd", row_splits={W: [odd, even]})
    W.grad = g
    opt.step()
    torch.testing.assert_close(W.detach(), expected, rtol=0, atol=1e-6)


def test_row_splits_validation():
    W = torch.randn(8, 6, requires_grad=True)
    other = torch.randn(8, 6, requires_grad=True)
    with pytest.raises(ValueError, match="exactly once"):
        Scion([W], row_splits={W: [torch.arange(0, 5), torch.arange(4, 8)]})
    with pytest.raises(ValueError, match="exactly once"):
        Scion([W], row_splits={W: [torch.arange(0, 6)]})
    with pytest.raises(ValueError, match="not a parameter"):
        Scion([W], row_splits={other: [torch.arange(8)]})
    with pytest.raises(ValueError, match="LongTensors"):
        Scion([W], row_splits={W: [torch.arange(8.0)]})


def _run(opt, params, grads):
    for g in grads:
        for name, p in params.items():
            p.grad = g[name].clone()
        opt.step()


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_identically(param_dtype):
    params = {k: v.detach().to(param_dtype).requires_grad_() for k, v in _params().items()}
    grads = [{k: v.to(param_dtype) for k, v in g.items()} for g in _grads(4)]
    opt = Scion(_groups(params, constrained=True), momentum=0.1)
    _run(opt, params, grads[:2])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)

    resumed = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    opt2 = Scion(_groups(resumed, constrained=True), momentum=0.1)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer))
    for name in params:
        buf = opt2.state[resumed[name]]["momentum_buffer"]
        assert buf.dtype == torch.float32
        assert torch.equal(buf, opt.state[params[name]]["momentum_buffer"])
    _run(opt, params, grads[2:])
    _run(opt2, resumed, grads[2:])
    for name in params:
        assert torch.equal(params[name], resumed[name]), name


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(),
                               torch.nn.Linear(24, 6))


def _model_groups(model, **common):
    l1, l2 = model[0], model[2]
    return [
        {"params": [l1.weight], "lmo": "spectral", "lr": 0.05, "radius": 2.0, **common},
        {"params": [l2.weight], "lmo": "rownorm", "lr": 0.02, "radius": 10.0, **common},
        {"params": [l1.bias, l2.bias], "lmo": "bias_rms", "lr": 0.01, "radius": 1.0, **common},
    ]


def _loss(model, step):
    gen = _gen(200 + step)
    x = torch.randn(8, 12, generator=gen)
    y = torch.randn(8, 6, generator=gen)
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("constrained,weight_decay", [(False, 0.0), (True, 0.1)])
def test_scion_light_equals_scion_used_as_documented(constrained, weight_decay):
    ref, light = _tiny_model(), _tiny_model()
    common = {"constrained": constrained, "weight_decay": weight_decay, "momentum": 0.1}
    opt_ref = Scion(_model_groups(ref, **common))
    opt_light = ScionLight(_model_groups(light, **common))
    for step in range(4):
        opt_ref.zero_grad()
        _loss(ref, step).backward()
        opt_ref.step()
        _loss(light, step).backward()  # no zero_grad: p.grad carries the momentum
        opt_light.step()
    for (name, p), q in zip(ref.named_parameters(), light.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-5, msg=name)
        assert not torch.equal(p, _tiny_model().get_parameter(name))
    # p.grad holds Scion's momentum scaled by 1/α, times (1−α) after the step.
    for p, q in zip(ref.parameters(), light.parameters()):
        torch.testing.assert_close(q.grad, opt_ref.state[p]["momentum_buffer"] * 0.9 / 0.1,
                                   rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="do not zero gradients"):
        opt_light.zero_grad()


def test_scion_light_state_dict_restores_grad_momentum():
    model = _tiny_model()
    opt = ScionLight(_model_groups(model))
    for step in range(2):
        _loss(model, step).backward()
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    resumed = copy.deepcopy(model)
    for p in resumed.parameters():
        p.grad = None
    opt2 = ScionLight(_model_groups(resumed))
    opt2.load_state_dict(state)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(q.grad, p.grad)
    for step in range(2, 4):
        for m, o in ((model, opt), (resumed, opt2)):
            _loss(m, step).backward()
            o.step()
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_params_without_grad_are_skipped_and_closure_returns_loss():
    a = torch.ones(4, 4, requires_grad=True)
    b = torch.ones(4, 4, requires_grad=True)
    opt = Scion([a, b], lr=0.1, lmo="sign")

    def closure():
        loss = (a * torch.arange(16.0).view(4, 4)).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(120.0)
    assert torch.equal(b, torch.ones(4, 4)) and b not in opt.state
    assert not torch.equal(a, torch.ones(4, 4))


def test_bad_configuration_raises_clear_errors():
    W = torch.ones(4, 4, requires_grad=True)
    v = torch.ones(4, requires_grad=True)
    with pytest.raises(ValueError, match="--scion-momentum"):
        Scion([W], momentum=0.0)
    with pytest.raises(ValueError, match="--scion-momentum"):
        Scion([W], momentum=1.5)
    with pytest.raises(ValueError, match="choose one of spectral"):
        Scion([W], lmo="adam")
    with pytest.raises(ValueError, match="--scion-ns-backend"):
        Scion([W], ns_backend="qr")
    with pytest.raises(ValueError, match="2-D parameters"):
        Scion([v], lmo="spectral")
    with pytest.raises(ValueError, match="1-D parameters"):
        Scion([W], lmo="bias_rms")
    with pytest.raises(ValueError, match="unknown Scion option"):
        Scion([W], betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="lr must be >= 0"):
        Scion([W], lr=-1.0)
    assert math.isclose(Scion([W]).param_groups[0]["momentum"], 0.1)
