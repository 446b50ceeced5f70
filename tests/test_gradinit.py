"""GradInit (Zhu et al., NeurIPS 2021): lookahead against real optimizers, learning, bounds,
constraint branch, folding."""
import itertools

import pytest
import torch
from torch import nn
from torch.func import functional_call

from ssl_suite.models.gradinit import (first_step, fold_scales, gradinit, grad_norm,
                                       lookahead_loss)


def _mlp(scale=1.0, bn=False):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [
        nn.Tanh(), nn.Linear(16, 3)]
    net = nn.Sequential(*layers).double()
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith("weight") and p.dim() > 1:
                p.mul_(scale)
            if n.endswith("bias"):
                p.normal_(0, 0.1)  # non-zero so biases get multipliers too
    return net


def _batches(n=4, bsz=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, generator=g, dtype=torch.float64)
    out = []
    for _ in range(n):
        x = torch.randn(bsz, 6, generator=g, dtype=torch.float64)
        out.append((x, (x @ w).argmax(1)))
    return out


def _ce(module, batch):
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


def _real_step_loss(net, scales, optimizer, lr, S, S2, **kw):
    """Reference: fold, take one real torch.optim step on S, evaluate on S̃."""
    import copy
    net = fold_scales(copy.deepcopy(net), scales)
    opt = (torch.optim.SGD(net.parameters(), lr=lr, **kw) if optimizer == "sgd"
           else torch.optim.Adam(net.parameters(), lr=lr, **kw))
    net.eval()
    _ce(net, S).backward()
    opt.step()
    with torch.no_grad():
        return _ce(net, S2).item()


@pytest.mark.parametrize("optimizer,kw", [
    ("sgd", {}), ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    ("adam", {"betas": (0.8, 0.99), "weight_decay": 1e-2})])
def test_lookahead_matches_one_real_optimizer_step(optimizer, kw):
    net = _mlp()
    S, S2 = _batches(2)
    scales = {"0.weight": 1.7, "2.weight": 0.4, "2.bias": 2.0}
    got, _ = lookahead_loss(net, _ce, S, S2, scales, optimizer=optimizer, lr=0.05, **kw)
    want = _real_step_loss(net, scales, optimizer, 0.05, S, S2, **kw)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    # and the scales matter (the test could fail if they were ignored)
    assert got != pytest.approx(lookahead_loss(net, _ce, S, S2, optimizer=optimizer, lr=0.05,
                                               **kw)[0], rel=1e-6)


def test_first_step_formulas_and_norms():
    g = {"a": torch.tensor([3.0, -4.0]), "b": torch.tensor([0.0])}
    p = {"a": torch.zeros(2), "b": torch.zeros(1)}
    s = first_step(g, p, "sgd", lr=0.5, normalize_grad=True)
    assert torch.allclose(s["a"], torch.tensor([0.3, -0.4]))
    s = first_step(g, p, "adam", lr=0.1, eps=1e-12)
    assert torch.allclose(s["a"], torch.tensor([0.1, -0.1])) and s["b"].item() == 0.0
    assert grad_norm(g, "sgd").item() == pytest.approx(5.0)
    assert grad_norm(g, "adam").item() == pytest.approx(7.0)


@pytest.mark.parametrize("optimizer,lr,second_order", [
    ("sgd", 0.5, True), ("sgd", 0.5, False), ("adam", 0.02, True)])
def test_learned_scales_lower_lookahead_loss_and_respect_bound(optimizer, lr, second_order):
    net = _mlp(scale=4.0)  # badly scaled init: too large weights
    data = _batches(2)
    hist = []
    scales = gradinit(net, _ce, itertools.cycle(data), optimizer=optimizer, lr=lr, steps=60,
                      gamma=float("inf"), min_scale=0.05, scale_lr=0.05, progress=False,
                      second_order=second_order, history=hist)
    assert set(scales) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(h["branch"] == "objective" for h in hist)
    before, _ = lookahead_loss(net, _ce, *data, optimizer=optimizer, lr=lr)
    after, _ = lookahead_loss(net, _ce, *data, scales, optimizer=optimizer, lr=lr)
    assert after < 0.8 * before
    assert all(s >= 0.05 - 1e-12 for n, s in scales.items() if n.endswith("weight"))
    assert all(s >= 0.0 for s in scales.values())
    assert any(abs(s - 1.0) > 0.1 for s in scales.values())


def test_lower_bound_is_active_and_clamps():
    net = _mlp(scale=20.0)
    data = _batches(2)
    scales = gradinit(net, _ce, itertools.cycle(data), lr=0.5, steps=40, gamma=float("inf"),
                      min_scale=0.9, bias_min_scale=0.5, scale_lr=0.1, progress=False)
    weights = [s for n, s in scales.items() if n.endswith("weight")]
    assert min(weights) == pytest.approx(0.9)  # pinned at α, not below
    assert all(s >= 0.5 for n, s in scales.items() if n.endswith("bias"))


def test_constraint_branch_minimises_grad_norm():
    net = _mlp(scale=3.0)
    data = _batches(2)
    hist = []
    scales = gradinit(net, _ce, itertools.cycle(data), lr=0.1, steps=40, gamma=1e-8,
                      min_scale=0.01, scale_lr=0.05, progress=False, history=hist)
    assert all(h["branch"] == "constraint" for h in hist)
    _, g0 = lookahead_loss(net, _ce, *data)
    _, g1 = lookahead_loss(net, _ce, *data, scales)
    assert g1 < 0.85 * g0
    assert hist[-1]["gnorm"] < hist[0]["gnorm"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_constraint_step_descends_grad_norm_not_loss(optimizer):
    """First Adam step on m moves each m_i by -τ·sign(∂‖g‖/∂m_i): compare with central
    finite differences of ‖g(S; θ_m)‖_{p_A}, and check it is not the objective's direction."""
    net = _mlp(scale=2.0)
    data = _batches(2)
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    kw = dict(optimizer=optimizer, lr=0.05)

    def fd(which):
        out = []
        for n in names:
            vals = [lookahead_loss(net, _ce, *data, {n: 1.0 + h}, **kw)[which] for h in (1e-5, -1e-5)]
            out.append((vals[0] - vals[1]) / 2e-5)
        return torch.tensor(out)

    d_gnorm, d_loss = fd(1), fd(0)
    tau = 1e-3
    scales = gradinit(net, _ce, iter(data), steps=1, gamma=1e-8, min_scale=0.0,
                      scale_lr=tau, progress=False, **kw)
    moved = torch.tensor([scales[n] - 1.0 for n in names])
    assert torch.allclose(moved, -tau * torch.sign(d_gnorm), atol=1e-9)
    assert not torch.allclose(torch.sign(d_gnorm), torch.sign(d_loss))


def test_scale_gradient_matches_finite_differences():
    """The second-order lookahead is differentiable w.r.t. the multipliers (paper Eq. 1)."""
    from ssl_suite.models import gradinit as gi
    net = _mlp()
    S, S2 = _batches(2)
    theta0, scaled, init = gi._setup(net)
    opt_kw = dict(optimizer="sgd", lr=0.3, momentum=0.0, nesterov=False, betas=(0.9, 0.999),
                  eps=1e-8, weight_decay=0.0, normalize_grad=False)

    def f(m):
        params = gi._scaled_params(theta0, scaled, m)
        loss_after, gnorm = gi._objectives(net, _ce, S, S2, params, opt_kw, True)
        return loss_after() + 0.1 * gnorm

    assert torch.autograd.gradcheck(f, (init.clone().requires_grad_(True),))


def test_fold_reproduces_scaled_function_and_bn_mode_restored():
    net = _mlp(bn=True)
    net.train()
    data = _batches(2)
    rm = net[1].running_mean.clone()
    scales = gradinit(net, _ce, itertools.cycle(data), lr=0.2, steps=5, gamma=float("inf"),
                      scale_lr=0.1, progress=False)
    assert net.training and net[1].track_running_stats
    assert torch.equal(net[1].running_mean, rm)  # GradInit never updates BN buffers
    net.eval()
    x = data[0][0]
    scaled = {n: p * scales.get(n, 1.0) for n, p in net.named_parameters()}
    want = functional_call(net, scaled, (x,))
    fold_scales(net, scales)
    assert torch.allclose(net(x), want, atol=1e-12)
    with pytest.raises(KeyError):
        fold_scales(net, {"nope": 2.0})


def test_tiny_cnn_without_bn_runs_and_skips_zero_biases():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2))
    nn.init.zeros_(net[4].bias)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,))) for _ in range(2)]
    scales = gradinit(net, _ce, itertools.cycle(data), optimizer="adam", lr=1e-2, steps=5,
                      gamma=1e3, scale_lr=1e-2, progress=False)
    assert "4.bias" not in scales and {"0.weight", "0.bias", "4.weight"} <= set(scales)
    assert all(torch.isfinite(torch.tensor(s)) for s in scales.values())
    assert any(s != 1.0 for s in scales.values())
    with pytest.raises(ValueError):
        gradinit(net, _ce, itertools.cycle(data), optimizer="lbfgs", steps=1, progress=False)
