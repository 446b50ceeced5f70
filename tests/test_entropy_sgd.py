"""Entropy-SGD (Chaudhari et al., ICLR 2017): reduction to SGD, outer steps against Algorithm 1
computed by hand (paper form and the official code's options), scoping, the closure protocol
(L calls, fresh batches), exact resume."""

import copy
import math

import pytest
import torch
from torch import nn

from ssl_suite.optim import protocol
from ssl_suite.optim.entropy_sgd import (CODE_LUA, CODE_PYTHON, EntropySGD, growth_rate,
                                         scoped_gamma)

D = torch.float64
# "minibatches" of a quadratic: f_k(x) = 1/2 sum_i a_i (x_i - b_{k,i})^2, call k uses batch k % 4
A = torch.tensor([1.0, 3.0, 0.5], dtype=D)
B = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5], [-1.0, 2.0, 1.0], [0.0, 0.5, 0.3]],
                 dtype=D)
X0 = torch.tensor([0.3, -0.7, 1.1], dtype=D)


def _grad(x, k):
    return A * (x - B[k % len(B)])


def _closure(opt, x, calls):
    """A fresh batch on every call (batch index = number of calls so far)."""
    def closure():
        opt.zero_grad(set_to_none=True)
        k = len(calls)
        calls.append(x.detach().clone())
        loss = 0.5 * (A * (x - B[k % len(B)]).square()).sum()
        loss.backward()
        return loss.detach().reshape(1)
    return closure


def _reference(steps, L, lr, g0, g1, eta, eps, alpha, wd=0.0, mom=0.0, nesterov=False,
               smom=0.0, snest=True, scale=True, formula="paper", outer_wd=False,
               wd_in_mom=True, seed=0):
    """Algorithm 1 (and the code variants) written out for one parameter, by hand."""
    gen = torch.Generator().manual_seed(seed)
    x, calls, buf = X0.clone(), 0, None
    for t in range(steps):
        gamma = g0 * (1 + g1) ** t
        xp, mu, sbuf = x.clone(), x.clone(), None
        for _ in range(L):
            d = _grad(xp, calls)
            calls += 1
            if wd_in_mom:
                d = d + wd * xp
            if smom:
                sbuf = d.clone() if sbuf is None else smom * sbuf + d
                d = d + smom * sbuf if snest else sbuf.clone()
            if not wd_in_mom:
                d = d + wd * xp
            d = d - gamma * (x - xp)
            xp = xp - eta * d
            if eps:
                z = torch.randn(xp.shape, generator=gen, dtype=D)
                if formula == "paper":
                    xp = xp + math.sqrt(eta) * eps * z
                else:                                 # dx' += eps/sqrt(.5 eta) z; x' -= eta dx'
                    xp = xp - eta * (eps / math.sqrt(0.5 * eta)) * z
            mu = (1 - alpha) * mu + alpha * xp
        G = (x - mu) * (gamma if scale else 1.0)
        if outer_wd:
            G = G + wd * x
        if mom:
            buf = G.clone() if buf is None else mom * buf + G
            G = G + mom * buf if nesterov else buf
        x = x - lr * G
    return x


def _run(steps, **kw):
    x = nn.Parameter(X0.clone())
    opt = EntropySGD([x], **kw)
    calls = []
    for _ in range(steps):
        opt.step(_closure(opt, x, calls))
    return x.detach(), calls


def test_scoping_schedule_by_hand():
    assert scoped_gamma(0.03, 1e-3, 0) == 0.03
    assert scoped_gamma(0.03, 1e-3, 5) == pytest.approx(0.03 * 1.001 ** 5, rel=1e-15)
    assert scoped_gamma(0.03, 0.5, 10, gamma_max=1.0) == 1.0
    assert growth_rate(1e4, 100) == pytest.approx(10 ** 0.04 - 1)
    x = nn.Parameter(X0.clone())
    opt = EntropySGD([x], L=2, gamma0=0.1, gamma1=0.5, gamma_max=0.3)
    seen = []
    for _ in range(4):
        seen.append(opt.gamma())
        opt.step(_closure(opt, x, []))
    assert seen == pytest.approx([0.1, 0.15, 0.225, 0.3])
    assert opt.t == 4
    opt2 = EntropySGD([nn.Parameter(X0.clone())], gamma0=0.03, gamma_growth=1e4, total_steps=50)
    assert scoped_gamma(0.03, opt2.param_groups[0]["gamma1"], 50) == pytest.approx(300.0)


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_outer_step_paper_form_by_hand(noise):
    kw = dict(L=3, lr=0.7, gamma0=0.4, gamma1=0.2, sgld_lr=0.1, noise=noise, alpha=0.75)
    got, calls = _run(3, **kw)
    want = _reference(3, 3, 0.7, 0.4, 0.2, 0.1, noise, 0.75)
    assert len(calls) == 9                          # closure called L times per outer step
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the gamma factor and the noise matter: dropping them changes the result
    assert not torch.allclose(got, _reference(3, 3, 0.7, 0.4, 0.2, 0.1, noise, 0.75,
                                              scale=False))


def test_first_outer_step_written_out():
    """L = 3, no noise, one step, every line of Algorithm 1 spelled out (gamma0 = 0.5)."""
    x = nn.Parameter(X0.clone())
    opt = EntropySGD([x], L=3, lr=0.9, gamma0=0.5, gamma1=0.0, sgld_lr=0.2, noise=0.0,
                     alpha=0.75)
    opt.step(_closure(opt, x, []))
    x0 = X0
    xp1 = x0 - 0.2 * (A * (x0 - B[0]))
    xp2 = xp1 - 0.2 * (A * (xp1 - B[1]) - 0.5 * (x0 - xp1))
    xp3 = xp2 - 0.2 * (A * (xp2 - B[2]) - 0.5 * (x0 - xp2))
    mu = x0
    for xp in (xp1, xp2, xp3):
        mu = 0.25 * mu + 0.75 * xp
    torch.testing.assert_close(x.detach(), x0 - 0.9 * 0.5 * (x0 - mu), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("preset", ["lua", "python"])
def test_official_code_options_by_hand(preset):
    wd = 0.05
    if preset == "lua":
        kw = dict(CODE_LUA, L=3, lr=0.5, gamma0=0.3, gamma1=0.1, sgld_lr=0.1, noise=0.02,
                  weight_decay=wd, noise_seed=7)
        want = _reference(3, 3, 0.5, 0.3, 0.1, 0.1, 0.02, 0.25, wd=wd, smom=0.9, snest=True,
                          scale=False, formula="code", wd_in_mom=False, seed=7)
    else:
        kw = dict(CODE_PYTHON, L=3, lr=0.5, gamma0=0.3, sgld_lr=0.1, noise=0.02,
                  weight_decay=wd, noise_seed=7)
        want = _reference(3, 3, 0.5, 0.3, 0.0, 0.1, 0.02, 0.25, wd=wd, mom=0.9, nesterov=True,
                          smom=0.9, snest=True, scale=False, formula="code", outer_wd=True,
                          wd_in_mom=True, seed=7)
    got, _ = _run(3, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sgld_momentum_without_nesterov_and_outer_momentum_by_hand():
    kw = dict(L=2, lr=0.3, gamma0=0.2, gamma1=0.0, sgld_lr=0.1, noise=0.0, alpha=0.5,
              sgld_momentum=0.5, sgld_nesterov=False, momentum=0.8, weight_decay=0.1)
    got, _ = _run(3, **kw)
    want = _reference(3, 2, 0.3, 0.2, 0.0, 0.1, 0.0, 0.5, wd=0.1, mom=0.8, smom=0.5,
                      snest=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


@pytest.mark.parametrize("form", ["code", "paper"])
def test_L1_no_noise_reduces_to_sgd(form):
    """L = 1, no noise, alpha = 1: x' = x - eta' g, mu = x', outer direction [gamma] eta' g, i.e.
    SGD with lr_sgd = lr eta' [gamma]; momentum, Nesterov, weight decay and an LR scheduler."""
    m1 = _mlp()
    m2 = copy.deepcopy(m1)
    eta, lr, gamma = 0.5, 0.2, (0.0 if form == "code" else 2.0)
    scale = lr * eta * (1.0 if form == "code" else gamma)
    opt1 = EntropySGD(m1.parameters(), lr=lr, L=1, gamma0=gamma, gamma1=0.0, sgld_lr=eta,
                      noise=0.0, alpha=1.0, momentum=0.9, nesterov=True, weight_decay=0.01,
                      scale_by_gamma=form == "paper")
    opt2 = torch.optim.SGD(m2.parameters(), lr=scale, momentum=0.9, nesterov=True,
                           weight_decay=0.01)
    s1 = torch.optim.lr_scheduler.StepLR(opt1, step_size=2, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        xb, yb = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
        outs = []
        for m, o in ((m1, opt1), (m2, opt2)):
            def closure(m=m, o=o):
                o.zero_grad(set_to_none=True)
                losses = nn.functional.cross_entropy(m(xb), yb, reduction="none")
                losses.mean().backward()
                return losses.detach()
            outs.append(o.step(closure))
        torch.testing.assert_close(outs[0], outs[1])
        s1.step()
        s2.step()
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)


def test_closure_sees_the_sgld_iterate_and_returns_loss_at_x():
    x = nn.Parameter(X0.clone())
    opt = EntropySGD([x], L=4, lr=1.0, gamma0=0.1, gamma1=0.0, sgld_lr=0.1, noise=0.0)
    calls = []
    out = opt.step(_closure(opt, x, calls))
    assert len(calls) == 4
    torch.testing.assert_close(calls[0], X0)                    # first call at x' = x
    assert not torch.allclose(calls[1], X0)                     # later ones at x'
    torch.testing.assert_close(out, (0.5 * (A * (X0 - B[0]).square()).sum()).reshape(1))
    assert protocol.attach(opt, nn.Linear(1, 1)).handles == []  # no hooks needed
    with pytest.raises(ValueError, match="closure"):
        opt.step()


def test_closure_error_restores_x():
    x = nn.Parameter(X0.clone())
    opt = EntropySGD([x], L=3, noise=0.1)
    n = []

    def closure():
        opt.zero_grad()
        if len(n) == 2:
            raise RuntimeError("boom")
        n.append(1)
        (x.square().sum()).backward()
        return x.detach().sum().reshape(1)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    torch.testing.assert_close(x.detach(), X0)
    assert opt.t == 0


def test_state_dict_round_trip():
    kw = dict(L=2, lr=0.5, gamma0=0.2, gamma1=0.1, noise=0.05, momentum=0.9, nesterov=True,
              sgld_momentum=0.9, weight_decay=0.01)
    x = nn.Parameter(X0.clone())
    opt = EntropySGD([x], **kw)
    calls = []
    for _ in range(2):
        opt.step(_closure(opt, x, calls))
    saved = copy.deepcopy(opt.state_dict())
    x2 = nn.Parameter(x.detach().clone())
    opt2 = EntropySGD([x2], **kw)
    opt2.load_state_dict(saved)
    assert opt2.t == 2
    calls2 = list(calls)
    for _ in range(3):
        opt.step(_closure(opt, x, calls))
        opt2.step(_closure(opt2, x2, calls2))
    torch.testing.assert_close(x2.detach(), x.detach(), rtol=0, atol=0)
    # and the reference run over all 5 steps agrees (noise stream continued, not restarted)
    want = _reference(5, 2, 0.5, 0.2, 0.1, 0.1, 0.05, 0.75, wd=0.01, mom=0.9, nesterov=True,
                      smom=0.9)
    torch.testing.assert_close(x.detach(), want, rtol=1e-12, atol=1e-12)


def test_digits_run_trains():
    """Code form (lr 1, no gamma on the outer step, mu weight 0.25, SGLD Nesterov 0.9), L = 4:
    30 outer steps (120 minibatches) on digits; the train loss falls and the test accuracy
    beats chance by far."""
    from ssl_suite.analysis import small_tasks
    from ssl_suite.optim.replica_sgd import recompute_bn_stats
    data = small_tasks.digits()
    torch.manual_seed(0)
    model = small_tasks.small_cnn(width=8, batch_norm=True)
    opt = EntropySGD(model.parameters(), **dict(CODE_LUA, lr=1.0, L=4, gamma0=0.03,
                                                gamma1=1e-3, weight_decay=1e-4))
    g = torch.Generator().manual_seed(0)
    n = len(data.y_train)

    def closure():
        opt.zero_grad(set_to_none=True)
        idx = torch.randint(0, n, (64,), generator=g)
        losses = small_tasks.cross_entropy_losses(model, data.x_train[idx], data.y_train[idx])
        losses.mean().backward()
        return losses.detach()
    model.train()
    losses = [float(opt.step(closure).mean()) for _ in range(30)]
    recompute_bn_stats(model, [data.x_train[i:i + 256] for i in range(0, n, 256)])
    acc = small_tasks.accuracy(model, data.x_test, data.y_test)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    assert acc > 0.8


def test_param_groups_and_validation():
    a, b = nn.Parameter(X0.clone()), nn.Parameter(X0.clone())
    opt = EntropySGD([{"params": [a]}, {"params": [b], "lr": 0.0}], L=2, noise=0.0)
    opt.step(_closure(opt, a, []))   # b gets no gradient: untouched
    torch.testing.assert_close(b.detach(), X0)
    assert not torch.allclose(a.detach(), X0)
    for bad in (dict(L=0), dict(alpha=0.0), dict(noise_formula="x"), dict(sgld_lr=0.0),
                dict(nesterov=True)):
        with pytest.raises(ValueError):
            EntropySGD([nn.Parameter(X0.clone())], **bad)
