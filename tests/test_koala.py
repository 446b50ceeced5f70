"""KOALA-V / KOALA-M (Davtyan et al., AAAI 2022): steps against the Kalman equations computed by
hand in float64, the predict/update order of KOALA-M, R and Q estimators, layer-wise gains, the
closure protocol, exact resume, and a short learning run on digits."""

import copy
import math

import pytest
import torch
from torch import nn

from ssl_suite.analysis import small_tasks
from ssl_suite.optim.koala import KOALA, KOALAM, KOALAV

D = torch.float64
A = 2.0                       # f_i(x) = A/2 ||x - b_i||^2
BS = [0.5, -1.0, 2.0]         # per-sample centres b_i (one scalar coordinate each)


def _quad_closure(opt, x, seen=None):
    """Per-sample losses l_i = A/2 ||x - b_i||^2 (autograd backward on their mean)."""
    def closure():
        if seen is not None:
            seen.append(x.detach().clone())
        opt.zero_grad(set_to_none=True)
        b = torch.tensor(BS, dtype=D).unsqueeze(1)
        losses = 0.5 * A * (x.unsqueeze(0) - b).square().sum(1)
        losses.mean().backward()
        return losses.detach()
    return closure


def _stats(x):
    """(per-sample losses, their mean L, gradient of L) at x, by hand."""
    ls = [0.5 * A * sum((xi - b) ** 2 for xi in x) for b in BS]
    L = sum(ls) / len(ls)
    mb = sum(BS) / len(BS)
    return ls, L, [A * (xi - mb) for xi in x]


def _r_obs(ls, L, eps, target="relative", mode="paper"):
    if mode == "code":
        return sum(l * l for l in ls) / len(ls)
    tgt = (1 - eps) * L if target == "relative" else L - eps
    return sum((l - tgt) ** 2 for l in ls) / len(ls)


# (1) KOALA-V, one coordinate: the closed-form Kalman gain step and covariance update ----------
@pytest.mark.parametrize("lr", [1.0, 0.5])
def test_koala_v_step_is_closed_form_kalman_update(lr):
    x0, sigma, q = 1.5, 0.1, 1.0
    x = nn.Parameter(torch.tensor([x0], dtype=D))
    opt = KOALAV([x], lr=lr, sigma=sigma, q=q)
    xs, P, R = [x0], sigma, 1.0
    for _ in range(2):
        opt.step(_quad_closure(opt, x))
        ls, L, (g,) = _stats([xs[-1]])
        R = 0.9 * R + 0.1 * _r_obs(ls, L, lr)                    # eq. 49, beta_R = 0.9
        P_hat = P + q                                            # P^ = P + Q
        eta = P_hat * (L - (1 - lr) * L) / (P_hat * g * g + R)   # L_target = (1 - lr) L
        xs.append(xs[-1] - eta * g)
        P = R * P_hat / (P_hat * g * g + R)                      # eq. 36
        assert x.item() == pytest.approx(xs[-1], rel=1e-13, abs=1e-15)
        assert opt.P.item() == pytest.approx(P, rel=1e-13)
        assert opt.R.item() == pytest.approx(R, rel=1e-13)
        assert opt.state["koala"]["P_prior"].item() == pytest.approx(P_hat, rel=1e-13)
    assert opt.P.dtype == D and opt.P.ndim == 0 and opt.R.dtype == D


@pytest.mark.parametrize("wd_mode", ["objective", "code"])
def test_koala_v_weight_decay_modes(wd_mode):
    x0, wd = 1.5, 0.1
    x = nn.Parameter(torch.tensor([x0], dtype=D))
    opt = KOALAV([x], lr=1.0, weight_decay=wd, wd_mode=wd_mode)
    opt.step(_quad_closure(opt, x))
    ls, L, (g,) = _stats([x0])
    R = 0.9 + 0.1 * _r_obs(ls, L, 1.0)
    G = g + wd * x0
    P_hat = 1.1
    f = L + 0.5 * wd * x0 * x0            # one layer: objective and code loss coincide
    eta = P_hat * f / (P_hat * G * G + R)
    direction = G if wd_mode == "objective" else g   # code: KOALA-V steps along g without wd
    assert x.item() == pytest.approx(x0 - eta * direction, rel=1e-13)
    assert opt.P.item() == pytest.approx(R * P_hat / (P_hat * G * G + R), rel=1e-13)


@pytest.mark.parametrize("wd_mode", ["objective", "code"])
def test_two_layer_weight_decay_loss_term(wd_mode):
    """objective: the gap uses L + sum_l wd/2 ||x_l||^2 (all layers); code: each layer's own."""
    w1 = nn.Parameter(torch.tensor([1.0, -2.0], dtype=D))
    w2 = nn.Parameter(torch.tensor([3.0], dtype=D))
    wd1, wd2 = 0.1, 0.2
    opt = KOALAV([{"params": [w1], "weight_decay": wd1}, {"params": [w2], "weight_decay": wd2}],
                 wd_mode=wd_mode)

    def closure():
        opt.zero_grad(set_to_none=True)
        losses = torch.stack([w1.sum() * 0.5 + w2.sum(), w1.square().sum() + 0.0 * w2.sum()])
        losses.mean().backward()
        return losses.detach()
    opt.step(closure)
    x1, x2 = [1.0, -2.0], 3.0
    ls = [0.5 * sum(x1) + x2, sum(v * v for v in x1)]
    L = sum(ls) / 2
    g1 = [0.25 + v for v in x1]
    g2 = 0.5
    R = 0.9 + 0.1 * sum(l * l for l in ls) / 2
    reg1, reg2 = 0.5 * wd1 * sum(v * v for v in x1), 0.5 * wd2 * x2 * x2
    G1 = [g + wd1 * v for g, v in zip(g1, x1)]
    G2 = g2 + wd2 * x2
    f1, f2 = (L + reg1 + reg2, L + reg1 + reg2) if wd_mode == "objective" else (L + reg1, L + reg2)
    P_hat = 1.1
    n1, n2 = sum(v * v for v in G1), G2 * G2
    eta1, eta2 = P_hat * f1 / (P_hat * n1 + R), P_hat * f2 / (P_hat * n2 + R)
    d1, d2 = (G1, G2) if wd_mode == "objective" else (g1, g2)
    assert w1.tolist() == pytest.approx([v - eta1 * d for v, d in zip(x1, d1)], rel=1e-13)
    assert w2.item() == pytest.approx(x2 - eta2 * d2, rel=1e-13)
    h = max(n1 / (P_hat * n1 + R), n2 / (P_hat * n2 + R))
    assert opt.P.item() == pytest.approx(P_hat - P_hat ** 2 * h, rel=1e-13)


# (2) KOALA-M: predict before the closure, 2x2 covariance, both Q estimators ----------------------
@pytest.mark.parametrize("q_mode", ["paper", "code"])
def test_koala_m_predict_update_order_and_covariance(q_mode):
    x0 = [1.5, -0.5]
    n, kappa, qv, sw, sc, sv, lr, beta = 2, 0.9, 1e-2, 0.1, 0.02, 0.1, 0.8, 0.9
    x = nn.Parameter(torch.tensor(x0, dtype=D))
    opt = KOALAM([x], lr=lr, sw=sw, sc=sc, sv=sv, kappa=kappa, qv=qv, q_mode=q_mode)
    seen = []
    # hand-computed filter
    xs, v = list(x0), [0.0, 0.0]
    avg = list(x0) if q_mode == "paper" else [0.0, 0.0]
    P = [[sw, sc], [sc, sv]]
    R, qw = 1.0, 1e-2
    for step in range(2):
        opt.step(_quad_closure(opt, x, seen))
        if q_mode == "paper":                                      # eqs. 50-52
            avg = [beta * a + (1 - beta) * xi for a, xi in zip(avg, xs)]
            q_x = sum((xi - a) ** 2 for xi, a in zip(xs, avg)) / n
        else:                                                      # code: norm / n, EMA
            d = math.sqrt(sum((a - xi) ** 2 for a, xi in zip(avg, xs))) / n
            qw = 0.9 * qw + 0.1 * d
            q_x = qw
        x_hat = [xi + vi for xi, vi in zip(xs, v)]                 # x^ = x + v
        v_hat = [kappa * vi for vi in v]                           # v^ = kappa v
        Fm = [[1.0, 1.0], [0.0, kappa]]
        FP = [[sum(Fm[i][k] * P[k][j] for k in range(2)) for j in range(2)] for i in range(2)]
        P_hat = [[sum(FP[i][k] * Fm[j][k] for k in range(2)) for j in range(2)] for i in range(2)]
        P_hat[0][0] += q_x
        P_hat[1][1] += qv
        # the closure saw the predicted weights
        assert seen[-1].tolist() == pytest.approx(x_hat, rel=1e-14)
        ls, L, g = _stats(x_hat)
        R = 0.9 * R + 0.1 * _r_obs(ls, L, lr)
        gsq = sum(gi * gi for gi in g)
        S = P_hat[0][0] * gsq + R
        K1, K2 = P_hat[0][0] / S * lr * L, P_hat[1][0] / S * lr * L
        xs = [xh - K1 * gi for xh, gi in zip(x_hat, g)]
        v = [vh - K2 * gi for vh, gi in zip(v_hat, g)]
        if q_mode == "code":
            avg = [0.9 * a + 0.1 * xi for a, xi in zip(avg, xs)]
        h = gsq / S
        P = [[P_hat[i][j] - h * P_hat[i][0] * P_hat[j][0] for j in range(2)] for i in range(2)]
        assert opt.state["koala"]["P_prior"].tolist() == [pytest.approx(r, rel=1e-13)
                                                         for r in P_hat]
    assert step == 1 and seen[1].tolist() != pytest.approx(seen[0].tolist())
    assert x.tolist() == pytest.approx(xs, rel=1e-13)
    assert opt.state[x]["velocity"].tolist() == pytest.approx(v, rel=1e-12)
    assert opt.P.tolist() == [pytest.approx(r, rel=1e-12) for r in P]
    assert opt.R.item() == pytest.approx(R, rel=1e-13)
    assert opt.state[x]["x_avg"].tolist() == pytest.approx(avg, rel=1e-13)


# (3) R estimator: eq. 49 (centred on the target) and the code's raw second moment ---------------
@pytest.mark.parametrize("r_mode,target", [("paper", "relative"), ("paper", "absolute"),
                                           ("code", "relative")])
def test_r_estimator_forms(r_mode, target):
    x0, lr = 1.5, 0.3
    x = nn.Parameter(torch.tensor([x0], dtype=D))
    opt = KOALAV([x], lr=lr, r_mode=r_mode, target=target, r_beta=0.8, r_init=2.0)
    opt.step(_quad_closure(opt, x))
    ls, L, (g,) = _stats([x0])
    R = 0.8 * 2.0 + 0.2 * _r_obs(ls, L, lr, target, r_mode)
    assert opt.R.item() == pytest.approx(R, rel=1e-13)
    gap = lr * L if target == "relative" else lr          # forms (b) and (a) of Theorem 1
    eta = 1.1 * gap / (1.1 * g * g + R)
    assert x.item() == pytest.approx(x0 - eta * g, rel=1e-13)
    # a fixed R (the code's r argument) stays fixed
    y = nn.Parameter(torch.tensor([x0], dtype=D))
    fixed = KOALAV([y], r=0.25)
    fixed.step(_quad_closure(fixed, y))
    assert fixed.R.item() == 0.25


# (4) layer-wise gains, max over layers, per-group lr, skip rules ---------------------------------
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("skip", ["layer", "iteration"])
def test_layerwise_gains_and_max_h(foreach, skip):
    w1 = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=D))
    w2 = nn.Parameter(torch.tensor([0.3, 0.1], dtype=D))
    w3 = nn.Parameter(torch.tensor([4.0], dtype=D))          # gradient exactly 0 -> skipped
    c1, c2 = torch.tensor([0.2, 0.1, -0.3], dtype=D), torch.tensor([-1.0, 0.4], dtype=D)
    opt = KOALAV([{"params": [w1, w3]}, {"params": [w2], "lr": 0.5}], lr=1.0, skip=skip,
                 foreach=foreach)
    batch = torch.tensor([1.0, 3.0], dtype=D)                # per-sample scales s_i

    def closure():
        opt.zero_grad(set_to_none=True)
        losses = batch * ((w1 - c1).square().sum() + 3.0 * (w2 - c2).square().sum()) \
            + 0.0 * w3.sum()
        losses.mean().backward()
        return losses.detach()

    P_before = opt.P.item()
    s = batch.mean().item()
    g1, g2 = 2 * s * (w1 - c1).detach(), 6 * s * (w2 - c2).detach()
    ls = (batch * ((w1 - c1).square().sum() + 3.0 * (w2 - c2).square().sum())).tolist()
    w1_0, w2_0 = w1.detach().clone(), w2.detach().clone()
    opt.step(closure)
    L = sum(ls) / 2
    R = 0.9 + 0.1 * sum(l * l for l in ls) / 2               # lr of group 0 is 1: target 0
    P_hat = P_before + 1.0
    assert w3.item() == 4.0
    if skip == "iteration":                                  # Alg. 2: whole iteration skipped
        assert torch.equal(w1.detach(), w1_0) and torch.equal(w2.detach(), w2_0)
        assert opt.P.item() == pytest.approx(P_hat, rel=1e-15)     # P = P^
        assert opt.R.item() == 1.0                           # R not updated either
        return
    n1, n2 = g1.square().sum().item(), g2.square().sum().item()
    eta1 = P_hat * 1.0 * L / (P_hat * n1 + R)                # own gain, group lr 1
    eta2 = P_hat * 0.5 * L / (P_hat * n2 + R)                # own gain, group lr 0.5
    assert w1.tolist() == pytest.approx((w1_0 - eta1 * g1).tolist(), rel=1e-13)
    assert w2.tolist() == pytest.approx((w2_0 - eta2 * g2).tolist(), rel=1e-13)
    h_max = max(n1 / (P_hat * n1 + R), n2 / (P_hat * n2 + R))
    assert n1 != pytest.approx(n2)
    assert opt.P.item() == pytest.approx(P_hat - P_hat ** 2 * h_max, rel=1e-13)
    assert opt.R.item() == pytest.approx(R, rel=1e-13)


def test_per_tensor_and_foreach_paths_agree():
    torch.manual_seed(1)
    shapes = [(4, 3, 3, 3), (4,), (5, 4)]
    base = [torch.randn(s, dtype=D) for s in shapes]
    grads = [[torch.randn(s, dtype=D) for s in shapes] for _ in range(3)]
    out = []
    for foreach in (False, True):
        ps = [nn.Parameter(b.clone()) for b in base]
        opt = KOALA([{"params": ps[::2], "weight_decay": 0.05}, {"params": ps[1:2]}],
                    variant="m", q_mode="code", wd_mode="code", foreach=foreach, compile=False)
        for gk in grads:
            def closure():
                for p, g in zip(ps, gk):
                    p.grad = g.clone()
                return torch.tensor([0.5, 1.5, 2.0], dtype=D)
            opt.step(closure)
        out.append(torch.cat([p.detach().flatten() for p in ps]))
    assert torch.allclose(out[0], out[1], rtol=1e-14, atol=1e-15)
    assert not torch.equal(out[0], torch.cat([b.flatten() for b in base]))


# (5) the protocol: a closure is required and must return per-sample losses ----------------------
def test_closure_required_and_must_return_loss_vector():
    x = nn.Parameter(torch.tensor([1.0], dtype=D))
    opt = KOALAM([x])
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()

    def scalar_closure():
        opt.zero_grad()
        loss = x.square().sum()
        loss.backward()
        return loss.detach()
    with pytest.raises(ValueError, match="KOALA needs per-sample losses") as err:
        opt.step(scalar_closure)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs,name", [({"variant": "x"}, "variant"), ({"lr": -1}, "lr"),
                                         ({"kappa": 1.5}, "kappa"), ({"r": 0.0}, "r"),
                                         ({"skip": "all"}, "skip"), ({"sc": 0.2}, "sc")])
def test_invalid_arguments_one_line(kwargs, name):
    with pytest.raises(ValueError, match=name) as err:
        KOALA([nn.Parameter(torch.zeros(1))], **kwargs)
    assert "\n" not in str(err.value)


# (6) state_dict round trip resumes bit-identically -------------------------------------------
@pytest.mark.parametrize("variant", ["v", "m"])
def test_state_dict_resume_is_bit_identical(variant):
    data = small_tasks.digits(flat=True)
    torch.manual_seed(0)
    model = small_tasks.small_mlp(hidden=16, depth=1)

    def build(m):
        decay = [p for p in m.parameters() if p.ndim > 1]
        rest = [p for p in m.parameters() if p.ndim <= 1]
        return KOALA([{"params": decay, "weight_decay": 5e-4}, {"params": rest, "lr": 0.5}],
                     variant=variant, q_mode="code" if variant == "m" else "paper")

    def run(m, opt, start, steps):
        for k in range(start, start + steps):
            idx = torch.arange(k * 32, (k + 1) * 32)
            x, y = data.x_train[idx], data.y_train[idx]

            def closure():
                opt.zero_grad(set_to_none=True)
                losses = small_tasks.cross_entropy_losses(m, x, y)
                losses.mean().backward()
                return losses.detach()
            opt.step(closure)

    opt = build(model)
    run(model, opt, 0, 3)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert "koala" in saved_opt["state"]
    run(model, opt, 3, 3)

    model2 = small_tasks.small_mlp(hidden=16, depth=1)
    model2.load_state_dict(saved_model)
    opt2 = build(model2)
    opt2.load_state_dict(saved_opt)
    glob = opt2.state["koala"]
    assert all(t.dtype == D for t in glob.values())
    assert glob["P"].data_ptr() != saved_opt["state"]["koala"]["P"].data_ptr()
    run(model2, opt2, 3, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for key in opt.state["koala"]:
        assert torch.equal(opt.state["koala"][key], opt2.state["koala"][key])
    if variant == "m":
        p = next(model.parameters())
        p2 = next(model2.parameters())
        assert torch.equal(opt.state[p]["velocity"], opt2.state[p2]["velocity"])


# (7) learns on digits ----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [KOALAV, KOALAM])
def test_short_run_on_digits_decreases_loss(cls):
    data = small_tasks.digits(flat=True)
    torch.manual_seed(0)
    model = small_tasks.small_mlp(hidden=32, depth=1)
    opt = cls(model.parameters(), lr=1.0, weight_decay=5e-4)
    curves = small_tasks.train(model, opt, data, steps=60, batch_size=64, eval_every=20)
    assert not curves.diverged
    assert curves.train_loss[-1] < 0.5 * curves.train_loss[0]
    assert curves.final_acc > 0.8


# (8) the C kernels (native path) against the torch paths -------------------------------------
def _native_or_skip():
    from ssl_suite.optim import koala
    if koala._native_kernels() is None:
        pytest.skip(f"KOALA C kernels unavailable: {koala._NATIVE.get('error')}")


def _used_native(opt):
    return any(layout is not None for layout in opt._layouts.values())


def _problem(dtype):
    """Per-sample losses s_i / 2 ||x - c||^2 over five tensors: (initial weights, centres,
    scales s_i). Tensor 3 spans several kernel chunks; tensor 4 never gets a gradient."""
    torch.manual_seed(3)
    shapes = [(4, 3, 3, 3), (4,), (5, 4), (2 * (1 << 15) + 7,), (3,)]
    base = [torch.randn(s, dtype=dtype) for s in shapes]
    centres = [torch.randn(s, dtype=dtype) for s in shapes]
    return base, centres, torch.tensor([0.5, 1.0, 1.5], dtype=dtype)


def _groups(ps):
    """Two groups: one with weight decay, one with its own lr."""
    return [{"params": ps[:3:2] + ps[3:4], "weight_decay": 0.05},
            {"params": ps[1:2] + ps[4:], "lr": 0.5}]


def _problem_closure(ps, centres, scales, seen, fail=False):
    """Records the weights it sees, sets the gradients of the mean loss, returns the losses."""
    def closure():
        seen.append([p.detach().clone() for p in ps])
        if fail:
            raise RuntimeError("closure failed")
        sq = sum(((p.detach() - c) ** 2).sum() for p, c in zip(ps[:4], centres))
        for p, c in zip(ps[:4], centres):                    # ps[4]: never a gradient
            p.grad = scales.mean() * (p.detach() - c)
        return 0.5 * scales * sq
    return closure


def _run_paths(kwargs, steps=4, dtype=D, raise_at=None):
    """The same KOALA run on the torch per-tensor path and on the C kernels (``_problem``);
    returns (optimizer, parameters, the weights each closure saw) for both."""
    base, centres, scales = _problem(dtype)
    runs = []
    for native in (False, True):
        ps = [nn.Parameter(b.clone()) for b in base]
        opt = KOALA(_groups(ps), compile=False, native=native, **kwargs)
        seen = []
        for k in range(steps):
            closure = _problem_closure(ps, centres, scales, seen, fail=k == raise_at)
            try:
                opt.step(closure)
            except RuntimeError:
                assert k == raise_at
        assert native == _used_native(opt)                # the path that was meant to run
        runs.append((opt, ps, seen))
    return runs


@pytest.mark.parametrize("kwargs", [
    dict(variant="m"), dict(variant="m", q_mode="code", wd_mode="code"),
    dict(variant="m", skip_threshold=5.0), dict(variant="m", skip="iteration", skip_threshold=5.0),
    dict(variant="v"), dict(variant="v", wd_mode="code")])
def test_native_kernels_match_torch_path(kwargs):
    """One pass over all tensors per kernel, KOALA-M's v <- kappa v moved from the predict into
    the update's pass: the same filter as the per-tensor torch path, step by step (the closure
    sees the same predicted weights), up to the rounding of the reductions."""
    _native_or_skip()
    (eager, p_e, seen_e), (native, p_n, seen_n) = _run_paths(kwargs)
    for a, b in zip(seen_e, seen_n):                      # what each closure saw
        for x, y in zip(a, b):
            assert torch.allclose(x, y, rtol=1e-12, atol=1e-14)
    for x, y in zip(p_e, p_n):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-14)
    for key in ("P", "P_prior", "R"):
        assert torch.allclose(eager.state["koala"][key], native.state["koala"][key],
                              rtol=1e-12, atol=0)
    if kwargs["variant"] == "m":
        ahead = "avg_ahead" in native.state["koala"]        # the predict buffer's update
        assert ahead == (kwargs.get("q_mode", "paper") == "paper"    # has moved the average
                         and kwargs.get("skip", "layer") == "layer")
        for x, y in zip(p_e, p_n):
            a = eager.state[x]["x_avg"]
            if ahead:
                a = a + (1.0 - 0.9) * (x.detach() - a)
            assert torch.allclose(a, native.state[y]["x_avg"], rtol=1e-12, atol=1e-14)
            assert torch.allclose(eager.state[x]["velocity"], native.state[y]["velocity"],
                                  rtol=1e-12, atol=1e-14)


def test_native_float32_and_closure_failure():
    """float32 kernels; a closure that raises leaves the native path in the torch path's state
    (weights at the predicted point, v already decayed) and the next step goes on from it."""
    _native_or_skip()
    (eager, p_e, _), (native, p_n, _) = _run_paths(dict(variant="m"), dtype=torch.float32,
                                                    raise_at=1)
    for x, y in zip(p_e, p_n):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6)
        assert torch.allclose(eager.state[x]["velocity"], native.state[y]["velocity"],
                              rtol=1e-5, atol=1e-6)
    assert native._pending is None


def test_native_state_dict_resume_is_bit_identical():
    _native_or_skip()
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(s, dtype=D)) for s in ((6, 5), (5,), (40000,))]
    gs = [[torch.randn_like(p) for p in ps] for _ in range(6)]

    def build(params):
        return KOALAM([{"params": params[::2], "weight_decay": 5e-4}, {"params": params[1:2]}],
                      native=True)

    def run(opt, params, ks):
        for k in ks:
            def closure():
                for p, g in zip(params, gs[k]):
                    p.grad = g.clone()
                return torch.tensor([1.0, 2.0 + k], dtype=D)
            opt.step(closure)

    opt = build(ps)
    run(opt, ps, range(3))
    saved = copy.deepcopy(([p.detach() for p in ps], opt.state_dict()))
    run(opt, ps, range(3, 6))
    ps2 = [nn.Parameter(t.clone()) for t in saved[0]]
    opt2 = build(ps2)
    opt2.load_state_dict(saved[1])
    run(opt2, ps2, range(3, 6))
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["velocity"], opt2.state[b]["velocity"])
    assert _used_native(opt2)


def test_native_unavailable_falls_back_to_torch(monkeypatch):
    from ssl_suite.optim import koala
    monkeypatch.setitem(koala._NATIVE, "kernels", None)
    monkeypatch.setitem(koala._NATIVE, "warn", True)
    x = nn.Parameter(torch.tensor([1.5, -0.5], dtype=D))
    opt = KOALAM([x], native=True)
    with pytest.warns(RuntimeWarning, match="C kernels unavailable"):
        opt.step(_quad_closure(opt, x))
    assert not _used_native(opt) and opt._pending is None


# (9) fuse_predict: the next step's predict inside this step's update ---------------------------
def _fused_pair(native, steps=5, dtype=D, resume_at=None):
    """Default KOALA-M and fuse_predict=True on ``_problem``; the weights every closure saw, for
    both. ``resume_at``: the fused run is rebuilt from its state_dict (and the weights) after
    that many steps."""
    base, centres, scales = _problem(dtype)

    def build(ps, fuse):
        return KOALA(_groups(ps), variant="m", compile=False, native=native, fuse_predict=fuse,
                     predict_buffer=False)

    out = []
    for fuse in (False, True):
        ps = [nn.Parameter(b.clone()) for b in base]
        opt = build(ps, fuse)
        seen = []
        for k in range(steps):
            if fuse and k == resume_at:
                saved = copy.deepcopy(opt.state_dict())
                ps = [nn.Parameter(p.detach().clone()) for p in ps]
                opt = build(ps, fuse)
                opt.load_state_dict(saved)
            opt.step(_problem_closure(ps, centres, scales, seen))
        out.append((opt, ps, seen))
    return out


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("resume_at", [None, 2])
def test_fuse_predict_measures_at_the_same_points_as_the_paper_order(native, resume_at):
    """With fuse_predict the weights between steps are the prediction x + v, but every closure
    (the measurement) sees exactly the weights the paper's order gives it, including after a
    state_dict round trip in the middle of the run."""
    if native:
        _native_or_skip()
    (plain, _, seen_p), (fused, ps, seen_f) = _fused_pair(native, resume_at=resume_at)
    assert len(seen_p) == len(seen_f) == 5
    for a, b in zip(seen_p, seen_f):
        for x, y in zip(a, b):
            assert torch.allclose(x, y, rtol=1e-13, atol=1e-13)
    assert "diff_sq" in fused.state["koala"] and "diff_sq" not in plain.state["koala"]
    if native and resume_at is None:
        assert _used_native(fused)


def test_fuse_predict_needs_koala_m():
    with pytest.raises(ValueError, match="fuse_predict needs variant='m'"):
        KOALA([nn.Parameter(torch.zeros(2))], variant="v", fuse_predict=True)


def test_fuse_predict_runs_one_fused_kernel_per_step(monkeypatch):
    """Every parameter with a gradient: after the first step's predict, each step is one fused
    C-kernel pass, and the measurements equal the paper order's bit for bit."""
    _native_or_skip()
    from ssl_suite.optim import koala
    calls = []
    real = koala._Kernels.update
    monkeypatch.setattr(koala._Kernels, "update",            # flags bit 16: the fused predict
                        lambda self, *a: calls.append(a[6] & 16) or real(self, *a))
    data = small_tasks.digits(flat=True)
    torch.manual_seed(0)
    init = small_tasks.small_mlp(hidden=16, depth=1).state_dict()
    seen = {}
    for fuse in (False, True):
        model = small_tasks.small_mlp(hidden=16, depth=1)
        model.load_state_dict(init)
        opt = KOALAM(model.parameters(), native=True, fuse_predict=fuse, predict_buffer=False)
        seen[fuse] = []
        for k in range(4):
            x, y = data.x_train[k * 32:(k + 1) * 32], data.y_train[k * 32:(k + 1) * 32]

            def closure():
                seen[fuse].append([p.detach().clone() for p in model.parameters()])
                opt.zero_grad(set_to_none=True)
                losses = small_tasks.cross_entropy_losses(model, x, y)
                losses.mean().backward()
                return losses.detach()
            opt.step(closure)
    assert calls == [0] * 4 + [16] * 4          # paper order, then one fused pass per step
    for a, b in zip(seen[False], seen[True]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# (10) the predict buffer: the paper's order with x + v written by the update into a buffer ------
def _buffer_pair(steps=7, dtype=D, resume_at=None, touch_at=None, raise_at=None):
    """KOALA-M on the C kernels with ``predict_buffer`` off (the paper's order in place) and on,
    on ``_problem``; for both: the weights each closure saw, the weights after each step, the
    optimizer. ``resume_at``: the buffered run is rebuilt from its state_dict before that step;
    ``touch_at``: both runs' weights are scaled in place before that step (as Lookahead's sync
    would); ``raise_at``: that step's closure raises in both."""
    base, centres, scales = _problem(dtype)
    out = []
    for buffered in (False, True):
        ps = [nn.Parameter(b.clone()) for b in base]

        def build(params):
            return KOALA(_groups(params), variant="m", compile=False, native=True,
                         predict_buffer=buffered)
        opt, seen, after, ptrs = build(ps), [], [], []
        for k in range(steps):
            if k == resume_at and buffered:
                saved = copy.deepcopy(opt.state_dict())
                ps = [nn.Parameter(p.detach().clone()) for p in ps]
                opt = build(ps)
                opt.load_state_dict(saved)
            if k == touch_at:
                with torch.no_grad():
                    ps[0].mul_(0.5)
            try:
                opt.step(_problem_closure(ps, centres, scales, seen, fail=k == raise_at))
            except RuntimeError:
                assert k == raise_at
            after.append([p.detach().clone() for p in ps])
            ptrs.append(ps[3].data_ptr())
        out.append((opt, seen, after, ptrs))
    return out


@pytest.mark.parametrize("case", [{}, {"resume_at": 3}, {"raise_at": 2},
                                  {"dtype": torch.float32}])
def test_predict_buffer_is_the_paper_order_bit_for_bit(case):
    """With the predict buffer the update also writes x + v into a second buffer, which the next
    predict swaps in as the weights' storage: every closure sees, and the weights between steps
    hold, exactly what the paper's order in place gives (x between steps, x + v in the closure),
    bit for bit, also across a state_dict round trip (no buffer: x + v added) and after a
    closure that raised; velocities, P and R agree too."""
    _native_or_skip()
    (plain, seen_p, after_p, ptr_p), (buf, seen_b, after_b, ptr_b) = _buffer_pair(**case)
    assert len(seen_p) == len(seen_b) and len(after_p) == len(after_b) == 7
    for a, b in list(zip(seen_p, seen_b)) + list(zip(after_p, after_b)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for p, q in zip(plain.param_groups[0]["params"], buf.param_groups[0]["params"]):
        assert torch.equal(plain.state[p]["velocity"], buf.state[q]["velocity"])
    for key in ("P", "R"):
        assert torch.equal(plain.state["koala"][key], buf.state["koala"][key])
    assert len(set(ptr_p)) == 1                         # in place: one storage
    assert len(set(ptr_b[-3:])) == 2                    # swapped: two storages in turn
    assert "avg_ahead" in buf.state["koala"] and "avg_ahead" not in plain.state["koala"]


def test_predict_buffer_state_loads_into_the_torch_path():
    """A state_dict saved between steps of a predict-buffer run (average moved, x + v pending)
    continues on the torch per-tensor path as the C-kernel run does (up to the reductions'
    rounding)."""
    _native_or_skip()
    base, centres, scales = _problem(D)
    runs = []
    for native in (True, False):
        ps = [nn.Parameter(b.clone()) for b in base]
        opt = KOALA(_groups(ps), variant="m", compile=False, native=True)
        seen = []
        for k in range(3):
            opt.step(_problem_closure(ps, centres, scales, seen))
        saved = copy.deepcopy(opt.state_dict())
        ps = [nn.Parameter(p.detach().clone()) for p in ps]
        opt = KOALA(_groups(ps), variant="m", compile=False, native=native)
        opt.load_state_dict(saved)
        for k in range(3):
            opt.step(_problem_closure(ps, centres, scales, seen))
        runs.append((ps, seen))
    for a, b in zip(runs[0][1], runs[1][1]):
        assert all(torch.allclose(x, y, rtol=1e-12, atol=1e-14) for x, y in zip(a, b))


def test_predict_buffer_not_used_after_the_weights_changed():
    """Weights changed in place between steps (as Lookahead's sync does): the stale buffer is
    not swapped in, the closure sees the changed weights + v exactly as in the paper's order;
    only the weight average and Q of that step come from the weights the update left."""
    _native_or_skip()
    (_, seen_p, _, _), (_, seen_b, _, ptr_b) = _buffer_pair(steps=5, touch_at=4)
    assert all(torch.equal(x, y) for x, y in zip(seen_p[4], seen_b[4]))
    assert ptr_b[3] == ptr_b[4]                         # no swap at the touched step


def test_predict_buffer_leaves_views_of_a_flat_buffer_in_place():
    """Parameters that are views into one flat tensor are not given a storage of their own:
    the in-place order runs (the same weights), and they stay views of the flat tensor."""
    _native_or_skip()
    base, centres, scales = _problem(D)
    seen = {}
    for flat in (False, True):
        if flat:
            buf = torch.cat([b.flatten() for b in base])
            views = buf.split([b.numel() for b in base])
            ps = [nn.Parameter(v.view_as(b)) for v, b in zip(views, base)]
        else:
            ps = [nn.Parameter(b.clone()) for b in base]
        opt = KOALA(_groups(ps), variant="m", compile=False, native=True,
                    predict_buffer=flat)          # the flat one asks for the buffer
        seen[flat] = []
        for k in range(4):
            opt.step(_problem_closure(ps, centres, scales, seen[flat]))
        if flat:
            assert ps[1].data_ptr() == buf.data_ptr() + base[0].numel() * buf.element_size()
            assert torch.equal(buf[:base[0].numel()], ps[0].detach().flatten())
    for a, b in zip(seen[False], seen[True]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
