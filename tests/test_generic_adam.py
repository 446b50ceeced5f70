"""Generic Adam (Zou et al. 2019): update against the equations, torch's Adam/RMSprop/Adagrad as
special cases, the sufficient-condition checker, Reddi's counterexample, the mini-batch effect."""

import io
import math

import pytest
import torch
from torch import nn

from ssl_suite.analysis import (check_schedule, check_sufficient_condition, classic_adam,
                                minibatch_stationarity, rate_proxy, reddi_adam, reddi_counterexample,
                                reddi_generic_adam, reddi_gradients)
from ssl_suite.optim.generic_adam import GenericAdam

GRADS = [[0.5, -1.0, 2.0, 0.0], [-0.3, 0.7, 1.5, 0.0], [1.2, -0.2, -0.4, 0.1]]
X0 = [1.0, -2.0, 0.5, 0.3]


def _by_hand(x0, grads, lr, s, beta1, beta, r, eps, wd=0.0, eps_mode="v0", lam=1.0, lr_at=None):
    """Zou et al. Algorithm 1, one coordinate at a time with Python floats."""
    out = []
    for i, x in enumerate(x0):
        m, v = 0.0, (eps if eps_mode == "v0" else 0.0)
        for t, g_t in enumerate(grads, start=1):
            g = g_t[i] + wd * x
            alpha_t = (lr_at(t) if lr_at else lr) / t ** s
            beta_t = beta1 * lam ** (t - 1)
            theta_t = 1.0 - beta / t ** r
            v = theta_t * v + (1.0 - theta_t) * g * g
            m = beta_t * m + (1.0 - beta_t) * g
            denom = math.sqrt(v) if eps_mode == "v0" else math.sqrt(v) + eps
            x = x - (alpha_t * m / denom if denom > 0 else 0.0)   # v = 0 only where all g were 0
        out.append(x)
    return torch.tensor(out, dtype=torch.float64)


def _run(opt_kwargs, grads=GRADS, x0=X0, **kw):
    x = nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    opt = GenericAdam([x], **opt_kwargs, **kw)
    for g in grads:
        x.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return x.detach(), opt


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("hp", [
    dict(lr=0.1, s=0.5, beta1=0.8, beta=0.5, r=0.7, eps=1e-3, weight_decay=0.01),
    dict(lr=0.05, s=0.3, beta1=0.9, beta=0.2, r=1.0, eps=1e-2, eps_mode="denominator"),
    dict(lr=0.2, s=0.0, beta1=0.6, beta=1.0, r=1.0, eps=1e-6, beta1_decay=0.5),    # AdamNC, theta_1 = 0
])
def test_three_steps_match_the_equations_by_hand(hp, foreach):
    got, opt = _run(hp, foreach=foreach)
    ref = _by_hand(X0, GRADS, hp["lr"], hp["s"], hp["beta1"], hp["beta"], hp["r"], hp["eps"],
                   hp.get("weight_decay", 0.0), hp.get("eps_mode", "v0"), hp.get("beta1_decay", 1.0))
    assert torch.allclose(got, ref, rtol=0, atol=1e-12), (got, ref)
    st = opt.state[opt.param_groups[0]["params"][0]]
    assert st["step"] == 3
    th = [1 - hp["beta"] / t ** hp["r"] for t in (1, 2, 3)]
    assert st["theta_prod"] == pytest.approx(th[0] * th[1] * th[2], abs=1e-15)


def test_schedules_are_t_to_the_minus_s_and_one_minus_beta_over_t_to_the_r():
    # one coordinate, constant g = 1, beta1 = 0: v_t has the closed form and so does the step
    x, opt = _run(dict(lr=1.0, s=0.5, beta1=0.0, beta=0.5, r=2.0, eps=0.0), grads=[[1.0]] * 3, x0=[0.0])
    # theta = 1 - 0.5/t^2: 0.5, 0.875, 0.9444..; v_t = 1 - prod theta_j; step_t = t^-0.5 / sqrt(v_t)
    prods = [0.5, 0.5 * 0.875, 0.5 * 0.875 * (1 - 0.5 / 9)]
    expected = -sum(t ** -0.5 / math.sqrt(1 - p) for t, p in zip((1, 2, 3), prods))
    assert float(x[0]) == pytest.approx(expected, abs=1e-12)


def test_constant_theta_is_adam_without_bias_correction():
    # s = 0, r = 0: alpha_t = alpha, theta = 1 - beta = beta2. Hand-written Adam, no bias
    # correction, eps as the paper places it (v_0 = eps).
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    torch.manual_seed(3)
    x = nn.Parameter(torch.randn(7, 5, dtype=torch.float64))
    xr = x.detach().clone()
    m, v = torch.zeros_like(xr), torch.full_like(xr, eps)
    opt = GenericAdam([x], lr=lr, s=0.0, r=0.0, beta1=b1, beta=1 - b2, eps=eps)
    for _ in range(5):
        g = torch.randn(7, 5, dtype=torch.float64)
        x.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        xr = xr - lr * m / v.sqrt()
        assert torch.allclose(x.detach(), xr, rtol=0, atol=1e-12)


def test_bias_corrected_constant_theta_is_torch_adam_and_uncorrected_is_not():
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.99, 1e-6, 0.05
    torch.manual_seed(4)
    w0 = torch.randn(6, 4, dtype=torch.float64)
    xg, xt, xu = (nn.Parameter(w0.clone()) for _ in range(3))
    ours = GenericAdam([xg], lr=lr, s=0.0, r=0.0, beta1=b1, beta=1 - b2, eps=eps, weight_decay=wd,
                       eps_mode="denominator", bias_correction=True)
    ref = torch.optim.Adam([xt], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    raw = GenericAdam([xu], lr=lr, s=0.0, r=0.0, beta1=b1, beta=1 - b2, eps=0.0, eps_mode="denominator")
    for t in range(6):
        g = torch.randn(6, 4, dtype=torch.float64)
        for p in (xg, xt, xu):
            p.grad = g.clone()
        for o in (ours, ref, raw):
            o.step()
        assert torch.allclose(xg, xt, rtol=0, atol=1e-12)
        if t == 0:   # first step without correction: lr (1-b1)/sqrt(1-b2) |g+wd w|/(g+wd w)
            step = (w0 - xu.detach()) / lr
            assert torch.allclose(step, (1 - b1) / math.sqrt(1 - b2) * torch.sign(g + wd * w0),
                                  atol=1e-12)
    assert (xg - xu).abs().max() > 1e-3


def test_beta1_zero_constant_theta_is_torch_rmsprop():
    torch.manual_seed(5)
    w0 = torch.randn(5, 3, dtype=torch.float64)
    xg, xt = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ours = GenericAdam([xg], lr=0.01, s=0.0, r=0.0, beta1=0.0, beta=0.01, eps=1e-8,
                       eps_mode="denominator")
    ref = torch.optim.RMSprop([xt], lr=0.01, alpha=0.99, eps=1e-8)
    for _ in range(5):
        g = torch.randn(5, 3, dtype=torch.float64)
        xg.grad, xt.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(xg, xt, rtol=0, atol=1e-12)
    assert (xg - w0).abs().min() > 1e-4


def test_s_half_r_one_beta_one_is_torch_adagrad():
    # theta_t = 1 - 1/t: v_t = mean g^2, alpha/sqrt(t) / sqrt(v_t) = alpha / sqrt(sum g^2)
    torch.manual_seed(6)
    w0 = torch.randn(4, 4, dtype=torch.float64)
    xg, xt = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ours = GenericAdam([xg], lr=0.1, s=0.5, r=1.0, beta1=0.0, beta=1.0, eps=0.0, eps_mode="denominator")
    ref = torch.optim.Adagrad([xt], lr=0.1, eps=0.0)
    for _ in range(6):
        g = torch.randn(4, 4, dtype=torch.float64)
        xg.grad, xt.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(xg, xt, rtol=0, atol=1e-12)


def test_scheduler_scales_lr_and_t_to_the_minus_s_still_applies():
    x = nn.Parameter(torch.tensor(X0, dtype=torch.float64))
    opt = GenericAdam([x], alpha=0.1, s=0.5, beta1=0.8, beta=0.5, r=0.7, eps=1e-3)
    assert opt.param_groups[0]["lr"] == 0.1 and "alpha" not in opt.param_groups[0]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: [1.0, 0.5, 0.25, 0.125][k])
    for g in GRADS:
        x.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        sched.step()
    ref = _by_hand(X0, GRADS, 0.1, 0.5, 0.8, 0.5, 0.7, 1e-3,
                   lr_at=lambda t: 0.1 * [1.0, 0.5, 0.25][t - 1])
    assert torch.allclose(x.detach(), ref, rtol=0, atol=1e-12)


def test_foreach_and_single_tensor_paths_agree_with_groups_and_uneven_steps():
    torch.manual_seed(7)
    shapes = [(3, 2), (4,), (2, 2, 2)]
    runs = []
    for foreach in (True, False):
        torch.manual_seed(8)
        ps = [nn.Parameter(torch.randn(*s)) for s in shapes]
        opt = GenericAdam([{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "alpha": 0.02}],
                          lr=0.01, foreach=foreach)
        for k in range(4):
            for i, p in enumerate(ps):     # ps[1] has no gradient on step 1: its t lags by one
                p.grad = None if (i == 1 and k == 0) else torch.randn(*shapes[i])
            opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb):
        assert torch.allclose(a, b, rtol=0, atol=1e-7)
    assert [oa.state[p]["step"] for p in pa] == [4, 3, 4]
    assert oa.param_groups[1]["lr"] == 0.02


def test_zero_gradient_coordinate_with_theta1_zero_stays_finite():
    # r = 1, beta = 1: theta_1 = 0 wipes v_0 = eps; a coordinate with g = 0 has m = v = 0
    x, _ = _run(dict(lr=0.1, s=0.5, beta1=0.9, beta=1.0, r=1.0), grads=[[1.0, 0.0]] * 3, x0=[0.0, 0.5])
    assert torch.isfinite(x).all() and float(x[1]) == 0.5 and float(x[0]) < 0


def test_step_returns_closure_loss_and_state_dict_continues_identically():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    data, target = torch.randn(16, 4), torch.randn(16, 1)
    opt = GenericAdam(model.parameters(), lr=0.05, weight_decay=1e-3)

    def closure(m=model, o=None):
        (o or opt).zero_grad()
        loss = nn.functional.mse_loss(m(data), target)
        loss.backward()
        return loss

    for _ in range(3):
        with torch.no_grad():
            expected = nn.functional.mse_loss(model(data), target)
        assert torch.equal(opt.step(closure), expected)
    clone = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    clone.load_state_dict(model.state_dict())
    opt2 = GenericAdam(clone.parameters(), lr=1.0)        # hyper-parameters come from the state dict
    buf = io.BytesIO()                                    # through a checkpoint, as the engine does
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf))
    assert opt2.param_groups[0]["lr"] == 0.05
    for _ in range(3):
        opt.step(closure)
        opt2.step(lambda: closure(clone, opt2))
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    assert opt2.state[next(clone.parameters())]["step"] == 6


@pytest.mark.parametrize("bad", [dict(beta=0.0), dict(beta=1.5), dict(r=-0.5), dict(beta1=1.0),
                                 dict(eps_mode="both"), dict(lr=0.1, alpha=0.2), dict(s=-1.0)])
def test_invalid_hyper_parameters_are_refused(bad):
    with pytest.raises(ValueError, match="GenericAdam"):
        GenericAdam([nn.Parameter(torch.zeros(2))], **bad)


# ---------------------------------------------------------------------------------------------
# sufficient condition


def test_defaults_meet_the_condition_in_its_strict_reading():
    d = GenericAdam([nn.Parameter(torch.zeros(1))]).defaults
    rep = check_sufficient_condition(d["s"], d["r"], d["beta1"], d["beta"])
    assert rep.ok and rep.failed == [] and rep.min_t0 == 1
    assert rep.rate == "O(log T / T^0.5)"
    assert rep.clause("SC2.momentum").value == pytest.approx(0.81 / 0.9)
    # R(T) = sqrt(beta) H_T / sqrt(T) -> 0
    T = 10**4
    harmonic = sum(1 / t for t in range(1, T + 1))
    assert rep.rate_proxy[T] == pytest.approx(math.sqrt(0.1) * harmonic / math.sqrt(T))
    assert rep.rate_proxy[10**6] < rep.rate_proxy[10**3] / 10


def test_classic_adam_fails_the_bound_clause_only():
    rep = classic_adam(beta1=0.9, beta2=0.999, s=0.5)
    assert not rep.ok and rep.failed == ["bound.theta"]
    assert "bound.theta" in rep.explanation and "sqrt(1-beta2)" in rep.explanation
    # R(T) -> sqrt(1 - beta2) / (1 - s) = 2 sqrt(0.001) and does not fall
    assert rep.rate_proxy[10**6] == pytest.approx(2 * math.sqrt(0.001), rel=2e-3)
    assert rep.rate_proxy[10**6] > rep.rate_proxy[10**3]
    assert classic_adam(s=0.0).failed == ["bound.theta"]              # constant lr: same verdict


@pytest.mark.parametrize("s, r, failed", [
    (0.3, 0.8, ["SC3"]),                  # s < r but r > 2s: the tempting "s < r" is not the condition
    (1.0, 1.0, ["bound.alpha"]),          # T alpha_T does not grow
    (0.5, -0.2, ["SC2.range", "SC2.monotone", "bound.theta"]),   # theta_t decreases, leaves (0, 1)
    (0.25, 0.5, []),                      # r = 2s: rate T^-1/4
])
def test_checker_names_the_failing_clause(s, r, failed):
    rep = check_sufficient_condition(s, r, 0.9, 0.1)
    assert rep.failed == failed and rep.ok == (not failed)


def test_theta1_zero_fails_sc2_at_t0_1_and_passes_from_min_t0():
    rep = check_sufficient_condition(0.5, 1.0, 0.9, 1.0)      # Zou et al.'s r = 1 experiment
    assert rep.failed == ["SC2.range", "SC2.momentum"] and rep.min_t0 == 6   # 1 - 1/6 > 0.81 > 1 - 1/5
    assert check_sufficient_condition(0.5, 1.0, 0.9, 1.0, t0=6).ok
    assert not check_sufficient_condition(0.5, 1.0, 0.9, 1.0, t0=5).ok


def test_sequence_checker_agrees_with_closed_form():
    T = 20000
    t = torch.arange(1, T + 1, dtype=torch.float64)
    for s, r in [(0.5, 1.0), (0.5, 0.0), (0.3, 0.8)]:
        seq = check_schedule(0.1 * t ** -s, [0.9] * T, 1 - 0.1 / t ** r)
        closed = check_sufficient_condition(s, r, 0.9, 0.1)
        assert [n.split(".")[0] for n in seq.failed] == [n.split(".")[0] for n in closed.failed]
    warm = torch.clamp(t / 500, max=1.0)                      # linear warm-up breaks SC3: C0 = 500
    rep = check_schedule(0.1 * warm * t ** -0.5, [0.9] * T, 1 - 0.1 / t)
    assert rep.failed == ["SC3"] and rep.clause("SC3").value == pytest.approx(500.0)


def test_rate_proxy_closed_form_for_constant_theta():
    # s = 0, r = 0: R(T) = sqrt(beta) exactly
    assert rate_proxy(0.0, 0.0, 0.04, 1000) == pytest.approx(0.2, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Reddi et al. counterexample and Chen et al. mini-batch


def test_reddi_gradients_and_regret_by_hand():
    assert reddi_gradients(7).tolist() == [3.0, -1.0, -1.0, 3.0, -1.0, -1.0, 3.0]
    run = reddi_counterexample(lambda p: torch.optim.SGD(p, lr=0.25), 4, x0=0.5)
    # x: 0.5 -> -0.25 -> 0 -> 0.25 -> -0.5 ; regret_t = sum g_i x_i + |sum g_i|
    assert run.x.tolist() == [0.5, -0.25, 0.0, 0.25, -0.5]
    assert run.avg_regret.tolist() == pytest.approx([(1.5 + 3) / 1, (1.75 + 2) / 2, (1.75 + 1) / 3,
                                                     (2.5 + 4) / 4])


def test_reddi_counterexample_adam_goes_to_the_wrong_end_generic_adam_to_the_optimum():
    steps = 1500                                      # a fraction of a second
    adam = reddi_counterexample(reddi_adam(C=3.0, alpha=0.5), steps)
    generic = reddi_counterexample(reddi_generic_adam(C=3.0, alpha=0.5, r=1.0), steps)
    assert adam.final > 0.9 and float(adam.x[steps // 2:].min()) > 0.9          # stuck near +1
    assert generic.final < -0.9 and float(generic.x[steps // 2:].max()) < -0.9   # at x* = -1
    assert float(adam.avg_regret[-1]) > 0.5           # regret grows linearly
    assert float(generic.avg_regret[-1]) < 0.05       # average regret -> 0
    # the same verdict from the checker: r = 0 fails, r = 1 passes (beta1 = 0, beta = 0.9)
    assert check_sufficient_condition(0.5, 0.0, 0.0, 0.9).failed == ["bound.theta"]
    assert check_sufficient_condition(0.5, 1.0, 0.0, 0.9).ok


def test_minibatch_shrinks_the_gradient_norm_measure():
    table = minibatch_stationarity((1, 64), steps=100, runs=16)
    assert table[64] < 0.5 * table[1], table


def test_registered_in_timm_when_registry_lists_it():
    import timm.optim
    if "genericadam" not in timm.optim.list_optimizers():
        pytest.skip("genericadam not registered in ssl_suite/optim/registry.py yet")
    model = nn.Linear(3, 2)
    opt = timm.optim.create_optimizer_v2(model, "genericadam", lr=0.01, weight_decay=0.0, eps=1e-8)
    assert isinstance(opt, GenericAdam) and opt.defaults["lr"] == 0.01


def _three_steps(compile, dtype=torch.float32):
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(*shape, dtype=dtype)) for shape in [(5, 3), (7,), (2, 3, 4)]]
    groups = [dict(params=ps[:2], weight_decay=0.01),
              dict(params=ps[2:], eps_mode="denominator", bias_correction=True)]
    opt = GenericAdam(groups, lr=0.05, compile=compile)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        for g in opt.param_groups:
            g["lr"] *= 0.9                                  # a changing lr must not recompile
        opt.step()
    return [p.detach().clone() for p in ps], opt


def test_compiled_step_equals_eager_step():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)     # compiling must not fall back here
        got, opt = _three_steps(compile=True)
    assert opt.compile is True
    ref, ref_opt = _three_steps(compile=False)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (a - b).abs().max()
    for p, q in zip(opt.param_groups[0]["params"], ref_opt.param_groups[0]["params"]):
        st, rst = opt.state[p], ref_opt.state[q]
        assert st["step"] == rst["step"] == 3
        assert torch.allclose(st["exp_avg_sq"], rst["exp_avg_sq"], rtol=1e-6, atol=1e-9)


def test_failing_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    import ssl_suite.optim.generic_adam as ga

    def boom(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(ga._COMPILED, "compiled", None)  # forget any earlier compile
    monkeypatch.setattr(torch, "compile", boom)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        got, opt = _three_steps(compile=True)
    assert opt.compile is False
    ref, _ = _three_steps(compile=False)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
