"""Curvature tools (Granziol, Zohren, Roberts, JMLR 2022): Hessian-vector products, power
iteration, Lanczos / SLQ against explicit Hessians, learning-rate rules, the Lanczos LR schedule,
and the per-run Hessian job."""

import csv
import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from ssl_suite.analysis import lr_rules
from ssl_suite.analysis.hessian import (HessianJobError, HessianOperator, batch_hessian_noise,
                                        flatten, hessian_job, hessian_vector_product, lanczos,
                                        power_iteration, slq, unflatten)
from ssl_suite.analysis.lr_rules import (LanczosLR, batch_outlier, critical_batch_size,
                                         fit_outlier_model, lr_momentum_from_ritz,
                                         max_lr_for_batch, max_stable_lr, minimal_damping,
                                         outlier_model_from_two, scale_lr)

from helpers import tiny_config

F64 = torch.float64


# ---- fixtures: a tiny net and quadratics --------------------------------------------------------

def tiny_net_problem(batches=2, n=6, seed=0):
    """A 3-4-2 tanh MLP (26 parameters) in float64, MSE loss on ``batches`` fixed batches."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    data = [(torch.randn(n, 3, generator=g, dtype=F64), torch.randn(n, 2, generator=g, dtype=F64))
            for _ in range(batches)]

    def loss_of(b):
        x, y = data[b]
        return lambda: ((net(x) - y) ** 2).mean()
    return net, [loss_of(b) for b in range(batches)], data


def reference_hessian(net, data_batches):
    """torch.autograd.functional.hessian of the batch-averaged loss w.r.t. the flat parameters."""
    names = [n for n, _ in net.named_parameters()]
    like = [p.detach() for p in net.parameters()]

    def f(flat):
        ps = dict(zip(names, unflatten(flat, like)))
        total = 0.0
        for x, y in data_batches:
            total = total + ((functional_call(net, ps, (x,)) - y) ** 2).mean()
        return total / len(data_batches)
    return torch.autograd.functional.hessian(f, flatten(like))


def spd_matrix(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=F64))
    return Q @ torch.diag(torch.as_tensor(eigs, dtype=F64)) @ Q.T, Q


def quadratic_operator(A):
    """The Hessian operator of 0.5 x^T A x, through autograd (so the HVP path is exercised)."""
    x = nn.Parameter(torch.randn(A.shape[0], dtype=F64))
    return HessianOperator([x], lambda: 0.5 * x @ (A @ x)), x


# ---- Hessian-vector products ----------------------------------------------------------------

def test_hvp_equals_autograd_hessian_exactly_in_float64():
    net, fns, data = tiny_net_problem()
    H = reference_hessian(net, data)
    op = HessianOperator(list(net.parameters()), fns)
    assert op.dim == 26 and op.dtype == F64
    torch.testing.assert_close(op.dense(), H, rtol=0, atol=1e-12)
    v = torch.randn(26, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-12)
    # one batch alone is its own (different) Hessian; the full one is the average
    H0 = reference_hessian(net, data[:1])
    torch.testing.assert_close(HessianOperator(list(net.parameters()), fns[0]).dense(), H0,
                               rtol=0, atol=1e-12)
    assert (H0 - H).abs().max() > 1e-3
    # list form of the helper, and the cached-graph and torch.func paths agree
    params = list(net.parameters())
    hv = hessian_vector_product(fns[0], params, unflatten(v, params))
    torch.testing.assert_close(flatten(hv), H0 @ v, rtol=0, atol=1e-12)
    cached = HessianOperator(list(net.parameters()), fns, cache_graph=True)
    torch.testing.assert_close(cached.matvec(v), H @ v, rtol=0, atol=1e-12)
    torch.testing.assert_close(cached.matvec(2 * v), 2 * H @ v, rtol=0, atol=1e-12)
    func = HessianOperator(list(net.parameters()), fns, method="func", module=net)
    torch.testing.assert_close(func.matvec(v), H @ v, rtol=0, atol=1e-12)


def test_hvp_of_parameter_with_zero_curvature_block():
    """A parameter entering linearly (its gradient constant) gives a zero block, not an error."""
    a = nn.Parameter(torch.tensor([1.5], dtype=F64))
    b = nn.Parameter(torch.tensor([2.0], dtype=F64))
    op = HessianOperator([a, b], lambda: a[0] ** 3 + 4 * b[0])
    torch.testing.assert_close(op.dense(), torch.tensor([[9.0, 0.0], [0.0, 0.0]], dtype=F64))


def test_operator_rejects_bad_input():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="requires_grad"):
        HessianOperator([torch.zeros(3)], lambda: p.sum())
    with pytest.raises(ValueError, match="module"):
        HessianOperator([p], lambda: p.sum(), method="func")
    with pytest.raises(ValueError, match="shape"):
        HessianOperator([p], lambda: (p ** 2).sum()).matvec(torch.zeros(4))


# ---- power iteration, Lanczos, SLQ ----------------------------------------------------------

def test_power_iteration_finds_dominant_eigenvalue():
    A, _ = spd_matrix([0.5, 1.0, 2.0, 3.0, 6.0, 10.0])
    op, _ = quadratic_operator(A)
    res = power_iteration(op, iters=500, tol=1e-13)
    assert res.converged and res.eigenvalue == pytest.approx(10.0, rel=1e-9)
    B, Q = spd_matrix([-12.0, 1.0, 2.0, 10.0], seed=3)   # dominant by magnitude is negative
    res = power_iteration(lambda v: B @ v, dim=4, iters=2000, tol=1e-14)
    assert res.eigenvalue == pytest.approx(-12.0, rel=1e-8)
    assert abs(float(res.vector @ Q[:, 0])) == pytest.approx(1.0, abs=1e-6)


def test_lanczos_full_steps_gives_eigenvalues_and_weights_of_quadratic():
    eigs = torch.linspace(-1.0, 9.0, 15, dtype=F64) ** 3 / 50
    A, Q = spd_matrix(eigs, seed=2)
    op, _ = quadratic_operator(A)
    v0 = torch.randn(15, dtype=F64, generator=torch.Generator().manual_seed(7))
    res = lanczos(op, 15, v0=v0)
    torch.testing.assert_close(res.ritz_values, torch.linalg.eigvalsh(A), rtol=0, atol=1e-10)
    proj = (Q.T @ (v0 / v0.norm())) ** 2        # Gauss weights = squared projections of q_1
    torch.testing.assert_close(res.ritz_weights, proj, rtol=0, atol=1e-10)
    assert op.num_matvecs == 15


def test_lanczos_quadrature_is_exact_to_degree_2m_minus_1():
    """m Lanczos steps give the m-node Gauss rule of the measure sum_i (u_i^T q1)^2 delta_lambda_i:
    sum_k tau_k theta_k^p = q1^T A^p q1 for p <= 2m - 1."""
    A, _ = spd_matrix(torch.linspace(0.1, 3.0, 20, dtype=F64), seed=4)
    v0 = torch.randn(20, dtype=F64, generator=torch.Generator().manual_seed(5))
    q = v0 / v0.norm()
    res = lanczos(lambda v: A @ v, 4, v0=v0, dim=20)
    for p in range(8):
        exact = float(q @ torch.linalg.matrix_power(A, p) @ q)
        quad = float((res.ritz_weights * res.ritz_values ** p).sum())
        assert quad == pytest.approx(exact, rel=1e-9)
    # and the extreme Ritz values lie inside the spectrum (Cauchy interlacing)
    assert 0.1 <= res.lambda_min and res.lambda_max <= 3.0 + 1e-12


def test_lanczos_and_power_iteration_on_tiny_net_match_eigvalsh():
    net, fns, data = tiny_net_problem()
    eig = torch.linalg.eigvalsh(reference_hessian(net, data))
    op = HessianOperator(list(net.parameters()), fns)
    res = lanczos(op, op.dim, seed=3)
    assert res.steps == op.dim
    torch.testing.assert_close(res.ritz_values, eig, rtol=0, atol=1e-8)
    assert lanczos(op, 12, seed=3).lambda_max == pytest.approx(float(eig[-1]), rel=1e-6)
    dominant = float(eig[eig.abs().argmax()])
    power = power_iteration(op, iters=3000, tol=1e-12)
    assert power.eigenvalue == pytest.approx(dominant, rel=1e-5)


def test_slq_density_matches_eigvalsh_of_tiny_net():
    net, _, data = tiny_net_problem()
    H = reference_hessian(net, data)
    eig = torch.linalg.eigvalsh(H)
    sd = slq(lambda v: H @ v, steps=26, probes=100, seed=0, dim=26)
    assert sd.probes == 100 and sd.lambda_max == pytest.approx(float(eig[-1]), abs=1e-8)
    for x in torch.quantile(eig, torch.tensor([0.2, 0.5, 0.8], dtype=F64)):
        true = float((eig <= x + 1e-9).double().mean())
        assert float(sd.cdf(float(x) + 1e-9)[0]) == pytest.approx(true, abs=0.06)
    assert sd.trace == pytest.approx(float(eig.sum()), rel=0.1)
    assert sd.moment(2) == pytest.approx(float((eig ** 2).mean()), rel=0.1)
    # the smoothed density is a probability density with the same mean
    grid = torch.linspace(float(eig[0]) - 5, float(eig[-1]) + 5, 4001, dtype=F64)
    dens = sd.density(grid, sigma=0.05)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-6)
    assert float(torch.trapezoid(dens * grid, grid)) == pytest.approx(sd.moment(1), abs=1e-6)


def test_full_and_mini_batch_spectra_differ():
    """The mini-batch Hessian of one batch has a different spectrum from the full-batch one."""
    net, fns, _ = tiny_net_problem(batches=4, n=3, seed=1)
    full = slq(HessianOperator(list(net.parameters()), fns), steps=26, probes=1)
    mini = slq(HessianOperator(list(net.parameters()), fns[:1]), steps=26, probes=1)
    assert abs(full.lambda_max - mini.lambda_max) > 1e-3


def test_batch_hessian_noise_by_hand():
    """Two batches with Hessians diag(1, 3) and diag(3, 1) along z = e1: H_b z = (1,0), (3,0)."""
    x = nn.Parameter(torch.zeros(2, dtype=F64))
    fns = [lambda: 0.5 * (x[0] ** 2 + 3 * x[1] ** 2), lambda: 0.5 * (3 * x[0] ** 2 + x[1] ** 2)]
    noise = batch_hessian_noise([x], fns, z=torch.tensor([1.0, 0.0], dtype=F64))
    assert noise.hess_mu == pytest.approx(2.0)
    assert noise.hess_var == pytest.approx((1 + 9) / 2 - 4)
    assert noise.delta == pytest.approx(0.0) and noise.shrinkage == 0.0


# ---- learning-rate rules ----------------------------------------------------------------------

def test_max_stable_lr_by_hand():
    assert max_stable_lr(4.0) == pytest.approx(0.5)
    assert max_stable_lr(4.0, momentum=0.9) == pytest.approx(2 * 1.9 / 4)
    assert max_stable_lr(4.0, momentum=0.9, nesterov=True) == pytest.approx(2 * 1.9 / (2.8 * 4))
    assert max_stable_lr(4.0, momentum=0.5, dampening=0.5) == pytest.approx(2 * 1.5 / (0.5 * 4))
    with pytest.raises(ValueError, match="lambda_max"):
        max_stable_lr(-1.0)
    with pytest.raises(ValueError, match="momentum"):
        max_stable_lr(1.0, momentum=1.0)


@pytest.mark.parametrize("momentum,nesterov,dampening", [(0.0, False, 0.0), (0.9, False, 0.0),
                                                          (0.5, True, 0.0), (0.5, False, 0.3)])
def test_quadratic_converges_below_and_diverges_above_predicted_max_lr(momentum, nesterov,
                                                                       dampening):
    """torch.optim.SGD on 0.5 x^T A x, lambda_max estimated by Lanczos: 0.99x the predicted
    limit converges, 1.01x diverges."""
    A, _ = spd_matrix(torch.linspace(0.5, 4.0, 10, dtype=F64), seed=6)
    op, _ = quadratic_operator(A)
    lam = lanczos(op, 10).lambda_max
    assert lam == pytest.approx(4.0, rel=1e-10)
    limit = max_stable_lr(lam, momentum, nesterov, dampening)
    finals = []
    for factor in (0.99, 1.01):
        x = nn.Parameter(torch.ones(10, dtype=F64))
        opt = torch.optim.SGD([x], lr=factor * limit, momentum=momentum, nesterov=nesterov,
                              dampening=dampening)
        for _ in range(2000):
            x.grad = A @ x.detach()      # the gradient of 0.5 x^T A x
            opt.step()
        finals.append(float(x.detach().norm()))
    assert finals[0] < 1e-3 * math.sqrt(10)
    assert finals[1] > 1e3 * math.sqrt(10)


def test_batch_outlier_and_max_lr_by_hand():
    # lambda = 2, s = 8: lambda' = 2 + 8 / (B * 2)
    assert batch_outlier(2.0, 8.0, 4) == pytest.approx(3.0)
    assert batch_outlier(2.0, 8.0, 1) == pytest.approx(6.0)
    assert batch_outlier(2.0, 8.0, 1, bbp=True) == pytest.approx(2 * math.sqrt(8.0))  # bulk edge
    assert batch_outlier(2.0, 8.0, 2, bbp=True) == pytest.approx(batch_outlier(2.0, 8.0, 2))
    assert critical_batch_size(2.0, 8.0) == pytest.approx(2.0)
    # linear regime (B << B* = 1e4) and saturation (B >> B*)
    lam, s = 1.0, 1e4
    ratio = max_lr_for_batch(20, lam, s) / max_lr_for_batch(10, lam, s)
    assert ratio == pytest.approx(2.0, rel=2e-3)
    assert max_lr_for_batch(1e8, lam, s) == pytest.approx(2.0 / lam, rel=1e-3)
    assert max_lr_for_batch(20, lam, s, bbp=True) / max_lr_for_batch(10, lam, s, bbp=True) \
        == pytest.approx(math.sqrt(2.0))


def test_outlier_model_fits_recover_parameters():
    lam, s = 3.0, 600.0
    bs = [8, 16, 32, 64, 128]
    lams = [batch_outlier(lam, s, b) for b in bs]
    fit = fit_outlier_model(bs, lams)
    assert fit[0] == pytest.approx(lam, rel=1e-9) and fit[1] == pytest.approx(s, rel=1e-9)
    two = outlier_model_from_two(lams[0], 8, lams[-1], 128)
    assert two[0] == pytest.approx(lam, rel=1e-9) and two[1] == pytest.approx(s, rel=1e-9)
    assert outlier_model_from_two(1.0, 8, 2.0, 128) is None


def test_scaling_rules_and_damping_by_hand():
    assert scale_lr(0.1, 128, 512, "linear") == pytest.approx(0.4)       # spec §3.3 SGD protocol
    assert scale_lr(0.001, 128, 2048, "sqrt") == pytest.approx(0.004)    # spec §3.3 Adam protocol
    assert lr_rules.scaling_rule("AdamW") == "sqrt" and lr_rules.scaling_rule("sgd") == "linear"
    # K-FAC protocol: delta * B = 256 at lr 1
    for delta, b in [(16, 16), (8, 32), (4, 64), (2, 128), (1, 256)]:
        assert minimal_damping(1.0, b, 16, 1.0, 16) == pytest.approx(delta)
    assert minimal_damping(0.5, 16, 16, 1.0, 16) == pytest.approx(8.0)
    assert lr_rules.adaptive_damping(None, 1.0, 0.5) == pytest.approx(1.5)
    assert lr_rules.adaptive_damping(2.0, 1.0, 0.5) == pytest.approx(0.7 * 2 + 0.3 + 0.15)
    with pytest.raises(ValueError, match="rule"):
        scale_lr(0.1, 128, 256, "cubic")


def test_lr_momentum_from_ritz_by_hand():
    # minimum rule: the node of weight 0.8 (the bulk) is dropped, mu = 4, L = 16 (|-16|)
    hp = lr_momentum_from_ritz(([0.001, 4.0, -16.0], [0.8, 0.15, 0.05]))
    assert (hp.lambda_max, hp.mu) == (16.0, 4.0)
    assert hp.lr == pytest.approx(4 / 36) and hp.momentum == pytest.approx((2 / 6) ** 2)
    code = lr_momentum_from_ritz(([0.001, 4.0, -16.0], [0.8, 0.15, 0.05]), code_momentum=True)
    assert code.momentum == pytest.approx((2 / 8) ** 2)     # (sqrt L - sqrt mu)/(sqrt L + mu)
    med = lr_momentum_from_ritz(([1.0, 4.0, 9.0, 16.0], [0.25] * 4), mu_rule="median")
    assert med.mu == pytest.approx(6.5)
    gd = lr_momentum_from_ritz(([1.0, 4.0, 16.0], [0.3, 0.3, 0.4]), variant="gd")
    assert gd.lr == pytest.approx(2 / 20) and gd.momentum == 0.0


def test_lanczos_lr_schedule_sets_polyak_and_reestimates_every_k_steps():
    eigs = torch.linspace(1.0, 100.0, 30, dtype=F64)
    A, _ = spd_matrix(eigs, seed=8)
    calls = []

    def estimate():
        calls.append(1)
        return lanczos(lambda v: A @ v, 30, dim=30, seed=len(calls))

    def run(sched_factory, steps=150):
        x = nn.Parameter(torch.ones(30, dtype=F64))
        opt = torch.optim.SGD([x], lr=1e-3, momentum=0.0)
        sched = sched_factory(opt)
        for _ in range(steps):
            opt.zero_grad()
            (0.5 * x @ (A @ x)).backward()
            opt.step()
            sched.step()
        return float(x.detach().norm()), opt, sched

    err, opt, sched = run(lambda o: LanczosLR(o, estimate, every=40))
    assert len(calls) == 4 and [h[0] for h in sched.history] == [0, 40, 80, 120]
    assert opt.param_groups[0]["lr"] == pytest.approx(4 / 121, rel=1e-8)    # 4/(sqrt L+sqrt mu)^2
    assert opt.param_groups[0]["momentum"] == pytest.approx((9 / 11) ** 2, rel=1e-8)
    assert sched.get_last_lr() == [pytest.approx(4 / 121, rel=1e-8)]
    # heavy ball at Polyak's parameters beats the best plain GD step 2/(L+mu) by far
    gd_err, _, _ = run(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: (2 / 101) / 1e-3))
    assert err < 1e-9 < gd_err
    # warmstart: nothing changes before it; state_dict leaves the callable out
    calls.clear()
    _, opt, sched = run(lambda o: LanczosLR(o, estimate, every=100, warmstart=120), steps=110)
    assert calls == [] and opt.param_groups[0]["lr"] == 1e-3
    assert "estimate" not in sched.state_dict()
    with pytest.raises(ValueError, match="momentum"):
        LanczosLR(torch.optim.Adam([nn.Parameter(torch.zeros(1))]), estimate, every=1)


# ---- the per-run job --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from ssl_suite.engine.pretrain import pretrain
    run = tmp_path_factory.mktemp("hessian") / "run"
    pretrain(tiny_config(run, **{"train.max_steps": 2}))
    return run


def test_hessian_job_writes_csv_json_png(tiny_run):
    res = hessian_job(str(tiny_run), batch_size=8, num_batches=2, lanczos_steps=4, probes=1,
                      progress=False, cache_graph=True)
    files = {k: tiny_run / "analysis" / f"hessian.{k}" for k in ("csv", "json", "png")}
    assert all(f.is_file() for f in files.values())
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(files["csv"])))
    assert {r["hessian"] for r in rows} == {"full", "mini"} and len(rows) == 8
    for name in ("full", "mini"):
        ritz = [float(r["ritz_value"]) for r in rows if r["hessian"] == name]
        weights = [float(r["weight"]) for r in rows if r["hessian"] == name]
        assert max(ritz) == pytest.approx(res[name]["lambda_max"])
        assert sum(weights) == pytest.approx(1.0)
    assert res["full"]["images"] == 16 and res["mini"]["images"] == 8
    assert res["full"]["lambda_max"] > 0 and res["full"]["sgd_max_lr"] == pytest.approx(
        2 / res["full"]["lambda_max"])
    assert json.loads(files["json"].read_text())["full"] == res["full"]
    # the function is fixed: the same seed gives the same losses, and from the same probe fewer
    # Lanczos steps give a smaller top Ritz value (interlacing); here without graph caching
    again = hessian_job(str(tiny_run), batch_size=8, num_batches=2, lanczos_steps=2, probes=1,
                        progress=False, out=str(tiny_run / "again"))
    assert again["full"]["loss"] == res["full"]["loss"]
    assert again["mini"]["loss"] == res["mini"]["loss"]
    for name in ("full", "mini"):
        assert 0 < again[name]["lambda_max"] <= res[name]["lambda_max"] * (1 + 1e-4)
    assert (tiny_run / "again" / "hessian.csv").is_file()


def test_hessian_job_errors_are_one_line(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="not a run directory"):
        hessian_job(str(tmp_path), progress=False)
    with pytest.raises(HessianJobError, match="batch_size must be an integer >= 2"):
        hessian_job(str(tiny_run), batch_size=1, progress=False)
    with pytest.raises(HessianJobError, match="exceeds the 1437 pretraining images"):
        hessian_job(str(tiny_run), batch_size=1000, num_batches=2, progress=False)
    with pytest.raises(HessianJobError, match="bn_mode"):
        hessian_job(str(tiny_run), bn_mode="frozen", progress=False)
    with pytest.raises(HessianJobError, match="probes"):
        hessian_job(str(tiny_run), probes=0, progress=False)
