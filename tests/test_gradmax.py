"""GradMax (Evci et al., ICLR 2022): function preservation, Eq. 8-9 gradient identity, optimizer state."""

import io

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from ssl_suite.models.gradmax import (ReLU1, gradmax_matrix, grow_conv_pair, grow_linear_pair,
                                      grow_optimizer_state, relu1)

torch.set_num_threads(1)


def _mlp():
    return nn.Sequential(nn.Linear(6, 4), ReLU1(), nn.Linear(4, 5), ReLU1(), nn.Linear(5, 3))


def _closure(model, x, y):
    def closure():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


class ConvNet(nn.Module):
    def __init__(self, bn=False, pad2=1):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.act = ReLU1()
        self.c2 = nn.Conv2d(4, 5, 3, padding=pad2)
        side = 4 + 2 * pad2 - 2
        self.head = nn.Linear(5 * side * side, 3)

    def forward(self, x):
        h = self.c2(self.act(self.bn(self.c1(x))))
        return self.head(torch.tanh(h).flatten(1))


def test_relu1_derivative_at_zero_is_one():
    x = torch.zeros(3, requires_grad=True)
    relu1(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    x2 = torch.zeros(3, requires_grad=True)
    torch.relu(x2).sum().backward()
    assert torch.equal(x2.grad, torch.zeros(3))   # why ReLU1 is needed


def test_linear_matrix_matches_hand_formula():
    model = _mlp()
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    M = gradmax_matrix(model[0], model[2], _closure(model, x, y))
    h = x
    z1 = model[0](h).detach()
    z2 = model[2](relu1(z1)).detach().requires_grad_(True)
    F.cross_entropy(model[4](relu1(z2)), y).backward()
    assert torch.allclose(M, (z2.grad.T @ h).double(), atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("scale_method", ["fixed", "mean_norm"])
def test_linear_growth_preserves_function_and_maximises_gradient(k, scale_method):
    model = _mlp()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with torch.no_grad():
        before = model(x)
    old_mean_norm = model[2].weight.norm(dim=0).mean().item()
    info = grow_linear_pair(model[0], model[2], k, _closure(model, x, y), scale=0.5,
                            scale_method=scale_method)
    assert model[0].weight.shape == (4 + k, 6) and model[2].weight.shape == (5, 4 + k)
    assert model[0].out_features == 4 + k and model[2].in_features == 4 + k
    assert torch.count_nonzero(model[0].weight[4:]) == 0
    assert torch.count_nonzero(model[0].bias[4:]) == 0
    with torch.no_grad():
        assert (model(x) - before).abs().max() < 1e-6
    expected_mag = 0.5 if scale_method == "fixed" else 0.5 * old_mean_norm
    assert info["magnitude"] == pytest.approx(expected_mag, rel=1e-6)
    assert torch.allclose(model[2].weight[:, 4:].norm(dim=0), torch.full((k,), expected_mag),
                          rtol=1e-5)

    _closure(model, x, y)()
    g_new = model[0].weight.grad[4:]
    gradmax_sq = g_new.double().pow(2).sum()
    target = info["magnitude"] ** 2 * info["singular_values"].pow(2).sum()
    assert torch.allclose(gradmax_sq, target, rtol=1e-4)
    assert gradmax_sq > 0

    # Random outgoing weights of the same norm: orthonormal (same constraint) and, for k = 1,
    # the code's uniform[0,1) baseline; neither may beat the SVD directions.
    M = info["M"]
    for _ in range(20):
        q, _r = torch.linalg.qr(torch.randn(M.shape[0], k, dtype=torch.float64))
        rand_sq = (info["magnitude"] * q).T.matmul(M).pow(2).sum()
        assert rand_sq < gradmax_sq
        if k == 1:
            u = torch.rand(M.shape[0], 1, dtype=torch.float64)
            u = info["magnitude"] * u / u.norm()
            assert (u.T @ M).pow(2).sum() <= gradmax_sq * (1 + 1e-9)


def test_random_growth_gradient_matches_formula_too():
    """The identity dL/dW_in_new = W_out_new^T M holds for any outgoing weights (Eq. 8)."""
    model = _mlp()
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    M = gradmax_matrix(model[0], model[2], _closure(model, x, y))
    w = torch.randn(5, 2)
    with torch.no_grad():
        model[0].weight = nn.Parameter(torch.cat([model[0].weight, torch.zeros(2, 6)]))
        model[0].bias = nn.Parameter(torch.cat([model[0].bias, torch.zeros(2)]))
        model[2].weight = nn.Parameter(torch.cat([model[2].weight, w], 1))
    _closure(model, x, y)()
    assert torch.allclose(model[0].weight.grad[4:].double(), w.double().T @ M, atol=1e-6)


@pytest.mark.parametrize("k,pad2", [(1, 1), (3, 1), (2, 0), (2, 2)])
def test_conv_growth_preserves_function_and_gradient_identity(k, pad2):
    net = ConvNet(pad2=pad2)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    with torch.no_grad():
        before = net(x)
    info = grow_conv_pair(net.c1, net.c2, k, _closure(net, x, y), scale=0.7,
                          scale_method="fixed")
    assert net.c1.weight.shape == (4 + k, 3, 3, 3) and net.c2.weight.shape == (5, 4 + k, 3, 3)
    with torch.no_grad():
        assert (net(x) - before).abs().max() < 1e-6
    _closure(net, x, y)()
    g_sq = net.c1.weight.grad[4:].double().pow(2).sum()
    target = 0.49 * info["singular_values"].pow(2).sum()
    assert torch.allclose(g_sq, target, rtol=1e-4)
    # per-new-channel gradient equals M^T vec(W_out_new) exactly
    w_new = net.c2.weight[:, 4:].detach().double().transpose(0, 1).reshape(k, -1)
    pred = (w_new @ info["M"]).view(k, 3, 3, 3)
    assert torch.allclose(net.c1.weight.grad[4:].double(), pred, atol=1e-6)
    for _ in range(10):
        q, _r = torch.linalg.qr(torch.randn(info["M"].shape[0], k, dtype=torch.float64))
        assert (0.7 * q).T.matmul(info["M"]).pow(2).sum() < g_sq


def test_conv_growth_with_batchnorm_keeps_function_train_and_eval():
    net = ConvNet(bn=True)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    net.train()
    net(torch.randn(4, 3, 8, 8))               # non-trivial running stats
    net.bn.momentum = 0.0                       # freeze them for the eval comparison
    net.eval()
    with torch.no_grad():
        before_eval = net(x)
    net.train()
    with torch.no_grad():
        before_train = net(x)
    grow_conv_pair(net.c1, net.c2, 2, _closure(net, x, y), norm=net.bn)
    assert net.bn.weight.shape == (6,) and net.bn.running_var.shape == (6,)
    assert net.bn.num_features == 6
    assert torch.equal(net.bn.weight[4:], torch.ones(2)) and torch.equal(net.bn.bias[4:], torch.zeros(2))
    assert torch.equal(net.bn.running_mean[4:], torch.zeros(2))
    assert torch.equal(net.bn.running_var[4:], torch.ones(2))
    with torch.no_grad():
        assert (net(x) - before_train).abs().max() < 1e-6
        net.eval()
        assert (net(x) - before_eval).abs().max() < 1e-6


def _grow_with_optimizer(opt_factory, **kw):
    model = _mlp()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = opt_factory(model.parameters())
    for _ in range(3):
        opt.step(_closure(model, x, y))
    old_w0 = model[0].weight
    old_state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[old_w0].items()}
    info = grow_linear_pair(model[0], model[2], 2, _closure(model, x, y), optimizer=opt, **kw)
    new_w0 = model[0].weight
    assert old_w0 not in opt.state
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters()}
    return model, opt, old_state, new_w0, info, (x, y)


def test_sgd_momentum_state_grows_and_step_works():
    model, opt, old_state, w0, info, (x, y) = _grow_with_optimizer(
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    buf = opt.state[w0]["momentum_buffer"]
    assert buf.shape == w0.shape
    assert torch.equal(buf[:4], old_state["momentum_buffer"])
    assert torch.count_nonzero(buf[4:]) == 0
    buf2 = opt.state[model[2].weight]["momentum_buffer"]
    assert buf2.shape == (5, 6) and torch.count_nonzero(buf2[:, 4:]) == 0
    opt.step(_closure(model, x, y))
    assert torch.count_nonzero(model[0].weight[4:]) > 0     # new incoming weights start learning


@pytest.mark.parametrize("fill", ["mean", "zero"])
def test_adam_state_grows_step_kept_and_first_update(fill):
    lr = 1e-2
    model, opt, old_state, w0, info, (x, y) = _grow_with_optimizer(
        lambda p: torch.optim.Adam(p, lr=lr), exp_avg_sq_fill=fill)
    st = opt.state[w0]
    assert st["exp_avg"].shape == w0.shape and st["exp_avg_sq"].shape == w0.shape
    assert torch.equal(st["exp_avg"][:4], old_state["exp_avg"])
    assert torch.equal(st["exp_avg_sq"][:4], old_state["exp_avg_sq"])
    assert torch.equal(st["step"], old_state["step"])
    assert torch.count_nonzero(st["exp_avg"][4:]) == 0
    if fill == "mean":
        assert torch.allclose(st["exp_avg_sq"][4:], old_state["exp_avg_sq"].mean().expand(2, 6))
    else:
        assert torch.count_nonzero(st["exp_avg_sq"][4:]) == 0
    opt.step(_closure(model, x, y))
    upd = model[0].weight[4:].detach().abs()
    assert torch.isfinite(upd).all() and upd.max() > 0
    if fill == "zero":   # the spec's pitfall: ~ (1-b1)/sqrt(1-b2^t) * lr where grad != 0
        t = float(opt.state[w0]["step"])
        big = lr * 0.1 / (1 - 0.9 ** t) * ((1 - 0.999 ** t) / 0.001) ** 0.5
        nz = model[0].weight.grad[4:].abs() > 1e-5
        assert nz.any()
        assert torch.allclose(upd[nz], torch.full_like(upd[nz], big), rtol=1e-2)


def test_state_dict_roundtrip_after_growth():
    model, opt, _, w0, _, (x, y) = _grow_with_optimizer(lambda p: torch.optim.Adam(p, lr=1e-2))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    # a fresh model/optimizer with the grown shape loads the checkpoint and steps identically
    model2 = nn.Sequential(nn.Linear(6, 6), ReLU1(), nn.Linear(6, 5), ReLU1(), nn.Linear(5, 3))
    model2.load_state_dict(ckpt["model"])
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    opt.step(_closure(model, x, y))
    opt2.step(_closure(model2, x, y))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_grow_optimizer_state_rejects_unknown_param_and_bad_fill():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    with pytest.raises(KeyError):
        grow_optimizer_state(opt, nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3)), 0)
    with pytest.raises(ValueError):
        grow_optimizer_state(opt, p, nn.Parameter(torch.zeros(3)), 0, exp_avg_sq_fill="x")


def test_bad_pairs_rejected():
    with pytest.raises(TypeError):
        grow_linear_pair(nn.Linear(2, 3), nn.Conv2d(3, 2, 1), 1, lambda: None)
    with pytest.raises(ValueError):
        grow_linear_pair(nn.Linear(2, 3), nn.Linear(4, 2), 1, lambda: None)
    with pytest.raises(ValueError):
        grow_conv_pair(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 2, 3, stride=2), 1, lambda: None)
