"""SVI (Xu, Cheng & Xie 2022): directions against hand computations and against an independent
implementation of the authors' autograd formulation (spec 4.2: recompute every layer on a detached
input, backpropagate sum_l <X~_l^det, dL/dX_l>); warm start, composition, accumulation, resume."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_suite.optim import protocol
from ssl_suite.optim.svi import SVI

D = torch.float64


def svi_grads(model, loss_of_model, **kw):
    """p.grad after one protocol backward with SVI (fresh optimizer, hooks attached)."""
    opt = SVI(model.parameters(), lr=0.1, **kw)
    with protocol.attach(opt, model):
        opt.zero_grad(set_to_none=True)
        protocol.backward(opt, loss_of_model(model))
    return [p.grad.detach().clone() for p in model.parameters()]


def plain_grads(model, loss_of_model):
    model.zero_grad(set_to_none=True)
    loss_of_model(model).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def assert_all_close(got, want, atol=1e-12):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-10)


def authors_svi(blocks, params, x, loss_fn):
    """Spec 4.2 / official f0cf769: blocks = [(f, f_det, sigma)], f(X) in the graph, f_det the
    same layer recomputed on sg(X) (BN with batch statistics, no running-stat update)."""
    X, dets, posts = x, [], []
    for f, f_det, sigma in blocks:
        dets.append(f_det(X.detach()))
        X = sigma(f(X)) if sigma is not None else f(X)
        posts.append(X)
    loss = loss_fn(X)
    g_post = torch.autograd.grad(loss, posts, retain_graph=True)
    surrogate = sum((d * g.detach()).sum() for d, g in zip(dets, g_post))
    return list(torch.autograd.grad(surrogate, params))


# --- (1) one-layer GLM: the monotone field X^T (eta(X theta) - y) * 2/N ----------------------
@pytest.mark.parametrize("link", ["sigmoid", "softmax"])
def test_glm_direction_is_the_monotone_field(link):
    torch.manual_seed(1)
    N, p, K = 8, 3, 4
    x = torch.randn(N, p, dtype=D)
    lin = nn.Linear(p, K).double()
    act = nn.Sigmoid() if link == "sigmoid" else nn.Softmax(dim=1)
    model = nn.Sequential(lin, act)
    y = torch.rand(N, K, dtype=D) if link == "sigmoid" else F.one_hot(torch.arange(N) % K, K).to(D)

    def loss(m):  # per-sample sum of squares (OGB's MSE x K), mean over the batch
        return ((m(x) - y) ** 2).sum(1).mean()

    got = svi_grads(model, loss)
    with torch.no_grad():
        z = x @ lin.weight.T + lin.bias
        eta = torch.sigmoid(z) if link == "sigmoid" else torch.softmax(z, 1)
        r = eta - y
        c = 2.0 / N  # d/d eta of (1/N) sum ||eta - y||^2
        want = [c * r.T @ x, c * r.sum(0)]
    assert_all_close(got, want)
    # and it is not the gradient (the link's derivative matters)
    grad = plain_grads(model, loss)
    assert (grad[0] - want[0]).abs().max() > 1e-3


# --- (2) no activation / identity activations: SVI = gradient ------------------------------
@pytest.mark.parametrize("act", [None, nn.Identity])
def test_identity_activations_give_the_gradient(act):
    torch.manual_seed(2)
    layers = [nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 3)]
    mods = []
    for i, l in enumerate(layers):
        mods.append(l)
        if act is not None and i < 2:
            mods.append(act())
    model = nn.Sequential(*mods).double()
    x, t = torch.randn(7, 5, dtype=D), torch.randint(0, 3, (7,))

    def loss(m):
        return F.cross_entropy(m(x), t)

    assert_all_close(svi_grads(model, loss), plain_grads(model, loss))


# --- (3) the authors' formulation: ReLU MLP (also with a shared ReLU module), conv-BN-ReLU -----
@pytest.mark.parametrize("shared", [False, True])
def test_mlp_matches_authors_formulation(shared):
    torch.manual_seed(3)
    l1, l2, l3 = nn.Linear(5, 8), nn.Linear(8, 6), nn.Linear(6, 3)
    r1 = nn.ReLU()
    r2 = r1 if shared else nn.ReLU()  # torchvision-style: one ReLU module called twice
    model = nn.Sequential(l1, r1, l2, r2, l3).double()
    x, t = torch.randn(9, 5, dtype=D), torch.randint(0, 3, (9,))

    got = svi_grads(model, lambda m: F.cross_entropy(m(x), t))
    want = authors_svi([(l1, l1, F.relu), (l2, l2, F.relu), (l3, l3, None)],
                       list(model.parameters()), x, lambda out: F.cross_entropy(out, t))
    assert_all_close(got, want)
    grad = plain_grads(model, lambda m: F.cross_entropy(m(x), t))
    assert (grad[0] - got[0]).abs().max() > 1e-4  # ReLU' != 1 somewhere: not the gradient


def _bn_det(bn):
    return lambda h: F.batch_norm(h, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)


def test_conv_bn_relu_matches_authors_formulation():
    torch.manual_seed(4)
    c1, b1 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
    c2, b2 = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4)
    fc = nn.Linear(4, 3)
    model = nn.Sequential(c1, b1, nn.ReLU(inplace=True), c2, b2, nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).double().train()
    ref = copy.deepcopy(model)
    x, t = torch.randn(6, 2, 5, 5, dtype=D), torch.randint(0, 3, (6,))

    got = svi_grads(model, lambda m: F.cross_entropy(m(x), t))
    rc1, rb1, _, rc2, rb2, _, _, _, rfc = ref
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), rfc)
    want = authors_svi(
        [(lambda h: rb1(rc1(h)), lambda h: _bn_det(rb1)(rc1(h)), F.relu),
         (lambda h: rb2(rc2(h)), lambda h: _bn_det(rb2)(rc2(h)), F.relu),
         (head, head, None)],
        list(ref.parameters()), x, lambda out: F.cross_entropy(out, t))
    assert_all_close(got, want)


class _ResBlock(nn.Module):
    """stem conv-BN-ReLU, then a post-activation basic block with a downsample shortcut, a
    ReLU(inplace) like timm's, and a linear head: act2 owns conv2, bn2 and the downsample."""

    def __init__(self):
        super().__init__()
        self.c0, self.b0, self.a0 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(True)
        self.c1, self.b1, self.a1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(True)
        self.c2, self.b2, self.a2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(True)
        self.dc, self.db = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.a0(self.b0(self.c0(x)))
        out = self.b2(self.c2(self.a1(self.b1(self.c1(x)))))
        out += self.db(self.dc(x))
        return self.fc(self.a2(out).mean((2, 3)))


def test_residual_block_matches_authors_formulation_with_shortcut_in_f():
    torch.manual_seed(5)
    model = _ResBlock().double()
    m = copy.deepcopy(model)
    x, t = torch.randn(5, 2, 4, 4, dtype=D), torch.randint(0, 3, (5,))
    got = svi_grads(model, lambda mm: F.cross_entropy(mm(x), t))

    # reference: X0 = relu(f0(x)), X1 = relu(f1(X0)), X2 = relu(f2(X1, X0)) -- two detached inputs
    det = lambda bn: _bn_det(bn)  # noqa: E731
    X0 = F.relu(m.b0(m.c0(x)))
    d0 = det(m.b0)(m.c0(x))
    X1 = F.relu(m.b1(m.c1(X0)))
    d1 = det(m.b1)(m.c1(X0.detach()))
    X2 = F.relu(m.b2(m.c2(X1)) + m.db(m.dc(X0)))
    d2 = det(m.b2)(m.c2(X1.detach())) + det(m.db)(m.dc(X0.detach()))
    feat = X2.mean((2, 3))
    out = m.fc(feat)
    loss = F.cross_entropy(out, t)
    g0, g1, g2, gf = torch.autograd.grad(loss, [X0, X1, X2, out], retain_graph=True)
    sur = (d0 * g0).sum() + (d1 * g1).sum() + (d2 * g2).sum() + (m.fc(feat.detach()) * gf).sum()
    want = torch.autograd.grad(sur, list(m.parameters()))
    assert_all_close(got, want)
    assert all(a.inplace for a in (model.a0, model.a1, model.a2))  # restored on remove


def test_bypass_path_keeps_its_ordinary_derivative():
    """y = W3 relu(W1 x) + W2 x: W2's only path has no activation, so it gets its gradient;
    W1 gets J^T dL/dX (ReLU' -> 1); W3 is after the last activation: gradient."""
    torch.manual_seed(6)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2, self.w3 = nn.Linear(4, 5), nn.Linear(4, 3), nn.Linear(5, 3)
            self.act = nn.Tanh()

        def forward(self, x):
            return self.w3(self.act(self.w1(x))) + self.w2(x)

    model = Net().double()
    x, t = torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))
    loss = lambda m: F.cross_entropy(m(x), t)  # noqa: E731
    got = dict(zip([n for n, _ in model.named_parameters()], svi_grads(model, loss)))
    grad = dict(zip([n for n, _ in model.named_parameters()], plain_grads(model, loss)))
    for n in ("w2.weight", "w2.bias", "w3.weight", "w3.bias"):
        torch.testing.assert_close(got[n], grad[n], atol=1e-12, rtol=1e-10)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
        g_out = (p - F.one_hot(t, 3).to(D)) / len(t)
        g_h = g_out @ model.w3.weight
    torch.testing.assert_close(got["w1.weight"], g_h.T @ x, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got["w1.bias"], g_h.sum(0), atol=1e-12, rtol=1e-10)
    assert (got["w1.weight"] - grad["w1.weight"]).abs().max() > 1e-4  # tanh' != 1


# --- (4) BatchNorm running statistics: one update per step -----------------------------------
def test_bn_running_stats_updated_once_per_step():
    torch.manual_seed(7)
    bn = nn.BatchNorm1d(4, momentum=0.1)
    model = nn.Sequential(bn, nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    x, t = torch.randn(10, 4, dtype=D) * 2 + 1, torch.randint(0, 2, (10,))
    opt = SVI(model.parameters(), lr=0.1, base="sgd")
    with protocol.attach(opt, model):
        def closure():
            opt.zero_grad()
            losses = F.cross_entropy(model(x), t, reduction="none")
            protocol.backward(opt, losses.mean())
            return losses.detach()
        opt.step(closure)
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, 0.1 * x.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * x.var(0, unbiased=True))


def test_no_records_without_grad_or_after_zero_grad():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    opt = SVI(model.parameters(), lr=0.1)
    with protocol.attach(opt, model):
        with torch.no_grad():
            model(torch.randn(2, 3, dtype=D))
        assert opt._records == []
        model(torch.randn(2, 3, dtype=D))
        assert len(opt._records) == 1
        opt.zero_grad()
        assert opt._records == []


# --- (5) warm start ----------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(8)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()


def _closure(opt, model, x, t, record=None):
    def closure():
        opt.zero_grad(set_to_none=True)
        losses = F.cross_entropy(model(x), t, reduction="none")
        protocol.backward(opt, losses.mean())
        if record is not None:
            record.append([p.grad.clone() for p in model.parameters()])
        return losses.detach()
    return closure


@pytest.mark.parametrize("reset", [True, False])
def test_warm_start_switches_and_resets_base_state(reset):
    model = _mlp()
    x, t = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    opt = SVI(model.parameters(), lr=0.05, base="momentum", momentum=0.9,
              warm_start_fraction=0.5, total_steps=4, reset_base_state=reset)
    assert opt.svi_steps == 2
    seen = []
    with protocol.attach(opt, model):
        assert model[1].inplace is False
        for step in range(4):
            probe = copy.deepcopy(model)
            loss = lambda m: F.cross_entropy(m(x), t)  # noqa: E731
            want_svi = authors_svi([(probe[0], probe[0], F.relu), (probe[2], probe[2], None)],
                                   list(probe.parameters()), x, lambda o: F.cross_entropy(o, t))
            want_grad = plain_grads(probe, loss)
            opt.step(_closure(opt, model, x, t, seen))
            assert_all_close(seen[-1], want_svi if step < 2 else want_grad)
            if step == 1:  # the switch happened after the 2nd step
                assert not opt.uses_svi and model[1].inplace is True
                assert (len(opt.state) == 0) == reset
    assert (want_svi[0] - want_grad[0]).abs().max() > 1e-6  # the two regimes differ


# --- (6) composes with SGD and AdamW: same step as the base fed with the SVI directions --------
@pytest.mark.parametrize("base,ref", [
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("adamw", lambda ps: torch.optim.AdamW(ps, lr=0.1, betas=(0.8, 0.9), weight_decay=1e-2)),
])
def test_composes_with_base_optimizers(base, ref):
    model = _mlp()
    twin = copy.deepcopy(model)
    x, t = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    kw = {"betas": (0.8, 0.9)} if base == "adamw" else {}
    opt = SVI(model.parameters(), lr=0.1, base=base, momentum=0.9, weight_decay=1e-2, **kw)
    assert type(opt.optimizer) is (torch.optim.SGD if base == "sgd" else torch.optim.AdamW)
    ref_opt = ref(list(twin.parameters()))
    with protocol.attach(opt, model):
        for _ in range(3):
            want = authors_svi([(twin[0], twin[0], F.relu), (twin[2], twin[2], None)],
                               list(twin.parameters()), x, lambda o: F.cross_entropy(o, t))
            for p, g in zip(twin.parameters(), want):
                p.grad = g
            ref_opt.step()
            out = opt.step(_closure(opt, model, x, t))
            assert out.shape == (8,)  # step returns the closure's per-sample losses
    assert_all_close(list(model.parameters()), list(twin.parameters()), atol=1e-12)


# --- (7) gradient accumulation ------------------------------------------------------------------
def test_micro_batches_add_up():
    model = _mlp()
    x, t = torch.randn(10, 4, dtype=D), torch.randint(0, 3, (10,))
    parts = [(x[:4], t[:4]), (x[4:], t[4:])]
    each = [svi_grads(model, lambda m, a=a, b=b: F.cross_entropy(m(a), b) / 2) for a, b in parts]
    opt = SVI(model.parameters(), lr=0.1)
    with protocol.attach(opt, model):
        opt.zero_grad(set_to_none=True)
        for a, b in parts:
            protocol.backward(opt, F.cross_entropy(model(a), b) / 2)
    assert_all_close([p.grad for p in model.parameters()], [u + v for u, v in zip(*each)])


# --- (8) state_dict round trip (across the warm-start switch) ----------------------------------
def test_state_dict_round_trip_is_bit_identical():
    x, t = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    kw = dict(lr=0.05, base="adamw", warm_start_fraction=0.4, total_steps=5)
    model = _mlp()
    opt = SVI(model.parameters(), **kw)
    h = protocol.attach(opt, model)
    opt.step(_closure(opt, model, x, t))
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    for _ in range(4):
        opt.step(_closure(opt, model, x, t))
    assert opt.state_dict()["svi"]["switched"] and opt.state_dict()["svi"]["step"] == 5
    h.remove()

    opt2 = SVI(model2.parameters(), lr=1.0, base="adamw")  # loaded values replace these
    with protocol.attach(opt2, model2):
        opt2.load_state_dict(sd)
        assert opt2.svi_steps == 2 and opt2._svi_step == 1 and opt2.uses_svi
        for _ in range(4):
            opt2.step(_closure(opt2, model2, x, t))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["svi"] == opt.state_dict()["svi"]
    with pytest.raises(ValueError, match="base"):
        SVI(_mlp().parameters(), lr=0.1, base="sgd").load_state_dict(sd)


# --- (9) inplace flags restored; inplace and not give the same directions ------------------------
def test_inplace_restored_and_irrelevant():
    torch.manual_seed(9)
    a = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 5), nn.ELU(inplace=True),
                      nn.Linear(5, 2)).double()
    b = copy.deepcopy(a)
    b[1].inplace = b[3].inplace = False
    x, t = torch.randn(6, 4, dtype=D), torch.randint(0, 2, (6,))
    opt = SVI(a.parameters(), lr=0.1)
    h = protocol.attach(opt, a)
    assert a[1].inplace is False and a[3].inplace is False
    opt.zero_grad()
    protocol.backward(opt, F.cross_entropy(a(x), t))
    h.remove()
    assert a[1].inplace is True and a[3].inplace is True
    assert_all_close([p.grad for p in a.parameters()],
                     svi_grads(b, lambda m: F.cross_entropy(m(x), t)))
    # detached: hooks gone, an ordinary backward is the gradient
    assert_all_close(plain_grads(a, lambda m: F.cross_entropy(m(x), t)),
                     plain_grads(b, lambda m: F.cross_entropy(m(x), t)))


def test_validation_messages():
    ps = list(_mlp().parameters())
    with pytest.raises(ValueError, match="lr"):
        SVI(ps, lr=-1.0)
    with pytest.raises(ValueError, match="warm_start_fraction"):
        SVI(ps, lr=0.1, warm_start_fraction=1.5, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        SVI(ps, lr=0.1, warm_start_fraction=0.1)
    with pytest.raises(ValueError, match="base"):
        SVI(ps, lr=0.1, base="svi")
    with pytest.raises(ValueError, match="base"):
        SVI(ps, lr=0.1, base="nosuchoptimizer")
    with pytest.raises(ValueError, match="momentum"):
        SVI(ps, lr=0.1, momentum=1.5)


# --- accelerator: divided by gradient_accumulation_steps, scaled by its GradScaler -------------
class _FakeAccelerator:
    def __init__(self, scale, steps):
        self.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        self.gradient_accumulation_steps = steps
        self.distributed_type = "NO"

    def backward(self, loss):  # what accelerate does (used after the warm-start switch)
        self.scaler.scale(loss / self.gradient_accumulation_steps).backward()


def test_accelerator_scaling_matches_accelerate():
    model = _mlp()
    x, t = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    want = svi_grads(copy.deepcopy(model), lambda m: F.cross_entropy(m(x), t))
    opt = SVI(model.parameters(), lr=0.1)
    with protocol.attach(opt, model):
        opt.zero_grad()
        protocol.backward(opt, F.cross_entropy(model(x), t), _FakeAccelerator(8.0, 2))
    assert_all_close([p.grad for p in model.parameters()], [4.0 * w for w in want])


def test_lookahead_and_scheduler_see_the_shared_groups():
    from ssl_suite.optim.lookahead import wrap_lookahead
    model = _mlp()
    x, t = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    svi = SVI(model.parameters(), lr=0.2, base="adamw")
    la = wrap_lookahead(svi, k=2)
    assert protocol.unwrap(la) is svi and la.param_groups is svi.optimizer.param_groups
    sched = torch.optim.lr_scheduler.LambdaLR(la, lambda s: 0.5 ** s)
    with protocol.attach(la, model):
        la.step(_closure(la, model, x, t))
        assert svi._svi_step == 1 and svi.state is svi.optimizer.state and len(svi.state) == 4
        sched.step()
    assert svi.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
