"""Scale-invariance detection, weight rescaling (WRS) and the ELR monitor."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import ssl_suite  # noqa: F401  (registers resnet18_cifar)
from ssl_suite.analysis import scale_invariance as si
from ssl_suite.analysis.small_tasks import small_cnn
from ssl_suite.optim.replica_sgd import recompute_bn_stats
from ssl_suite.optim.sphere import SphereSGD
from ssl_suite.optim.wrs import ELRMonitor, WeightRescaling, unit_view

CONVS = ["0.weight", "3.weight", "6.weight"]


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


class _Mixed(nn.Module):
    """SI and non-SI patterns that module order alone cannot tell apart."""

    def __init__(self, c_bias=True):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)     # conv-BN: SI per filter
        self.bna = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1, bias=False)     # output also in the residual: not SI
        self.bnb = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 8, 1, bias=c_bias)              # conv-ReLU-BN: SI iff no bias
        self.bnc = nn.BatchNorm2d(8)
        self.d = nn.Linear(8, 16)                              # bias then LayerNorm: not SI
        self.ln = nn.LayerNorm(16)
        self.e = nn.Linear(16, 16, bias=False)                 # linear-LN: SI as a tensor
        self.ln2 = nn.LayerNorm(16)
        self.f = nn.Linear(16, 4)                              # classifier: not SI

    def forward(self, x):
        h = self.bna(self.a(x)).relu()
        y = self.b(h)
        h = self.bnb(y) + y
        h = self.bnc(self.c(h).relu()).mean((2, 3))
        h = self.ln2(self.e(self.ln(self.d(h))))
        return self.f(h)


def _numerical(model, x, per="tensor"):
    return [n for n, p in model.named_parameters()
            if p.ndim > 1 and si.is_scale_invariant(model, n, x, per=per)]


# -- detection --------------------------------------------------------------------------------

def test_detection_small_cnn_traced_order_and_numerical_agree():
    model, (x, _) = small_cnn(8), _data()
    assert si.scale_invariant_params(model, lambda: x) == CONVS
    assert si.scale_invariant_params(model) == CONVS
    assert _numerical(model, x) == CONVS
    assert _numerical(model, x, per="unit") == CONVS
    assert {s.granularity for s in si.scale_invariant_info(model, lambda: x)} == {"unit"}
    # the numerical check really sees a change for the classifier
    assert not si.is_scale_invariant(model, "11.weight", x)


@pytest.mark.parametrize("c_bias", [True, False])
def test_detection_traced_follows_the_data_flow(c_bias):
    torch.manual_seed(0)
    model, x = _Mixed(c_bias), torch.randn(8, 3, 6, 6)
    traced = si.scale_invariant_info(model, lambda: x)
    names = [s.name for s in traced]
    expected = ["a.weight", "e.weight"] if c_bias else ["a.weight", "c.weight", "e.weight"]
    assert names == expected
    assert _numerical(model, x) == expected
    gran = {s.name: s.granularity for s in traced}
    assert gran["a.weight"] == "unit" and gran["e.weight"] == "tensor"
    assert si.is_scale_invariant(model, "a.weight", x, per="unit")
    assert not si.is_scale_invariant(model, "e.weight", x, per="unit")
    # module order cannot see the residual of b (documented limitation)
    assert "b.weight" in si.scale_invariant_params(model)


def test_detection_rejects_other_uses():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.n1 = nn.Linear(6, 6, bias=False), nn.LayerNorm(6)
            self.l2 = nn.Linear(6, 6, bias=False)
            self.l2.weight = self.l1.weight
            self.l3, self.n3 = nn.Linear(6, 6, bias=False), nn.LayerNorm(6)

        def forward(self, x):
            h = self.n1(self.l1(x))
            return self.l2(h) + self.n3(self.l3(h))   # the tied weight also feeds the output

    model, x = Tied(), torch.randn(5, 6)
    assert si.scale_invariant_params(model, lambda: x) == ["l3.weight"]
    assert _numerical(model, x) == ["l3.weight"]

    class AlsoOutput(nn.Module):   # the conv output also leaves the model un-normalized
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            z = self.conv(x)
            return self.bn(z), z.relu().mean((2, 3))

    model, x = AlsoOutput(), torch.randn(8, 1, 6, 6)
    assert si.scale_invariant_params(model, lambda: x) == []
    assert _numerical(model, x) == []
    assert si.scale_invariant_params(model) == ["conv.weight"]   # module order cannot tell

    class Functional(nn.Module):   # the weight is also used outside its module
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + F.conv2d(x, self.conv.weight)

    model = Functional()
    assert si.scale_invariant_params(model, lambda: x) == []
    assert _numerical(model, x) == []


def test_detection_tiny_timm_resnet():
    model = timm.create_model("resnet18_cifar", num_classes=10, channels=[8, 16, 32, 64],
                              stem_width=8)
    x = torch.randn(4, 3, 16, 16)
    state = copy.deepcopy(model.state_dict())
    traced = si.scale_invariant_params(model, lambda: x)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert traced == [f"{n}.weight" for n in convs] and len(traced) == 21
    assert si.scale_invariant_params(model) == traced
    assert _numerical(model, x) == traced
    # tracing left the running statistics alone
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_make_fully_scale_invariant():
    torch.manual_seed(0)
    model, (x, _) = small_cnn(8), _data()
    changed = si.make_fully_scale_invariant(model, lambda: x)
    assert changed["last_layer"] == "11" and changed["frozen"] == ["11.weight", "11.bias"]
    assert changed["bn_affine_removed"] == ["1", "4", "7"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == CONVS == changed["scale_invariant"]
    assert all(si.is_scale_invariant(model, n, x) for n in trainable)
    assert float(model[11].weight.norm()) == pytest.approx(10.0, rel=1e-5)
    assert model[1].weight is None and not model[1].affine
    # bias in front of BN is removed without changing the eval-mode function
    m2 = nn.Sequential(nn.Conv2d(1, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(),
                       nn.Linear(144, 3))
    recompute_bn_stats(m2, [x[:16], x[16:]])
    m2.eval()
    before = m2(x)
    out = si.make_fully_scale_invariant(m2, lambda: x, seed=None,
                                        last_layer_norm=m2[3].weight.norm().item())
    assert out["bias_removed"] == ["0.bias"]
    torch.testing.assert_close(m2(x), before, rtol=1e-5, atol=1e-5)


# -- WRS --------------------------------------------------------------------------------------

@pytest.mark.parametrize("per,target", [("unit", 1.0), ("tensor", 2.0)])
def test_wrs_norms_after_each_step(per, target):
    torch.manual_seed(0)
    model, (x, y) = small_cnn(8), _data()
    wrs = WeightRescaling(model, lambda: x, per=per, target_norm=target)
    assert wrs.names == CONVS
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    wrs.on_train_start()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        drift = max(float((unit_view(p.detach()).norm(dim=1) - target).abs().max())
                    if per == "unit" else abs(float(p.detach().norm()) - target)
                    for p in wrs.params)
        assert drift > 1e-4          # the step moved the norms ...
        wrs.after_step()
        for p in wrs.params:         # ... and WRS put them back
            if per == "unit":
                torch.testing.assert_close(unit_view(p).norm(dim=1),
                                           torch.full((p.shape[0],), target))
            else:
                assert float(p.detach().norm()) == pytest.approx(target, rel=1e-6)
    if per == "tensor":   # per-tensor leaves the filters' relative norms free
        assert float(unit_view(wrs.params[1].detach()).norm(dim=1).std()) > 1e-3


def test_wrs_keeps_the_function_with_recalibrated_bn():
    torch.manual_seed(0)
    model, (x, _) = small_cnn(8), _data(64)
    batches = [x[:32], x[32:]]
    recompute_bn_stats(model, batches)
    model.eval()
    with torch.no_grad():
        before = model(x)
        wrs = WeightRescaling(model, per="unit")
        factors = wrs.rescale()
        assert max(float((f - 1).abs().max()) for f in factors) > 0.3   # a real rescale
        stale = model(x)
        recompute_bn_stats(model, batches)
        after = model(x)
    assert float((stale - before).abs().max()) > 1e-2   # eval BN sees the change ...
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)   # ... until recalibrated
    # rescaling the (non-SI) classifier does change the recalibrated function
    with torch.no_grad():
        model[11].weight.mul_(2.0)
        assert float((model(x) - before).abs().max()) > 1e-2


def test_wrs_layer_types_fallback_and_every():
    torch.manual_seed(0)
    model, x = _Mixed(c_bias=False), torch.randn(8, 3, 6, 6)
    wrs = WeightRescaling(model, lambda: x, per="unit")
    assert wrs.modes == {"a.weight": "unit", "c.weight": "tensor", "e.weight": "tensor"}
    convs_only = WeightRescaling(model, lambda: x, per={nn.Conv2d: "unit"})
    assert convs_only.names == ["a.weight", "c.weight"]
    assert WeightRescaling(model, lambda: x, layer_types=(nn.Linear,)).names == ["e.weight"]
    every = WeightRescaling([("e", model.e.weight)], per="tensor", every=2)
    with torch.no_grad():
        model.e.weight.mul_(3.0)
    every.after_step()
    assert float(model.e.weight.detach().norm()) != pytest.approx(1.0)
    every.after_step()
    assert float(model.e.weight.detach().norm()) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError):
        WeightRescaling(model, lambda: x, per="layer")


def test_wrs_scale_momentum():
    torch.manual_seed(0)
    model, (x, y) = small_cnn(8), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrs = WeightRescaling(model, per="unit", optimizer=opt, scale_momentum=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in wrs.params]
    factors = wrs.rescale()
    for p, b, f in zip(wrs.params, bufs, factors):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], b * f)


# -- ELR --------------------------------------------------------------------------------------

def _fully_si(seed=0):
    torch.manual_seed(seed)
    model, (x, y) = small_cnn(8), _data()
    si.make_fully_scale_invariant(model, lambda: x)
    return model, x, y


def test_elr_of_sgd_is_lr_over_norm_squared():
    model, x, y = _fully_si()
    lr = 0.3
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    monitor = ELRMonitor(model, example_input_fn=lambda: x)
    assert [n for n, _ in monitor.named] == CONVS
    for _ in range(2):
        w0 = [p.detach().clone() for _, p in monitor.named]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        monitor.before_step()
        opt.step()
        stats = monitor.after_step(opt)
        for (name, _), w in zip(monitor.named, w0):
            row = monitor.last[name]
            assert row["elr"] == pytest.approx(lr / float(w.norm()) ** 2, rel=1e-6)
            assert row["elr_measured"] == pytest.approx(row["elr"], rel=1e-3)
        total = sum(float(w.norm()) ** 2 for w in w0)
        assert stats["elr_joint"] == pytest.approx(lr / total, rel=1e-6)
        assert stats["elr_measured_joint"] == pytest.approx(stats["elr_joint"], rel=1e-3)
    # momentum makes the measured ELR differ from lr/||w||^2
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                          momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        monitor.before_step()
        opt.step()
        stats = monitor.after_step(opt)
    assert abs(stats["elr_measured_mean"] / stats["elr_mean"] - 1) > 0.05


def test_sgd_angular_update_equals_sphere_step_with_elr():
    """SGD on an SI tensor moves its direction exactly like projected SGD on the unit sphere
    with ELR = lr / ||w||^2 (Kodryan et al. 2022, Sec. 2). float64 and BN eps ~ 0 make the
    invariance exact, so the two agree to rounding."""
    model, x, y = _fully_si(1)
    model.double()
    x = x.double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-12
    with torch.no_grad():   # give the tensors different norms
        for k, p in enumerate(p for p in model.parameters() if p.requires_grad):
            p.mul_(0.5 + k)
    lr = 0.2
    params = [p for p in model.parameters() if p.requires_grad]
    elrs = [lr / float(p.detach().norm()) ** 2 for p in params]

    def sphere_step(elr_factor):
        m = copy.deepcopy(model)
        ps = [p for p in m.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in ps:
                p.div_(p.norm())
        opt = SphereSGD([{"params": [p], "lr": e * elr_factor} for p, e in zip(ps, elrs)],
                        sphere="tensor")
        F.cross_entropy(m(x), y).backward()
        opt.step()
        return ps

    sphere_params = sphere_step(1.0)
    wrong = sphere_step(1.5)
    F.cross_entropy(model(x), y).backward()
    torch.optim.SGD(params, lr=lr).step()
    for p, q, r in zip(params, sphere_params, wrong):
        p, q, r = p.detach(), q.detach(), r.detach()
        assert float(q.norm()) == pytest.approx(1.0, rel=1e-6)
        torch.testing.assert_close(p / p.norm(), q, rtol=1e-9, atol=1e-10)
        assert float((p / p.norm() - r).abs().max()) > 1e-4   # another ELR does not match
