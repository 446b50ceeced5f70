"""Lookahead (Zhang et al. 2019): Algorithm 1 by hand, momentum policies, bit-exact resume."""

import copy
import io

import pytest
import torch
from torch import nn

from ssl_suite.optim.factory import param_groups
from ssl_suite.optim.lars import LARS
from ssl_suite.optim.lookahead import Lookahead, wrap_lookahead

K, ALPHA = 5, 0.5


# -- a quadratic L(w) = 1/2 w^T A w - b^T w, gradient A w - b, in float64 ----------------------
def _quadratic(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = m @ m.T / n + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    w0 = torch.randn(n, generator=g, dtype=torch.float64)
    return a, b, w0


def _closure(opt, w, a, b, calls=None):
    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ a @ w - b @ w
        loss.backward()
        if calls is not None:
            calls.append(loss)
        return loss
    return closure


def test_sgd_on_quadratic_matches_algorithm_1_by_hand():
    a, b, w0 = _quadratic()
    lr, steps = 0.1, 2 * K + 3  # two full cycles, then mid-cycle
    w = nn.Parameter(w0.clone())
    la = Lookahead(torch.optim.SGD([w], lr=lr), k=K, alpha=ALPHA)
    calls = []
    for _ in range(steps):
        loss = la.step(_closure(la, w, a, b, calls))
        assert loss is calls[-1]  # the base optimizer called the closure, its loss comes back
    assert len(calls) == steps

    # Algorithm 1 written out: phi_0 = theta_0; k SGD steps; phi += alpha (theta - phi);
    # theta = phi
    phi, theta = w0.clone(), w0.clone()
    for t in range(steps):
        theta = theta - lr * (a @ theta - b)
        if (t + 1) % K == 0:
            phi = phi + ALPHA * (theta - phi)
            theta = phi.clone()
    torch.testing.assert_close(w.detach(), theta, rtol=0, atol=1e-14)
    torch.testing.assert_close(la.state[w]["slow_param"], phi, rtol=0, atol=1e-14)
    assert not torch.allclose(w.detach(), phi)  # mid-cycle: fast weights have moved on

    # the first sync pulls back towards theta_0 (timm's lazy phi would make it a no-op)
    w_plain = nn.Parameter(w0.clone())
    sgd = torch.optim.SGD([w_plain], lr=lr)
    for _ in range(K):
        sgd.step(_closure(sgd, w_plain, a, b))
    w_la = nn.Parameter(w0.clone())
    la = Lookahead(torch.optim.SGD([w_la], lr=lr), k=K, alpha=ALPHA)
    for _ in range(K):
        la.step(_closure(la, w_la, a, b))
    expected = w0 + ALPHA * (w_plain.detach() - w0)
    torch.testing.assert_close(w_la.detach(), expected, rtol=0, atol=1e-14)
    assert (w_la.detach() - w_plain.detach()).abs().max() > 1e-3


def test_alpha_one_is_the_base_optimizer_bitwise():
    a, b, w0 = _quadratic()
    w1, w2 = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    adam = torch.optim.Adam([w1], lr=0.05)
    la = Lookahead(torch.optim.Adam([w2], lr=0.05), k=3, alpha=1.0)
    for _ in range(7):
        adam.step(_closure(adam, w1, a, b))
        la.step(_closure(la, w2, a, b))
    assert torch.equal(w1, w2)


@pytest.mark.parametrize("mode", ["none", "reset", "pullback"])
def test_sgd_momentum_pullback_modes_match_hand_rolled(mode):
    a, b, w0 = _quadratic()
    lr, mu, k, steps = 0.05, 0.9, 3, 2 * 3 + 2
    w = nn.Parameter(w0.clone())
    base = torch.optim.SGD([w], lr=lr, momentum=mu)
    la = Lookahead(base, k=k, alpha=ALPHA, pullback_momentum=mode)
    for _ in range(steps):
        la.step(_closure(la, w, a, b))

    phi, theta = w0.clone(), w0.clone()
    m, m_slow = torch.zeros_like(w0), torch.zeros_like(w0)
    for t in range(steps):
        m = mu * m + (a @ theta - b)
        theta = theta - lr * m
        if (t + 1) % k == 0:
            phi = phi + ALPHA * (theta - phi)
            theta = phi.clone()
            if mode == "reset":
                m = torch.zeros_like(m)
            elif mode == "pullback":
                m_slow = m_slow + ALPHA * (m - m_slow)
                m = m_slow.clone()
    torch.testing.assert_close(w.detach(), theta, rtol=0, atol=1e-13)
    torch.testing.assert_close(base.state[w]["momentum_buffer"], m, rtol=0, atol=1e-13)
    if mode == "pullback":
        torch.testing.assert_close(la.state[w]["slow_momentum_buffer"], m_slow, rtol=0, atol=1e-13)
    else:
        assert set(la.state[w]) == {"slow_param"}


def test_adam_pullback_touches_exp_avg_only():
    a, b, w0 = _quadratic()
    runs = {}
    for mode in ("none", "reset", "pullback"):
        w = nn.Parameter(w0.clone())
        base = torch.optim.Adam([w], lr=0.05)
        la = Lookahead(base, k=K, alpha=ALPHA, pullback_momentum=mode)
        for _ in range(K):  # exactly one sync; identical up to it
            la.step(_closure(la, w, a, b))
        runs[mode] = (w.detach(), base.state[w])
    m = runs["none"][1]["exp_avg"]
    assert m.abs().min() > 0
    assert torch.count_nonzero(runs["reset"][1]["exp_avg"]) == 0
    assert torch.equal(runs["pullback"][1]["exp_avg"], ALPHA * m)  # slow copy starts at 0
    for mode in ("reset", "pullback"):
        assert torch.equal(runs[mode][0], runs["none"][0])
        assert torch.equal(runs[mode][1]["exp_avg_sq"], runs["none"][1]["exp_avg_sq"])
        assert torch.equal(runs[mode][1]["step"], runs["none"][1]["step"])


# -- resume: a small network, data fixed per step ---------------------------------------------
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


def _build(model, base_name, mode):
    if base_name == "sgd_momentum":
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    elif base_name == "adam":
        base = torch.optim.Adam(model.parameters(), lr=0.01)
    else:
        base = LARS(param_groups({"net": model}, weight_decay=1e-4), lr=0.5, momentum=0.9)
    la = Lookahead(base, k=K, alpha=ALPHA, pullback_momentum=mode)
    sched = torch.optim.lr_scheduler.LambdaLR(la, lambda s: 1.0 / (1 + 0.1 * s))
    return la, sched


def _train(model, la, sched, start, stop):
    for step in range(start, stop):
        x, y = _batch(step)

        def closure():
            la.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        la.step(closure)
        sched.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("base_name,mode", [("sgd_momentum", "none"), ("sgd_momentum", "pullback"),
                                            ("adam", "none"), ("adam", "pullback"),
                                            ("lars", "reset")])
def test_resume_mid_cycle_is_bit_identical(base_name, mode):
    n, m = 7, 9  # 7 % 5 = 2: saved mid-cycle; the continuation crosses two syncs
    ref = _model()
    la, sched = _build(ref, base_name, mode)
    _train(ref, la, sched, 0, n + m)

    model = _model()
    la, sched = _build(model, base_name, mode)
    _train(model, la, sched, 0, n)
    ckpt = _roundtrip({"model": model.state_dict(), "optimizer": la.state_dict(),
                       "scheduler": sched.state_dict()})
    assert ckpt["optimizer"]["lookahead"]["la_step"] == n % K
    assert len(ckpt["optimizer"]["lookahead"]["state"]) == len(list(model.parameters()))

    resumed = _model()
    with torch.no_grad():  # scramble, so that nothing carries over from the fresh init
        for p in resumed.parameters():
            p.add_(1.0)
    resumed.load_state_dict(ckpt["model"])
    la2, sched2 = _build(resumed, base_name, mode)
    la2.load_state_dict(ckpt["optimizer"])
    sched2.load_state_dict(ckpt["scheduler"])
    _train(resumed, la2, sched2, n, n + m)
    for p_ref, p in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(p_ref, p)

    # the bug this guards against: restoring only the base optimizer (phi and cycle lost)
    lost = _model()
    lost.load_state_dict(ckpt["model"])
    la3, sched3 = _build(lost, base_name, mode)
    la3.optimizer.load_state_dict({k: v for k, v in ckpt["optimizer"].items() if k != "lookahead"})
    sched3.load_state_dict(ckpt["scheduler"])
    _train(lost, la3, sched3, n, n + m)
    assert any(not torch.equal(p_ref, p) for p_ref, p in zip(ref.parameters(), lost.parameters()))


def test_state_dict_loads_with_weights_only_and_in_place():
    model = _model()
    la, sched = _build(model, "sgd_momentum", "pullback")
    _train(model, la, sched, 0, K + 2)  # one sync: slow momentum exists
    sd = _roundtrip(la.state_dict())
    la_sd = sd["lookahead"]
    assert (la_sd["k"], la_sd["alpha"], la_sd["pullback_momentum"], la_sd["la_step"]) == \
        (K, ALPHA, "pullback", 2)
    for i, p in enumerate(model.parameters()):
        assert torch.equal(la_sd["state"][i]["slow_param"], la.state[p]["slow_param"])
        assert torch.equal(la_sd["state"][i]["slow_momentum_buffer"],
                           la.state[p]["slow_momentum_buffer"])
    # a bare base optimizer takes the same dict (the extra entry is ignored)
    torch.optim.SGD(_model().parameters(), lr=0.1, momentum=0.9).load_state_dict(sd)

    # in place, as accelerate's prepare() does (state_dict -> move_to_device -> load_state_dict)
    ref = copy.deepcopy(model)
    la_ref, sched_ref = _build(ref, "sgd_momentum", "pullback")
    la_ref.load_state_dict(_roundtrip(la.state_dict()))
    sched_ref.load_state_dict(sched.state_dict())
    state = la.state_dict()
    try:
        from accelerate.utils import move_to_device
        state = move_to_device(state, torch.device("cpu"))
    except ImportError:
        pass
    la.load_state_dict(state)
    _train(model, la, sched, K + 2, 3 * K)
    _train(ref, la_ref, sched_ref, K + 2, 3 * K)
    for p_ref, p in zip(ref.parameters(), model.parameters()):
        assert torch.equal(p_ref, p)


def test_load_state_dict_rejects_what_does_not_fit():
    model = _model()
    la, _ = _build(model, "adam", "none")
    base_only = la.optimizer.state_dict()
    with pytest.raises(ValueError, match="no 'lookahead' entry"):
        la.load_state_dict(base_only)
    other = nn.Linear(3, 2)
    la_other = Lookahead(torch.optim.Adam(other.parameters()))
    with pytest.raises(ValueError, match="slow entries"):
        la.load_state_dict(la_other.state_dict())


def test_lambda_lr_on_the_wrapper_drives_the_base():
    a, b, w0 = _quadratic()
    w = nn.Parameter(w0.clone())
    base = torch.optim.SGD([w], lr=0.1)
    la = Lookahead(base, k=K)
    assert la.param_groups is base.param_groups
    sched = torch.optim.lr_scheduler.LambdaLR(la, lambda s: 0.5 ** s)
    la.step(_closure(la, w, a, b))
    sched.step()
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.025)
    before = w.detach().clone()
    la.step(_closure(la, w, a, b))  # step 2 of 5: no sync, a plain SGD step at the new lr
    torch.testing.assert_close(w.detach(), before - 0.025 * (a @ before - b), rtol=0, atol=1e-14)
    # load_state_dict gives the base a new group list; the wrapper still sees the base's
    la.load_state_dict(la.state_dict())
    assert la.param_groups is base.param_groups


@pytest.mark.parametrize("mode", ["none", "reset", "pullback"])
def test_wraps_our_lars_against_a_manual_reference(mode):
    model_a, model_b = _model(), _model()
    la, _ = _build(model_a, "lars", mode)
    ref_opt = LARS(param_groups({"net": model_b}, weight_decay=1e-4), lr=0.5, momentum=0.9)
    assert [g["lars_adapt"] for g in la.param_groups] == [True, False]
    assert [g["lars_adapt"] for g in la.state_dict()["param_groups"]] == [True, False]

    params_b = list(model_b.parameters())
    phi = [p.detach().clone() for p in params_b]
    m_slow = [torch.zeros_like(p) for p in params_b]
    for step in range(2 * K + 1):
        x, y = _batch(step)
        for model, opt in ((model_a, la), (model_b, ref_opt)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        if (step + 1) % K == 0:
            with torch.no_grad():
                for i, p in enumerate(params_b):
                    phi[i] = phi[i] + ALPHA * (p - phi[i])
                    p.copy_(phi[i])
                    buf = ref_opt.state[p]["momentum_buffer"]
                    if mode == "reset":
                        buf.zero_()
                    elif mode == "pullback":
                        m_slow[i] = m_slow[i] + ALPHA * (buf - m_slow[i])
                        buf.copy_(m_slow[i])
    for p_a, p_b, phi_b in zip(model_a.parameters(), params_b, phi):
        torch.testing.assert_close(p_a, p_b)
        torch.testing.assert_close(la.state[p_a]["slow_param"], phi_b)
        torch.testing.assert_close(la.optimizer.state[p_a]["momentum_buffer"],
                                   ref_opt.state[p_b]["momentum_buffer"])
    assert [g["lars_adapt"] for g in la.param_groups] == [True, False]


def test_add_param_group_starts_slow_weights_at_current_value():
    a, b, w0 = _quadratic()
    w = nn.Parameter(w0.clone())
    la = Lookahead(torch.optim.SGD([w], lr=0.1), k=K, alpha=ALPHA)
    la.step(_closure(la, w, a, b))
    la.step(_closure(la, w, a, b))
    v0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    v = nn.Parameter(v0.clone())
    la.add_param_group({"params": [v], "lr": 0.2})
    assert la.param_groups is la.optimizer.param_groups and len(la.param_groups) == 2
    twin = v0.clone()
    for _ in range(K - 2):  # steps 3..5, the last one syncs
        def closure():
            la.zero_grad()
            loss = 0.5 * w @ a @ w - b @ w + (v ** 2).sum()
            loss.backward()
            return loss
        la.step(closure)
        twin = twin - 0.2 * 2 * twin
    torch.testing.assert_close(v.detach(), v0 + ALPHA * (twin - v0), rtol=0, atol=1e-14)


def test_swap_to_slow_and_deepcopy():
    a, b, w0 = _quadratic()
    w = nn.Parameter(w0.clone())
    la = Lookahead(torch.optim.Adam([w], lr=0.05), k=K)
    for _ in range(K + 2):
        la.step(_closure(la, w, a, b))
    fast = w.detach().clone()
    with la.swap_to_slow():
        assert torch.equal(w, la.state[w]["slow_param"])
    assert torch.equal(w, fast)

    clone = copy.deepcopy(la)
    w_c = clone.param_groups[0]["params"][0]
    assert w_c is not w and torch.equal(w_c, w) and isinstance(clone.optimizer, torch.optim.Adam)
    for _ in range(4):
        la.step(_closure(la, w, a, b))
        clone.step(_closure(clone, w_c, a, b))
    assert torch.equal(w_c, w)


def test_wrap_lookahead_and_arguments():
    w = nn.Parameter(torch.zeros(3))
    la = wrap_lookahead(torch.optim.SGD([w], lr=0.1), k=6, alpha=0.8, pullback_momentum="reset")
    assert (la.k, la.alpha, la.pullback_momentum) == (6, 0.8, "reset")
    assert isinstance(la, torch.optim.Optimizer)
    text = repr(la)
    assert text.startswith("Lookahead (k=6, alpha=0.8, pullback_momentum='reset'") and "SGD" in text
    with pytest.raises(ValueError, match="already a Lookahead"):
        wrap_lookahead(la)
    from timm.optim import create_optimizer_v2
    with pytest.raises(ValueError, match="already a Lookahead"):
        wrap_lookahead(create_optimizer_v2([w], opt="lookahead_sgd", lr=0.1))
    for bad in (dict(k=0), dict(k=2.5), dict(alpha=0.0), dict(alpha=1.5),
                dict(pullback_momentum="interpolate")):
        with pytest.raises(ValueError):
            Lookahead(torch.optim.SGD([w], lr=0.1), **bad)
    with pytest.raises(TypeError):
        Lookahead([w])
