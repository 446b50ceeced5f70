"""LARS against the BYOL reference equations, exclusions, LR scaling and the schedule."""

import math

import pytest
import timm.optim
import torch
from torch import nn

from ssl_suite.config import OptimConfig
from ssl_suite.optim import LARS, create_optimizer, param_groups, warmup_cosine


def _reference_lars_step(w, g, m, lr, wd, eta, beta, adapt):
    """optax chain of the reference: add_weight_decay -> scale_by_lars -> scale(-lr)."""
    u = g + wd * w if adapt else g.clone()
    if adapt:
        wn, un = w.norm(), u.norm()
        trust = eta * wn / un if (wn > 0 and un > 0) else torch.tensor(1.0)
        u = trust * u
    m = beta * m + u
    return w - lr * m, m


@pytest.mark.parametrize("path", [{}, {"foreach": True}, {"compile": False, "foreach": False}])
def test_lars_matches_reference_over_steps(path):
    torch.manual_seed(1)
    w_adapt = nn.Parameter(torch.randn(5, 3))
    w_excl = nn.Parameter(torch.randn(5))
    opt = LARS([{"params": [w_adapt], "weight_decay": 1e-2, "lars_adapt": True},
                {"params": [w_excl], "weight_decay": 0.0, "lars_adapt": False}],
               lr=0.5, momentum=0.9, trust_coeff=1e-3, **path)
    ref_w = [w_adapt.detach().clone(), w_excl.detach().clone()]
    ref_m = [torch.zeros(5, 3), torch.zeros(5)]
    for _ in range(10):  # the optax chain, step by step, on fresh random gradients
        grads = [torch.randn(5, 3), torch.randn(5)]
        w_adapt.grad, w_excl.grad = grads[0].clone(), grads[1].clone()
        opt.step()
        ref_w[0], ref_m[0] = _reference_lars_step(ref_w[0], grads[0], ref_m[0], 0.5, 1e-2, 1e-3, 0.9, True)
        ref_w[1], ref_m[1] = _reference_lars_step(ref_w[1], grads[1], ref_m[1], 0.5, 0.0, 1e-3, 0.9, False)
        assert torch.allclose(w_adapt, ref_w[0], atol=1e-6)
        assert torch.allclose(w_excl, ref_w[1], atol=1e-6)


def test_lars_trust_ratio_uses_norm_of_g_plus_wd_w():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))           # ||w|| = 5
    w.grad = torch.tensor([1.0, 0.0])
    opt = LARS([w], lr=1.0, momentum=0.0, weight_decay=0.5, trust_coeff=0.1)
    opt.step()
    u = torch.tensor([1.0 + 1.5, 2.0])                   # g + wd w
    expected = torch.tensor([3.0, 4.0]) - 0.1 * 5 / u.norm() * u
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    # timm's form 0.1*5/(||g|| + wd||w||) = 0.5/3.5 would give a different step
    timm_form = torch.tensor([3.0, 4.0]) - 0.5 / 3.5 * u
    assert not torch.allclose(w.detach(), timm_form, atol=1e-4)


def test_lars_zero_weight_falls_back_to_trust_one():
    w = nn.Parameter(torch.zeros(3))
    w.grad = torch.ones(3)
    LARS([w], lr=0.1, momentum=0.0, weight_decay=0.0).step()
    assert torch.allclose(w.detach(), -0.1 * torch.ones(3))


def test_lars_step_with_closure_returns_loss():
    w = nn.Parameter(torch.ones(2))
    opt = LARS([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss
    assert opt.step(closure).item() == pytest.approx(2.0)
    assert not torch.equal(w.detach(), torch.ones(2))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(4, 2))
        self.ln = nn.LayerNorm(2)


def test_exclusions_by_module_type_and_ndim():
    net, pred = _Net(), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    groups = param_groups({"encoder": net, "predictor": pred}, weight_decay=1e-5,
                          lr_mults={"predictor": 10.0})
    lookup = {id(p): g for g in groups for p in g["params"]}
    conv, bn, lin, ln = net.body[0], net.body[1], net.body[4], net.ln
    for p in (conv.weight, lin.weight):
        assert lookup[id(p)]["weight_decay"] == 1e-5 and lookup[id(p)]["lars_adapt"]
    for p in (conv.bias, bn.weight, bn.bias, lin.bias, ln.weight, ln.bias):
        assert lookup[id(p)]["weight_decay"] == 0.0 and not lookup[id(p)]["lars_adapt"]
    assert lookup[id(pred[0].weight)]["lr_mult"] == 10.0 and lookup[id(pred[0].weight)]["lars_adapt"]
    assert lookup[id(pred[1].weight)]["lr_mult"] == 10.0 and not lookup[id(pred[1].weight)]["lars_adapt"]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters())) + 4


def test_factory_scales_lr_and_goes_through_timm_registry():
    net = _Net()
    cfg = OptimConfig(name="byollars", base_lr=0.2, weight_decay=1.5e-6, predictor_lr_mult=2.0)
    opt = create_optimizer({"encoder": net.body, "predictor": net.ln}, cfg, global_batch=4096)
    assert isinstance(opt, LARS)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([0.2 * 4096 / 256, 2 * 0.2 * 4096 / 256])
    assert all(g["trust_coeff"] == 1e-3 and g["momentum"] == 0.9 for g in opt.param_groups)
    # timm's own factory knows the name too
    assert isinstance(timm.optim.create_optimizer_v2(net, "byollars", lr=0.1), LARS)
    # any timm optimizer by name, trust_coeff dropped for those that don't take it
    sgd = create_optimizer({"encoder": net}, OptimConfig(name="momentum", base_lr=0.1), 256)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["lr"] == pytest.approx(0.1)


def test_warmup_cosine_points():
    W, K = 10, 110
    assert warmup_cosine(0, W, K) == 0.0
    assert warmup_cosine(5, W, K) == pytest.approx(0.5)
    assert warmup_cosine(W, W, K) == pytest.approx(1.0)                  # peak
    assert warmup_cosine(60, W, K) == pytest.approx(0.5)                 # half way down
    assert warmup_cosine(K, W, K) == pytest.approx(0.0, abs=1e-12)       # end
    assert warmup_cosine(35, W, K) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert warmup_cosine(K, W, K, final_frac=0.1) == pytest.approx(0.1)


def test_lars_compile_failure_falls_back_to_eager(monkeypatch):
    """compile=True on a machine where torch.compile fails: one warning, the same update."""
    def broken(*a, **k):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", broken)
    torch.manual_seed(2)
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4))
    b.data.copy_(a.data)
    g = torch.randn(4, 4)
    a.grad, b.grad = g.clone(), g.clone()
    with pytest.warns(RuntimeWarning):
        LARS([a], lr=0.1, weight_decay=1e-3, compile=True).step()
    LARS([b], lr=0.1, weight_decay=1e-3, compile=False).step()
    assert torch.allclose(a.detach(), b.detach(), atol=1e-7)
