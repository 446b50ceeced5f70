"""MBF (mini-block Fisher, [RECONSTRUCTION] of Bahamou et al. 2023): mini-blocks of the curvature
against per-sample gradients from torch.func, the preconditioned step against an explicit
block-diagonal solve, the large-damping limit against torch's SGD, schedules, hooks, state_dict,
and the C kernels (tile layout, Cholesky inverse, fused update) against torch."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ssl_suite.analysis import small_tasks
from ssl_suite.optim import protocol
from ssl_suite.optim import mbf as mbf_module
from ssl_suite.optim.mbf import MBF

DT = torch.float64


class Net(nn.Module):
    """Conv2d(2->3, 3x3, bias) on 5x5 inputs -> ReLU -> Linear(27 -> 4)."""

    def __init__(self, bn: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=True)
        self.bn = nn.BatchNorm2d(3) if bn else nn.Identity()
        self.fc = nn.Linear(27, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=DT), torch.randint(0, 4, (n,), generator=g)


def _model(seed=0, bn=False):
    torch.manual_seed(seed)
    return Net(bn).to(DT)


def _per_sample_grads(model, x, y):
    """{name: [n, *shape]} gradients of each sample's loss, computed without hooks."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))
    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def _outer_mean(g):
    """(1/n) sum_n g_n g_n^T for g of shape [n, P, d] -> [P, d, d]."""
    return (g.unsqueeze(-1) * g.unsqueeze(-2)).mean(0)


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad(set_to_none=True)
        losses = F.cross_entropy(model(x), y, reduction="none")
        protocol.backward(opt, losses.mean())
        return losses.detach()
    return closure


def _one_step(**kw):
    model = _model()
    x, y = _data()
    opt = MBF(model.parameters(), lr=0.0, **kw)
    handle = opt.attach(model)
    opt.step(_closure(opt, model, x, y))
    handle.remove()
    return model, opt, _per_sample_grads(model, x, y), x


@pytest.mark.parametrize("conv_block", ["kernel", "filter"])
def test_conv_blocks_equal_per_sample_outer_products(conv_block):
    model, opt, ps, _ = _one_step(conv_block=conv_block)
    gw = ps["conv.weight"]                                                  # [n, 3, 2, 3, 3]
    blocks = gw.reshape(len(gw), 6, 9) if conv_block == "kernel" else gw.reshape(len(gw), 3, 18)
    torch.testing.assert_close(opt.block_fisher(model.conv.weight), _outer_mean(blocks),
                               rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(opt.state[model.conv.bias]["fisher"],
                               ps["conv.bias"].square().mean(0), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("linear_block", ["row", "chunk"])
def test_linear_blocks_equal_per_sample_outer_products(linear_block):
    model, opt, ps, _ = _one_step(linear_block=linear_block, chunk_size=8)
    g = torch.cat([ps["fc.weight"], ps["fc.bias"].unsqueeze(-1)], -1)       # [n, 4, 28] = [W | b]
    if linear_block == "chunk":
        g = F.pad(g, (0, 4)).reshape(len(g), 4 * 4, 8)                      # 28 -> 4 chunks of 8
    expected = _outer_mean(g)
    assert expected.shape == ((4, 28, 28) if linear_block == "row" else (16, 8, 8))
    torch.testing.assert_close(opt.block_fisher(model.fc.weight), expected,
                               rtol=1e-10, atol=1e-14)


def test_grouped_reflect_padded_conv():
    """groups=2, padding='same' with reflect padding: kernel blocks still match torch.func."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2, padding="same", padding_mode="reflect"),
                          nn.Flatten(), nn.Linear(64, 3)).to(DT)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 4, 4, 4, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)
    opt = MBF(model.parameters(), lr=0.0)
    h = opt.attach(model)
    opt.step(_closure(opt, model, x, y))
    h.remove()
    gw = _per_sample_grads(model, x, y)["0.weight"]                        # [5, 4, 2, 3, 3]
    torch.testing.assert_close(opt.block_fisher(model[0].weight),
                               _outer_mean(gw.reshape(5, 8, 9)), rtol=1e-10, atol=1e-14)


def test_timm_resnet_with_inplace_ops():
    """timm's ResNet modifies BN outputs in place (x += shortcut, inplace ReLU): every hooked
    layer still gets its statistics, and the step runs."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3, channels=[4, 8, 8, 8], stem_width=4,
                              zero_init_last=False)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    opt = MBF(model.parameters(), lr=0.01)
    h = opt.attach(model)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert opt._layers and all(l.rows == 4 for l in opt._layers)
    assert {l.kind for l in opt._layers} == {"conv", "bn", "linear"}
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    h.remove()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_kfac_factors():
    model, opt, ps, x = _one_step(linear_block="kfac")
    a = F.relu(model.conv(x)).flatten(1).detach()
    a = torch.cat([a, torch.ones(len(a), 1, dtype=DT)], 1)
    st = opt.state[model.fc.weight]
    torch.testing.assert_close(st["fisher_A"], a.t() @ a / len(a))
    # delta_{n,o} = d l_n / d z_{n,o} = the per-sample bias gradient
    torch.testing.assert_close(st["fisher_D"], ps["fc.bias"].square().mean(0))


def test_two_views_and_micro_batches_scaling():
    """Rows from several calls in one step: G_row = M * (the row's share of the gradient)."""
    model = _model()
    x1, y = _data(4, seed=1)
    x2, _ = _data(4, seed=2)
    ps1, ps2 = _per_sample_grads(model, x1, y), _per_sample_grads(model, x2, y)
    g = torch.cat([ps1["conv.weight"], ps2["conv.weight"]]).reshape(8, 6, 9)

    # BYOL-like: loss = mean over images of (l(view 1) + l(view 2)); M = 8 rows, G = 2 grad l
    opt = MBF(model.parameters(), lr=0.0)
    h = opt.attach(model)

    def views():
        opt.zero_grad(set_to_none=True)
        losses = (F.cross_entropy(model(x1), y, reduction="none")
                  + F.cross_entropy(model(x2), y, reduction="none"))
        losses.mean().backward()
        return losses.detach()
    opt.step(views)
    h.remove()
    torch.testing.assert_close(opt.block_fisher(model.conv.weight), _outer_mean(2 * g))

    # gradient accumulation: two micro-batches of loss/2 = the per-sample Fisher of all 8
    opt = MBF(model.parameters(), lr=0.0)
    h = opt.attach(model)

    def micro():
        opt.zero_grad(set_to_none=True)
        out = []
        for xb in (x1, x2):
            losses = F.cross_entropy(model(xb), y, reduction="none")
            (losses.mean() / 2).backward()
            out.append(losses.detach())
        return torch.cat(out)
    opt.step(micro)
    h.remove()
    torch.testing.assert_close(opt.block_fisher(model.conv.weight), _outer_mean(g))


def test_batchnorm_diagonal_blocks():
    model = _model(bn=True)
    x, y = _data()
    opt = MBF(model.parameters(), lr=0.0)
    h = opt.attach(model)
    opt.step(_closure(opt, model, x, y))
    h.remove()
    # reference without hooks: grad_output of BN and x_hat from batch statistics
    model.zero_grad(set_to_none=True)
    z = model.conv(x).detach()
    out = F.batch_norm(z, None, None, model.bn.weight, model.bn.bias, training=True)
    out.retain_grad()
    F.cross_entropy(model.fc(F.relu(out).flatten(1)), y).backward()
    xhat = (z - z.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        z.var((0, 2, 3), unbiased=False, keepdim=True) + model.bn.eps)
    n = len(x)
    gw = n * (out.grad * xhat).sum((2, 3))                 # per-sample gamma gradients, scaled
    gb = n * out.grad.sum((2, 3))
    torch.testing.assert_close(gw.mean(0), model.bn.weight.grad)           # mean = minibatch grad
    torch.testing.assert_close(opt.state[model.bn.weight]["fisher"], gw.square().mean(0))
    torch.testing.assert_close(opt.state[model.bn.bias]["fisher"], gb.square().mean(0))


@pytest.mark.parametrize("kw", [dict(conv_block="kernel", linear_block="row"),
                                dict(conv_block="filter", linear_block="chunk", chunk_size=8),
                                dict(linear_block="kfac"),
                                dict(conv_block="filter", linear_block="row", blocks_first=True)])
def test_step_is_block_diagonal_solve(kw, monkeypatch):
    """momentum 0, lr 1: w_1 = w_0 - (F_m + lambda I)^{-1} g_m per mini-block (both layouts of
    the stored inverse: tiles of 8 blocks' upper triangles and, for large blocks, [P, d, d])."""
    if kw.pop("blocks_first", False):
        monkeypatch.setattr(mbf_module, "_TILE_MAX_D", 4)
    model = _model()
    x, y = _data()
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    lam = 0.05
    opt = MBF(model.parameters(), lr=1.0, momentum=0.0, damping=lam, **kw)
    h = opt.attach(model)
    opt.step(_closure(opt, model, x, y))
    h.remove()
    gw, gb = model.conv.weight.grad, model.conv.bias.grad
    st = opt.state[model.conv.weight]
    d = 18 if kw.get("conv_block") == "filter" else 9
    eye = torch.eye(d, dtype=DT)
    blocks = gw.reshape(-1, d)
    p = torch.linalg.solve(opt.block_fisher(model.conv.weight) + lam * eye,
                           blocks.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(model.conv.weight.detach(), w0["conv.weight"] - p.reshape(gw.shape))
    fb = opt.state[model.conv.bias]["fisher"]
    torch.testing.assert_close(model.conv.bias.detach(), w0["conv.bias"] - gb / (fb + lam))
    g = torch.cat([model.fc.weight.grad, model.fc.bias.grad.unsqueeze(1)], 1)   # [4, 28]
    st = opt.state[model.fc.weight]
    if kw.get("linear_block") == "kfac":
        eye = torch.eye(28, dtype=DT)
        rows = [torch.linalg.solve(st["fisher_D"][o] * st["fisher_A"] + lam * eye, g[o])
                for o in range(4)]
        p = torch.stack(rows)
    else:
        b = 28 if kw["linear_block"] == "row" else 8
        gp = F.pad(g, (0, (-28) % b)).reshape(-1, b)
        p = torch.linalg.solve(opt.block_fisher(model.fc.weight) + lam * torch.eye(b, dtype=DT),
                               gp.unsqueeze(-1))
        p = p.reshape(4, -1)[:, :28]
    torch.testing.assert_close(model.fc.weight.detach(), w0["fc.weight"] - p[:, :27])
    torch.testing.assert_close(model.fc.bias.detach(), w0["fc.bias"] - p[:, 27])


def _spd(P, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, d + 2, d, generator=g, dtype=torch.float64)
    return (x.transpose(1, 2) @ x / (d + 2)).to(dtype)


def _kernels_or_skip():
    k = mbf_module._native_kernels()
    if k is None:
        pytest.skip(f"C kernels unavailable: {mbf_module._NATIVE.get('error')}")
    return k


@pytest.mark.parametrize("d", [1, 3, 9, 17, 49])
def test_tile_layout_round_trip_and_blocks_last_apply(d):
    full = _spd(21, d, DT)
    full = (full + full.transpose(1, 2)) / 2                      # exactly symmetric
    tiles = mbf_module._tiles_from_blocks(full)
    assert tiles.shape == (3, d * (d + 1) // 2, 8) and not tiles[-1, :, 5:].any()   # padded
    torch.testing.assert_close(mbf_module._blocks_from_tiles(tiles, 21, d), full, rtol=0, atol=0)
    skew = torch.randn(21, d, d, dtype=DT)                           # lower=True reads the
    torch.testing.assert_close(mbf_module._tiles_from_blocks(skew, lower=True),   # lower triangle
                               mbf_module._tiles_from_blocks(skew.transpose(1, 2)), rtol=0, atol=0)
    g = torch.randn(21, d, dtype=DT)                                 # the torch path's product
    p = mbf_module._blocks_last_apply(full.permute(1, 2, 0).contiguous(), g, {})
    torch.testing.assert_close(p, (full @ g.unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 2, 9, 32, 49])
def test_native_kernels_against_torch(d, dtype):
    """Cholesky inverse in tiles vs torch.linalg.inv, M g, the fused momentum/weight-decay step
    and the Fisher EMA, for block counts that do and do not fill the last tile."""
    k = _kernels_or_skip()
    tol = dict(rtol=2e-4, atol=1e-5) if dtype == torch.float32 else {}
    lam = 0.05
    for P in (5, 16, 27):
        fisher = _spd(P, d, dtype, seed=P)
        tiles, info = k.inverse(mbf_module._tiles_from_blocks(fisher, lower=True), P, d, lam)
        assert not info[:P].any()
        ref = torch.linalg.inv(fisher.double() + lam * torch.eye(d, dtype=DT))
        torch.testing.assert_close(mbf_module._blocks_from_tiles(tiles, P, d).double(), ref,
                                   **tol)
        assert not tiles[-1, :, P - 8 * (tiles.shape[0] - 1):].any()         # padding stays 0
        minv = mbf_module._blocks_from_tiles(tiles, P, d)
        g = torch.randn(P, d, dtype=dtype)
        p_ref = (minv @ g.unsqueeze(-1)).squeeze(-1)
        out = torch.empty_like(g)
        k.apply(tiles, g, d, out=out)
        torch.testing.assert_close(out, p_ref, **tol)
        buf, w = torch.randn(P, d, dtype=dtype), torch.randn(P, d, dtype=dtype)
        buf_ref = buf * 0.9 + (minv @ (g + 0.02 * w).unsqueeze(-1)).squeeze(-1)   # L2 term
        w_ref = w - 0.1 * 0.01 * w - 0.1 * buf_ref
        k.apply(tiles, g, d, buf=buf, w=w, mu=0.9, gwd=0.02, awd=-0.1 * 0.01, alpha=-0.1)
        torch.testing.assert_close(buf, buf_ref, **tol)
        torch.testing.assert_close(w, w_ref, **tol)
        w2 = torch.randn(P, d, dtype=dtype)
        w2_ref = w2 - 0.1 * p_ref
        k.apply(tiles, g, d, w=w2, alpha=-0.1)                              # no momentum
        torch.testing.assert_close(w2, w2_ref, **tol)
        acc = _spd(P, d, dtype, seed=P + 1)                               # F, acc: lower triangle
        f0 = k.ema(None, acc, d, 3.0, 0.0)                                  # first: 3 acc
        torch.testing.assert_close(f0, mbf_module._tiles_from_blocks(acc * 3.0, lower=True),
                                   **tol)
        tf = mbf_module._tiles_from_blocks(fisher, lower=True)
        for weight in (0.1, 0.7):                                           # both lerp branches
            f = k.ema(tf.clone(), acc, d, 3.0, weight)
            torch.testing.assert_close(
                f, mbf_module._tiles_from_blocks(fisher.lerp(acc * 3.0, weight), lower=True),
                **tol)


def test_native_inverse_failures_fall_back_like_cholesky():
    """Blocks whose Cholesky fails (indefinite, NaN) get the retry / diagonal fallback of
    _damped_inverse; the others the plain inverse."""
    _kernels_or_skip()
    model = nn.Sequential(nn.Conv2d(2, 3, 3)).to(DT)
    opt = MBF(model.parameters(), damping=0.1)
    opt.attach(model)
    layer = opt._layers[0]
    fisher = _spd(layer.P, 9, DT)
    fisher[1] = -torch.eye(9, dtype=DT) * 1e7                # every boost fails: diagonal
    fisher[2] = -torch.eye(9, dtype=DT) * 0.5                # succeeds with 10x damping
    fisher[4, 3, 3] = float("nan")
    opt.state[model[0].weight]["fisher"] = fisher             # [P, d, d]: converted to tiles
    opt._invert(layer, opt.param_groups[0])
    got = opt.block_inverse(model[0].weight)
    ref = mbf_module._damped_inverse(fisher, 0.1)
    torch.testing.assert_close(got, ref, equal_nan=True)
    torch.testing.assert_close(got[1], torch.eye(9, dtype=DT) / 0.1)
    torch.testing.assert_close(got[2], torch.linalg.inv(fisher[2] + 1.1 * torch.eye(9, dtype=DT)))
    torch.testing.assert_close(got[0], torch.linalg.inv(fisher[0] + 0.1 * torch.eye(9, dtype=DT)))


def _mixed_model():
    """3x3 and 1x1 convs, a 7x7 stem (d = 49), BN, and a chunked linear layer (d = 8)."""
    return nn.Sequential(nn.Conv2d(3, 4, 7, padding=3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 1),
                         nn.Flatten(), nn.Linear(5 * 6 * 6, 7))


@pytest.mark.parametrize("mode", ["decoupled", "l2"])
def test_native_and_torch_paths_agree(mode):
    """Three steps (curvature every step, inverses at steps 0 and 2) through the C kernels and
    through torch ops only, in float32: the same parameters up to rounding (which a longer run
    of this small model amplifies)."""
    _kernels_or_skip()
    torch.manual_seed(0)
    m0 = _mixed_model()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 7, (8,), generator=g)
    models, opts = [], []
    for native in (True, False):
        m = _mixed_model()
        m.load_state_dict(m0.state_dict())
        opt = MBF(m.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01, t_cov=1, t_inv=2,
                  linear_block="chunk", chunk_size=8, weight_decay_mode=mode, native=native)
        h = opt.attach(m)
        for _ in range(3):
            opt.step(_closure(opt, m, x, y))
        h.remove()
        models.append(m)
        opts.append(opt)
    moved = 0.0
    for (name, a), b, a0 in zip(models[0].named_parameters(), models[1].parameters(),
                                m0.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
        moved = max(moved, float((a - a0).detach().abs().max()))
    assert moved > 1e-2
    w = models[0][3].weight                                     # the 3x3 conv: fused update
    torch.testing.assert_close(opts[0].state[w]["momentum_buffer"],
                               opts[1].state[models[1][3].weight]["momentum_buffer"],
                               rtol=1e-3, atol=1e-4)


def test_checkpoint_moves_between_kernel_and_torch_layouts():
    """A checkpoint saved with the C kernels (tiles) continues under torch ops ([P, d, d] F,
    [d, d, P] inverse) as it continues with the kernels, and one saved under torch ops
    continues with the kernels as under torch ops."""
    _kernels_or_skip()
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, t_cov=1, t_inv=2)
    x, y = _data()

    def run(native, start, steps):
        """``steps`` steps from checkpoint ``start`` (weights, optimizer) -> a new one."""
        model = _model()
        opt = MBF(model.parameters(), native=native, **kw)
        if start is not None:
            buf = io.BytesIO(start)
            ck = torch.load(buf)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
        h = opt.attach(model)
        for _ in range(steps):
            opt.step(_closure(opt, model, x, y))
        h.remove()
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        return buf.getvalue(), model, opt

    def same(a, b):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q)

    ck, _, opt = run(True, None, 2)
    assert opt.state[opt._layers[0].weight]["fisher"].shape == (1, 45, 8)          # tiles
    ck_a, model_a, opt_a = run(True, ck, 3)
    ck_b, model_b, opt_b = run(False, ck, 3)
    assert opt_b.state[opt_b._layers[0].weight]["fisher"].shape == (6, 9, 9)
    assert opt_b.state[opt_b._layers[0].weight]["inverse"].shape == (9, 9, 6)
    same(model_a, model_b)
    _, model_c, _ = run(True, ck_b, 2)
    _, model_d, _ = run(False, ck_b, 2)
    same(model_c, model_d)


def test_without_kernels_warns_once_and_uses_torch(monkeypatch):
    monkeypatch.setattr(mbf_module, "_NATIVE", {"kernels": None, "error": "no compiler",
                                                 "warn": True})
    model = _model()
    x, y = _data()
    opt = MBF(model.parameters(), lr=0.05, t_cov=1, t_inv=1)
    h = opt.attach(model)
    with pytest.warns(RuntimeWarning, match="no compiler") as rec:
        for _ in range(2):
            opt.step(_closure(opt, model, x, y))
    h.remove()
    assert sum("C kernels unavailable" in str(r.message) for r in rec) == 1
    assert opt.state[model.conv.weight]["inverse"].shape == (9, 9, 6)         # torch layout


def test_curvature_buffer_is_reused():
    """The next curvature step's hooks accumulate into the last step's statistics buffer (no
    fresh [P, d, d] tensor per curvature step), and the Fisher EMA stays right."""
    model = _model()
    x, y = _data()
    opt = MBF(model.parameters(), lr=0.0, t_cov=1)
    h = opt.attach(model)
    opt.step(_closure(opt, model, x, y))                       # step 0: acc becomes the Fisher
    layer = opt._layers[0]
    opt.step(_closure(opt, model, x, y))
    spare = layer.spare
    assert spare is not None
    f1 = opt.block_fisher(model.conv.weight).clone()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert layer.acc is not None and layer.acc.data_ptr() == spare.data_ptr()
    opt.step()
    h.remove()
    ps = _per_sample_grads(model, x, y)["conv.weight"].reshape(len(x), 6, 9)
    torch.testing.assert_close(opt.block_fisher(model.conv.weight),
                               f1.lerp(_outer_mean(ps), 0.1))


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_large_damping_is_sgd_momentum(wd):
    """(F + lambda I)^{-1} g -> g / lambda: MBF(lr) = SGD(lr / lambda, momentum) over 3 steps."""
    lam, lr = 1e8, 0.1
    m1, m2 = _model(bn=True), _model(bn=True)
    x, y = _data()
    mbf = MBF(m1.parameters(), lr=lr * lam, momentum=0.9, damping=lam, weight_decay=wd,
              weight_decay_mode="l2", t_cov=1, t_inv=1)
    sgd = torch.optim.SGD(m2.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    h = mbf.attach(m1)
    for _ in range(3):
        mbf.step(_closure(mbf, m1, x, y))
        sgd.step(_closure(sgd, m2, x, y))
    h.remove()
    moved = 0.0
    ref = _model(bn=True).parameters()
    for (name, a), b, b0 in zip(m1.named_parameters(), m2.parameters(), ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=name)
        moved = max(moved, float((b - b0).detach().abs().max()))
    assert moved > 1e-3                                       # the comparison is not vacuous


def test_schedules_t_cov_t_inv():
    model = _model()
    x, y = _data()
    lam = 0.1
    opt = MBF(model.parameters(), lr=0.05, damping=lam, t_cov=2, t_inv=3)
    h = opt.attach(model)
    prev_f = prev_inv = None
    for k in range(7):
        opt.step(_closure(opt, model, x, y))
        st = opt.state[model.conv.weight]
        f, inv = opt.block_fisher(model.conv.weight).clone(), st["inverse"].clone()
        if prev_f is not None:
            assert (not torch.equal(f, prev_f)) == (k % 2 == 0), k
            assert (not torch.equal(inv, prev_inv)) == (k % 3 == 0), k
        if k % 3 == 0:    # inverse of the F of that step (stored in tiles)
            ref = torch.linalg.inv(f + lam * torch.eye(9, dtype=DT))
            torch.testing.assert_close(opt.block_inverse(model.conv.weight), ref)
        prev_f, prev_inv = f, inv
    h.remove()
    assert opt.state_dict()["mbf_step"] == 7


def test_hooks_inactive_under_no_grad_and_off_schedule_and_removed():
    model = _model(bn=True)
    x, y = _data()
    opt = MBF(model.parameters(), t_cov=2)
    h = opt.attach(model)
    assert len(opt._layers) == 3
    with torch.no_grad():
        model(x)
    assert all(l.rows == 0 and l.acc is None and l.acc_w is None for l in opt._layers)
    F.cross_entropy(model(x), y).backward()                   # step 0: due
    assert all(l.rows == len(x) for l in opt._layers)
    assert opt._layers[0].acc is not None and opt._layers[1].acc_w is not None
    opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()                   # step 1: not due (t_cov = 2)
    assert all(l.rows == 0 and l.acc is None for l in opt._layers)
    opt.step()
    h.remove()
    assert not any(m._forward_hooks for m in model.modules())
    F.cross_entropy(model(x), y).backward()                   # step 2 due, but detached
    assert all(l.rows == 0 for l in opt._layers)


def _train(model, opt, steps, seed=5):
    xs, ys = _data(6 * steps, seed)
    for k in range(steps):
        sl = slice(6 * k, 6 * k + 6)
        opt.step(_closure(opt, model, xs[sl], ys[sl]))


def test_state_dict_round_trip_bit_identical():
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, t_cov=2, t_inv=3)
    model = _model(bn=True)
    opt = MBF(model.parameters(), **kw)
    h = opt.attach(model)
    _train(model, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 5)
    h.remove()

    buf.seek(0)
    ck = torch.load(buf)
    model2 = _model(seed=3, bn=True)
    model2.load_state_dict(ck["model"])
    opt2 = MBF(model2.parameters(), **kw)
    opt2.load_state_dict(ck["opt"])
    assert opt2._k == 4
    s1 = opt2.state[model2.conv.weight]
    assert {"fisher", "inverse", "momentum_buffer"} <= set(s1)
    h2 = opt2.attach(model2)
    _train(model2, opt2, 5)
    h2.remove()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["mbf_step"] == sd2["mbf_step"] == 9
    for k in sd1["state"]:
        for key, v in sd1["state"][k].items():
            assert torch.equal(v, sd2["state"][k][key]), key


def test_bad_arguments():
    p = [nn.Parameter(torch.zeros(2))]
    for kw, word in [(dict(damping=0.0), "damping"), (dict(beta=1.0), "beta"),
                     (dict(t_cov=0), "t_cov"), (dict(t_inv=1.5), "t_inv"),
                     (dict(conv_block="x"), "conv_block"), (dict(linear_block="x"), "linear_block"),
                     (dict(momentum=1.0), "momentum"), (dict(lr=-1.0), "lr"),
                     (dict(weight_decay_mode="x"), "weight_decay_mode")]:
        with pytest.raises(ValueError, match=word):
            MBF(p, **kw)


def test_small_cnn_on_digits_learns():
    torch.manual_seed(0)
    data = small_tasks.digits()
    model = small_tasks.small_cnn(width=8)
    opt = MBF(model.parameters(), lr=0.01, damping=0.01)
    curves = small_tasks.train(model, opt, data, steps=60, batch_size=32, eval_every=20)
    assert not curves.diverged
    assert curves.train_loss[-1] < 0.6 * curves.train_loss[0]
    assert curves.final_acc > 0.5
