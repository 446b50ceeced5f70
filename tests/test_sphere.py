"""SphereSGD: projected SGD on the sphere with a fixed effective learning rate."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_suite.analysis import scale_invariance as si
from ssl_suite.analysis.small_tasks import small_cnn
from ssl_suite.optim.sphere import SphereSGD, sphere_param_groups
from ssl_suite.optim.wrs import ELRMonitor, unit_view


def _fully_si(seed=0, n=32):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    model = small_cnn(8)
    si.make_fully_scale_invariant(model, lambda: x)
    return model, x, y


def _step(model, opt, x, y, monitor=None):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    if monitor is not None:
        opt.zero_grad()
        closure()
        monitor.before_step()
        opt.step()
        return monitor.after_step(opt)
    return opt.step(closure)


def _sphere_ref(w, g, eta, radius=1.0):
    """The module doc's equations for one block (float64, by hand)."""
    w, g = w.double(), g.double()
    n = w.norm()
    u, gh = w / n, n * g
    v = gh - (gh * u).sum() * u
    new = u - eta * v
    return radius * new / new.norm(), v


@pytest.mark.parametrize("sphere", ["joint", "tensor", "unit"])
def test_sphere_keeps_the_norm_and_the_elr(sphere):
    model, x, y = _fully_si()
    lr = 0.05
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SphereSGD(params, lr=lr, sphere=sphere)
    monitor = ELRMonitor(model, example_input_fn=lambda: x)
    for i in range(3):
        stats = _step(model, opt, x, y, monitor)
        norms = [p.detach().norm() for p in params]
        if sphere == "joint":
            assert sum(float(n) ** 2 for n in norms) == pytest.approx(1.0, rel=1e-6)
            assert stats["elr_measured_joint"] == pytest.approx(lr, rel=1e-4)
        elif sphere == "tensor":
            for n in norms:
                assert float(n) == pytest.approx(1.0, rel=1e-6)
            # the angle of every tensor is the sphere step with ELR lr, from any starting norm
            for row in monitor.last.values():
                assert row["elr_measured"] == pytest.approx(lr, rel=1e-4)
        else:
            for p in params:
                torch.testing.assert_close(unit_view(p.detach()).norm(dim=1),
                                           torch.ones(p.shape[0]))
        if i > 0 and sphere != "unit":   # from the sphere, lr/||w||^2 is the configured lr
            assert stats["elr_joint" if sphere == "joint" else "elr_mean"] == \
                pytest.approx(lr, rel=1e-5)
    for p in model[11].parameters():   # frozen classifier: untouched
        assert not p.requires_grad


def test_joint_step_matches_the_equations():
    """One joint step from arbitrary (non-unit) weights against the module doc's equations on
    the concatenated vector; the angle satisfies tan(angle) = ELR * ||P grad L(w_hat)||."""
    torch.manual_seed(0)
    ws = [torch.randn(4, 3, 3, 3) * 2, torch.randn(5, 4)]
    gs = [torch.randn_like(w) for w in ws]
    params = [nn.Parameter(w.clone()) for w in ws]
    for p, g in zip(params, gs):
        p.grad = g.clone()
    eta = 0.1
    SphereSGD(params, lr=eta, sphere="joint").step()
    flat_w, flat_g = torch.cat([w.flatten() for w in ws]), torch.cat([g.flatten() for g in gs])
    ref, v = _sphere_ref(flat_w, flat_g, eta)
    got = torch.cat([p.detach().flatten() for p in params]).double()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    cos = float((got * flat_w.double()).sum() / flat_w.double().norm())
    angle = torch.atan2(torch.tensor((1 - cos ** 2) ** 0.5), torch.tensor(cos))
    assert float(torch.tan(angle)) == pytest.approx(eta * float(v.norm()), rel=1e-4)


def test_unit_step_and_init_radius():
    torch.manual_seed(1)
    w, g = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)
    p = nn.Parameter(w.clone())
    p.grad = g.clone()
    SphereSGD([p], lr=0.3, sphere="unit", radius="init").step()
    for j in range(6):
        ref, _ = _sphere_ref(w[j].flatten(), g[j].flatten(), 0.3, radius=float(w[j].norm()))
        torch.testing.assert_close(p.detach()[j].flatten().double(), ref, rtol=1e-5, atol=1e-6)


def test_momentum_transport():
    """Two steps with momentum on one tensor against the equations: the buffer is the first
    tangent direction, projected onto the new tangent space, then mu * buf + v."""
    torch.manual_seed(2)
    w, g1, g2 = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    p = nn.Parameter(w.clone())
    opt = SphereSGD([p], lr=0.2, momentum=0.9, sphere="tensor")
    p.grad = g1.clone()
    opt.step()
    w1, v1 = _sphere_ref(w.flatten(), g1.flatten(), 0.2)
    torch.testing.assert_close(p.detach().flatten().double(), w1, rtol=1e-5, atol=1e-6)
    p.grad = g2.clone()
    opt.step()
    u1 = w1
    g_hat = g2.flatten().double()          # ||w1|| = 1
    v2 = g_hat - (g_hat @ u1) * u1
    buf = 0.9 * (v1 - (v1 @ u1) * u1) + v2
    new = u1 - 0.2 * buf
    torch.testing.assert_close(p.detach().flatten().double(), new / new.norm(),
                               rtol=1e-5, atol=1e-6)


def test_reference_code_equivalence():
    """The three-regimes code (--fix_elr): plain SGD with lr = ELR * rho0^2, then the SI vector
    rescaled jointly to rho0. SphereSGD(radius='init', sphere='joint') gives the same weights."""
    model, x, y = _fully_si(3)
    ref = copy.deepcopy(model)
    elr = 0.02
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    rho0 = float(torch.stack([p.detach().norm() for p in ref_params]).norm())
    assert abs(rho0 - 1) > 0.1
    opt = SphereSGD(params, lr=elr, radius="init")
    ref_opt = torch.optim.SGD(ref_params, lr=elr * rho0 ** 2)
    for _ in range(5):
        _step(model, opt, x, y)
        _step(ref, ref_opt, x, y)
        with torch.no_grad():   # fix_si_pnorm
            norm = torch.stack([p.norm() for p in ref_params]).norm()
            for p in ref_params:
                p.mul_(rho0 / norm)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_non_si_parameters_and_attach():
    torch.manual_seed(4)
    model = small_cnn(8)           # not fully SI: BN affine, trainable classifier
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    opt = SphereSGD(model.parameters(), lr=0.1, noninv_lr=0.05, momentum=0.5,
                    weight_decay=1e-2)
    opt.attach(model)
    si_names = si.scale_invariant_params(model)
    named = dict(model.named_parameters())
    assert {n for n in named if opt.is_scale_invariant(named[n], opt.param_groups[0])} == \
        set(si_names)
    # the rest: torch.optim.SGD with noninv_lr, momentum and weight decay, on the same gradients
    rest = {n: nn.Parameter(p.detach().clone()) for n, p in named.items() if n not in si_names}
    ref = torch.optim.SGD(rest.values(), lr=0.05, momentum=0.5, weight_decay=1e-2)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, q in rest.items():
            q.grad = named[n].grad.clone()
        opt.step()
        ref.step()
    joint = sum(float(named[n].detach().norm()) ** 2 for n in si_names)
    assert joint == pytest.approx(1.0, rel=1e-6)   # the SI weights live on the joint sphere
    for n, q in rest.items():
        torch.testing.assert_close(named[n], q, rtol=1e-6, atol=1e-7)
    frozen = SphereSGD(sphere_param_groups(model, lambda: x, noninv_lr=0.0), lr=0.1)
    fc = model[11].weight.detach().clone()
    _step(model, frozen, x, y)
    assert torch.equal(model[11].weight, fc)


def test_sphere_sgd_learns():
    torch.manual_seed(5)
    from ssl_suite.analysis.small_tasks import digits
    data = digits()
    x, y = data.x_train[:256], data.y_train[:256]
    model = small_cnn(8)
    si.make_fully_scale_invariant(model, lambda: x[:32])
    opt = SphereSGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    with torch.no_grad():
        first = float(F.cross_entropy(model(x), y))
    for i in range(40):
        idx = torch.arange(i * 32, (i + 1) * 32) % 256
        _step(model, opt, x[idx], y[idx])
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) < 0.6 * first
