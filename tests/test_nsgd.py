"""NSGD / INSGD (ssl_suite.optim.nsgd): divisors and updates against hand computations of the
spec's formulas (shared/algorithms/nsgd_koala_mbf_svi.md section 1), SGD equivalence at D = 1,
hooks, state_dict resume, grouped convs, and a short learning run."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_suite.optim import protocol
from ssl_suite.optim.nsgd import NSGD, insgd_quirk_factor

DT = torch.float64
SOURCES_P = [("paper", 2), ("paper", 1), ("code_v1_matrix1", 1), ("insgd_standardized", 2),
             ("insgd_standardized", 1), ("nlms_patch", 2), ("nlms_patch", 1)]


# ----------------------------------------------------------------------------- hand formulas
def hand_conv_divisor(x, source, p, conv):
    """The spec's divisor for a Conv2d input x [B, C, H, W], laid out over the weight
    [C_out, C_in/G, kh, kw] (per-channel values written out with loops where the code reduces)."""
    B, C, H, W = x.shape
    G = conv.groups
    c_out, c_in_g = conv.weight.shape[:2]
    if source == "paper":           # mean_b ||x_b||_p^p over the whole map, max(log, 0.01)
        n = sum(float((x[b].abs() ** p).sum()) for b in range(B)) / B
        return torch.full((1, 1, 1, 1), max(math.log(n), 0.01), dtype=DT)
    if source == "code_v1_matrix1":  # mean_b (max_w sum_h |x[b,c,h,w]| + 0.01) per channel
        per_c = []
        for c in range(C):
            vals = [max(sum(abs(float(x[b, c, h, w])) for h in range(H)) for w in range(W)) + 0.01
                    for b in range(B)]
            per_c.append(sum(vals) / B)
    elif source == "insgd_standardized":   # insgd.py: standardise each map, l_p mass, log
        m = x.mean((-1, -2), keepdim=True)
        s = torch.nan_to_num(x.std((-1, -2), keepdim=True), nan=0.001).clamp(min=0.01)
        xh = (x - m) / s
        n = (xh.abs() ** p).sum((-1, -2)).mean(0)
        per_c = [max(math.log(float(v)), 0.01) if v > 0 else 0.01 for v in n]
    else:                                   # nlms_patch: unfold patches, per group
        U = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        U = U.view(B, C, -1, U.shape[-1])
        e = (U.abs() ** p).sum(2).mean((0, 2))          # [C] mean over b, t of window mass
        cg = C // G
        div = torch.empty(c_out, 1, 1, 1, dtype=DT)
        for o in range(c_out):
            g = o // (c_out // G)
            div[o] = float(e[g * cg:(g + 1) * cg].sum()) + 0.01
        return div
    div = torch.empty(c_out, c_in_g, 1, 1, dtype=DT)   # per input channel, grouped layout
    for o in range(c_out):
        g = o // (c_out // G)
        for j in range(c_in_g):
            div[o, j] = per_c[g * c_in_g + j]
    return div


def hand_linear_divisor(x, source, p):
    rows = x.reshape(-1, x.shape[-1])
    N = rows.shape[0]
    if source in ("paper", "nlms_patch"):
        n = sum(float((rows[b].abs() ** p).sum()) for b in range(N)) / N
        return max(math.log(n), 0.01) if source == "paper" else n + 0.01
    if source == "code_v1_matrix1":
        return max(float(rows[:, j].abs().sum()) for j in range(rows.shape[1])) + 0.01
    m = rows.mean(1, keepdim=True)
    s = rows.std(1, keepdim=True).clamp(min=0.01)
    n = float(((rows - m) / s).abs().pow(p).sum(1).mean()) + 0.1
    return max(math.log(n), 0.01)


def one_step_update(layer, x, R, **kw):
    """(delta w, g_w, delta b, g_b) of one NSGD step (lr 1, momentum 0.9: first step b = d)."""
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = NSGD(layer.parameters(), lr=1.0, momentum=0.9, **kw)
    handle = opt.attach(layer)
    grads = {}

    def closure():
        opt.zero_grad()
        loss = (layer(x) * R).sum()
        loss.backward()
        grads["w"], grads["b"] = layer.weight.grad.clone(), layer.bias.grad.clone()
        return loss.detach().reshape(1)
    opt.step(closure)
    handle.remove()
    return layer.weight.detach() - w0, grads["w"], layer.bias.detach() - b0, grads["b"]


def _conv_input():
    return ((torch.arange(2 * 2 * 3 * 4) % 7 - 3).to(DT) / 2 + 0.25).reshape(2, 2, 3, 4)


# ----------------------------------------------------------------------------- (1) divisors
@pytest.mark.parametrize("source,p", SOURCES_P)
def test_conv_divisor_and_update_match_hand(source, p):
    conv = nn.Conv2d(2, 3, 2, padding=1, stride=(1, 2)).to(DT)
    x = _conv_input()
    R = torch.randn(conv(x).shape, dtype=DT)
    dw, gw, db, gb = one_step_update(conv, x, R, norm_source=source, p=p)
    D = hand_conv_divisor(x, source, p, conv)
    c = insgd_quirk_factor(0.9) if source == "insgd_standardized" else 1.0
    torch.testing.assert_close(dw, -c * gw / D, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(db, -gb, rtol=1e-12, atol=1e-14)     # bias: plain SGD


@pytest.mark.parametrize("source,p", SOURCES_P)
def test_linear_divisor_and_update_match_hand(source, p):
    lin = nn.Linear(3, 2).to(DT)
    x = torch.tensor([[[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]]], dtype=DT)  # 3-D: tokens join the batch
    R = torch.randn(1, 2, 2, dtype=DT)
    dw, gw, db, gb = one_step_update(lin, x, R, norm_source=source, p=p)
    D = hand_linear_divisor(x, source, p)
    # the same numbers written out: row energies 9, 25 (l2^2) and 5, 7 (l1); column sums 1, 5, 6
    literal = {("paper", 2): math.log(17), ("paper", 1): math.log(6),
               ("code_v1_matrix1", 1): 6.01, ("nlms_patch", 2): 17.01, ("nlms_patch", 1): 6.01,
               ("insgd_standardized", 2): math.log(2.1),  # sum of 3 standardised squares = 2
               ("insgd_standardized", 1): math.log(
                   ((4 / 3) / math.sqrt(1 / 3) + (14 / 3) / math.sqrt(78 / 18)) / 2 + 0.1)}
    assert D == pytest.approx(literal[source, p], rel=1e-12)
    c = insgd_quirk_factor(0.9) if source == "insgd_standardized" else 1.0
    torch.testing.assert_close(dw, -c * gw / D, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(db, -gb, rtol=1e-12, atol=1e-14)


def test_insgd_quirk_factor_and_constant_map():
    assert insgd_quirk_factor(0.9) == pytest.approx(math.sqrt(1 + 1e-6) / (math.sqrt(0.1) + 1e-6))
    assert insgd_quirk_factor(0.9) == pytest.approx(3.16226, rel=1e-5)
    # 1x1 maps: insgd.py's std is NaN -> 0.001 -> X^ = 0 -> log 0 clipped to 0.01 (x100 step)
    conv = nn.Conv2d(2, 2, 1).to(DT)
    x = torch.randn(3, 2, 1, 1, dtype=DT)
    R = torch.randn(3, 2, 1, 1, dtype=DT)
    dw, gw, _, _ = one_step_update(conv, x, R, norm_source="insgd_standardized",
                                   insgd_bias_correction_quirk=False)
    torch.testing.assert_close(dw, -gw / 0.01)


def test_paper_input_power_ema_and_order():
    """P_t = beta P_{t-1} + (1 - beta) n_t (P_1 = n_1); D = max(log P, eps); normalise, then
    weight decay, then momentum (TMLR Algorithm 1); code order as the option."""
    beta, mu, wd, lr = 0.9, 0.9, 0.1, 0.5
    xs = [torch.tensor([[1.0, 2.0, 2.0]], dtype=DT), torch.tensor([[0.0, 3.0, 4.0]], dtype=DT)]
    for order in (True, False):
        lin = nn.Linear(3, 1, bias=False).to(DT)
        w = lin.weight.detach().clone()
        opt = NSGD(lin.parameters(), lr=lr, momentum=mu, weight_decay=wd, input_ema_beta=beta,
                   normalize_before_momentum=order)
        opt.attach(lin)
        P, buf = None, None
        for x in xs:
            opt.zero_grad()
            lin(x).sum().backward()
            g = lin.weight.grad.clone()
            opt.step()
            n = float((x ** 2).sum())
            P = n if P is None else beta * P + (1 - beta) * n
            D = max(math.log(P), 0.01)
            d = g / D + wd * w if order else g + wd * w
            buf = d if buf is None else mu * buf + d
            w = w - lr * (buf if order else buf / D)
            torch.testing.assert_close(lin.weight.detach(), w, rtol=1e-12, atol=1e-14)
        assert float(opt.state[lin.weight]["input_power"]) == pytest.approx(0.9 * 9 + 0.1 * 25)


# ----------------------------------------------------------------------------- (2) D = 1 -> SGD
def _tiny_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, (1, 3)), nn.Flatten(), nn.Linear(3, 2)).to(DT)


@pytest.mark.parametrize("source,p", SOURCES_P)
@pytest.mark.parametrize("order,nesterov,foreach", [(True, False, None), (False, True, None),
                                                    (True, True, True), (False, False, False)])
def test_unit_divisor_equals_torch_sgd(source, p, order, nesterov, foreach):
    """Inputs whose statistic stays below e, eps = 1 with the log clip: D = max(log n, 1) = 1
    exactly, and NSGD is torch.optim.SGD (same momentum, weight decay, nesterov) step for step."""
    net_a, net_b = _tiny_net(), _tiny_net()
    kw = dict(lr=0.3, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    opt_a = NSGD(net_a.parameters(), norm_source=source, p=p, eps=1.0, log_clip=True,
                 insgd_bias_correction_quirk=False, normalize_before_momentum=order,
                 foreach=foreach, **kw)
    opt_b = torch.optim.SGD(net_b.parameters(), **kw)
    opt_a.attach(net_a)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = 0.1 * torch.randn(5, 1, 1, 3, generator=g, dtype=DT)
        y = torch.randint(0, 2, (5,), generator=g)
        for net, opt in ((net_a, opt_a), (net_b, opt_b)):
            def closure(net=net, opt=opt):
                opt.zero_grad()
                losses = F.cross_entropy(net(x), y, reduction="none")
                losses.mean().backward()
                return losses.detach()
            opt.step(closure)
        for pa, pb in zip(net_a.parameters(), net_b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-13, atol=1e-15)
    assert all(len(m._forward_hooks) == 1 for m in (net_a[0], net_a[2]))


@pytest.mark.parametrize("p", [1, 2])
def test_unit_energy_inputs_equal_torch_sgd(p):
    """The NLMS form D = eps + P with eps = 0 (log_clip off): inputs whose per-sample energy is
    exactly 1 (each sample one signed one-hot, |x|^p summed = 1 for l1 and l2) give P = 1 at every
    step (EMA of ones), so NSGD is torch.optim.SGD step for step."""
    net_a, net_b = _tiny_net(), _tiny_net()
    kw = dict(lr=0.2, momentum=0.9, weight_decay=1e-3)
    opt_a = NSGD(net_a.parameters(), norm_source="paper", p=p, eps=0.0, log_clip=False, **kw)
    opt_b = torch.optim.SGD(net_b.parameters(), **kw)
    opt_a.attach(net_a)
    net_a[2].register_forward_pre_hook(   # the Linear's input: force unit energy rows too
        lambda m, a: (a[0] / a[0].abs().pow(p).sum(-1, keepdim=True).pow(1 / p),))
    net_b[2].register_forward_pre_hook(
        lambda m, a: (a[0] / a[0].abs().pow(p).sum(-1, keepdim=True).pow(1 / p),))
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        hot = torch.randint(0, 3, (5,), generator=g)
        sign = torch.randint(0, 2, (5,), generator=g).to(DT) * 2 - 1
        x = (F.one_hot(hot, 3).to(DT) * sign[:, None]).reshape(5, 1, 1, 3)
        y = torch.randint(0, 2, (5,), generator=g)
        for net, opt in ((net_a, opt_a), (net_b, opt_b)):
            def closure(net=net, opt=opt):
                opt.zero_grad()
                losses = F.cross_entropy(net(x), y, reduction="none")
                losses.mean().backward()
                return losses.detach()
            opt.step(closure)
        for pa, pb in zip(net_a.parameters(), net_b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)
    for mod in (net_a[0], net_a[2]):
        assert float(opt_a.state[mod.weight]["input_power"]) == pytest.approx(1.0, rel=1e-12)


# ----------------------------------------------------------------------------- (3) plain params
class _FunctionalLinear(nn.Module):
    """A weight used through F.linear: no nn.Linear, so no hook and no recorded input."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in, dtype=DT) * 0.3)
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=DT))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def test_bias_norm_and_unhooked_params_follow_sgd_momentum():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(1, 4, 3, bias=True).to(DT), nn.BatchNorm2d(4).to(DT)
    head = _FunctionalLinear(4, 3)
    net = nn.Sequential(conv, bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    decayed = [conv.weight, head.weight]
    plain = [conv.bias, bn.weight, bn.bias, head.bias]
    lr, mu, damp, wd = 0.2, 0.9, 0.1, 1e-2
    opt = NSGD([{"params": decayed, "weight_decay": wd},
                {"params": plain, "weight_decay": 0.0, "lars_adapt": False, "lr_mult": 1.0}],
               lr=lr, momentum=mu, dampening=damp)
    protocol.attach(opt, net)
    tracked = {id(p): (p, wd if p is head.weight else 0.0) for p in plain + [head.weight]}
    ref = {k: p.detach().clone() for k, (p, _) in tracked.items()}
    bufs = {}
    ref_conv, conv_buf = conv.weight.detach().clone(), None
    for step in range(4):
        x = torch.randn(6, 1, 5, 5, dtype=DT)
        y = torch.randint(0, 3, (6,))
        grads = {}

        def closure():
            opt.zero_grad()
            losses = F.cross_entropy(net(x), y, reduction="none")
            protocol.backward(opt, losses.mean())
            grads.update({id(p): p.grad.clone() for p in net.parameters()})
            return losses.detach()
        out = opt.step(closure)
        assert out.shape == (6,)
        for k, (p, w_decay) in tracked.items():
            d = grads[k] + w_decay * ref[k]
            bufs[k] = d if k not in bufs else mu * bufs[k] + (1 - damp) * d
            ref[k] = ref[k] - lr * bufs[k]
            torch.testing.assert_close(p.detach(), ref[k], rtol=1e-12, atol=1e-14)
        d = grads[id(conv.weight)] + wd * ref_conv
        conv_buf = d if conv_buf is None else mu * conv_buf + (1 - damp) * d
        ref_conv = ref_conv - lr * conv_buf
    # the hooked conv weight is normalised: it is NOT the SGD trajectory
    assert (conv.weight.detach() - ref_conv).abs().max() > 1e-3


# ----------------------------------------------------------------------------- (4) hooks
def test_no_grad_forward_records_nothing():
    x = torch.randn(4, 3, dtype=DT)
    nets = []
    for noisy in (False, True):
        torch.manual_seed(0)
        lin = nn.Linear(3, 2).to(DT)
        opt = NSGD(lin.parameters(), lr=0.1)
        opt.attach(lin)
        if noisy:
            with torch.no_grad():
                lin(100 * torch.randn(7, 3, dtype=DT))   # kNN / eval / EMA target: ignored
        opt.zero_grad()
        lin(x).sum().backward()
        opt.step()
        nets.append(lin)
    assert torch.equal(nets[0].weight, nets[1].weight)


def test_calls_within_one_step_are_averaged():
    """Two forwards (two views, or micro-batches of different sizes): D uses the mean over
    calls of each call's batch-mean energy."""
    lin = nn.Linear(3, 1, bias=False).to(DT)
    x1 = torch.tensor([[1.0, 2.0, 2.0], [0.0, 3.0, 4.0]], dtype=DT)  # mean energy 17
    x2 = torch.tensor([[2.0, 0.0, 0.0]], dtype=DT)                    # 4
    w0 = lin.weight.detach().clone()
    opt = NSGD(lin.parameters(), lr=1.0, momentum=0.0)
    opt.attach(lin)
    (lin(x1).sum() + lin(x2).sum()).backward()
    g = lin.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(lin.weight.detach(), w0 - g / math.log((17 + 4) / 2))
    # the statistics were consumed: a step without a forward is plain SGD
    w1 = lin.weight.detach().clone()
    opt.step()
    torch.testing.assert_close(lin.weight.detach(), w1 - g)


def test_handle_remove_detaches_hooks():
    conv = nn.Conv2d(2, 2, 3).to(DT)
    opt = NSGD(conv.parameters(), lr=0.5, momentum=0.9)
    handle = protocol.attach(opt, conv)
    assert len(conv._forward_hooks) == 1
    handle.remove()
    assert len(conv._forward_hooks) == 0 and opt._layers == []
    w0 = conv.weight.detach().clone()
    conv(torch.randn(2, 2, 5, 5, dtype=DT)).sum().backward()
    g = conv.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(conv.weight.detach(), w0 - 0.5 * g)   # plain SGD now


# ----------------------------------------------------------------------------- (5) resume
def _resume_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3,
                         groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("source", ["paper", "insgd_standardized"])
def test_state_dict_round_trip_resumes_bit_identically(source):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 5, 5, generator=g), torch.randint(0, 3, (8,), generator=g))
               for _ in range(6)]

    def run(net, opt, bs):
        for x, y in bs:
            def closure():
                opt.zero_grad(set_to_none=True)
                losses = F.cross_entropy(net(x), y, reduction="none")
                losses.mean().backward()
                return losses.detach()
            opt.step(closure)

    net = _resume_net()
    opt = NSGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, norm_source=source,
               input_ema_beta=0.9)
    opt.attach(net)
    run(net, opt, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    assert "input_power" in opt.state[net[0].weight]
    run(net, opt, batches[3:])

    buf.seek(0)
    ckpt = torch.load(buf)
    net2 = _resume_net()
    net2.load_state_dict(ckpt["model"])
    opt2 = NSGD(net2.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, norm_source=source,
                input_ema_beta=0.9)
    opt2.load_state_dict(ckpt["opt"])
    opt2.attach(net2)
    run(net2, opt2, batches[3:])
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- (6) grouped conv
@pytest.mark.parametrize("source,p", [("code_v1_matrix1", 1), ("insgd_standardized", 1),
                                      ("nlms_patch", 2), ("paper", 2)])
@pytest.mark.parametrize("c_in,c_out,groups", [(4, 6, 2), (3, 3, 3), (2, 4, 2)])
def test_grouped_and_depthwise_conv(source, p, c_in, c_out, groups):
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups).to(DT)
    x = torch.randn(3, c_in, 4, 4, dtype=DT) * torch.arange(1, c_in + 1, dtype=DT).view(1, -1, 1, 1)
    R = torch.randn(3, c_out, 4, 4, dtype=DT)
    dw, gw, _, _ = one_step_update(conv, x, R, norm_source=source, p=p,
                                   insgd_bias_correction_quirk=False)
    D = hand_conv_divisor(x, source, p, conv)
    torch.testing.assert_close(dw, -gw / D, rtol=1e-12, atol=1e-14)
    if source != "paper":   # the divisor really differs between groups/channels
        assert D.flatten().unique().numel() > 1


# ----------------------------------------------------------------------------- (7) learning
def test_thirty_steps_on_digits_decrease_the_loss():
    from ssl_suite.analysis import small_tasks
    data = small_tasks.digits()
    torch.manual_seed(0)
    model = small_tasks.small_cnn(width=8)
    opt = NSGD(model.parameters(), lr=0.25, momentum=0.9, weight_decay=5e-4)  # custom-CNN lr
    curves = small_tasks.train(model, opt, data, steps=30, batch_size=64, eval_every=10)
    assert not curves.diverged
    assert curves.train_loss[-1] < 0.6 * curves.train_loss[0]       # 2.24 -> 0.99
    assert all(len(m._forward_hooks) == 0 for m in model.modules())   # train() removed them


# ----------------------------------------------------------------------------- options
def test_source_defaults_and_validation():
    w = [nn.Parameter(torch.zeros(2, 2))]
    g = NSGD(w).param_groups[0]
    assert (g["norm_source"], g["p"], g["log_clip"], g["input_ema_beta"],
            g["normalize_before_momentum"], g["insgd_bias_correction_quirk"], g["eps"]) == \
        ("paper", 2, True, 0.9, True, False, 0.01)
    g = NSGD(w, norm_source="insgd_standardized").param_groups[0]
    assert (g["p"], g["log_clip"], g["input_ema_beta"], g["normalize_before_momentum"],
            g["insgd_bias_correction_quirk"]) == (2, True, 0.0, False, True)
    g = NSGD(w, norm_source="code_v1_matrix1").param_groups[0]
    assert (g["p"], g["log_clip"], g["normalize_before_momentum"]) == (1, False, False)
    for kwargs, name in [({"norm_source": "v2"}, "norm_source"), ({"p": 3}, "p"),
                         ({"norm_source": "code_v1_matrix1", "p": 2}, "p"),
                         ({"input_ema_beta": 1.0}, "input_ema_beta"), ({"eps": 0.0}, "eps"),
                         ({"lr": -1.0}, "lr"), ({"momentum": -0.1}, "momentum"),
                         ({"weight_decay": -1.0}, "weight_decay"),
                         ({"nesterov": True, "momentum": 0.0}, "nesterov")]:
        with pytest.raises(ValueError, match=name):
            NSGD(w, **kwargs)
    with pytest.raises(ValueError, match="p"):
        NSGD([{"params": w, "p": 5}])


def test_scheduler_changes_the_step():
    lin = nn.Linear(3, 1, bias=False).to(DT)
    opt = NSGD(lin.parameters(), lr=1.0, momentum=0.0)
    opt.attach(lin)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    x = torch.tensor([[1.0, 2.0, 2.0]], dtype=DT)   # energy 9 -> D = log 9
    for t in range(2):
        w0 = lin.weight.detach().clone()
        opt.zero_grad()
        lin(x).sum().backward()
        opt.step()
        torch.testing.assert_close(lin.weight.detach(), w0 - 0.5 ** t * x / math.log(9))
        sched.step()


@pytest.mark.parametrize("conv_kw,pad,mode", [
    (dict(kernel_size=3, dilation=2, padding=2, stride=2), 2, "zeros"),
    (dict(kernel_size=3, padding="same"), 1, "zeros"),
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), 1, "reflect"),
    (dict(kernel_size=(2, 3), padding=(0, 1), padding_mode="circular"), (1, 1, 0, 0), "circular")])
def test_nlms_patch_uses_the_layers_padding_dilation_stride(conv_kw, pad, mode):
    """Patch energy = unfold of the input as the layer pads it (zeros, reflect, circular,
    'same'), with its dilation and stride."""
    conv = nn.Conv2d(2, 3, **conv_kw).to(DT)
    x = torch.randn(2, 2, 5, 6, dtype=DT)
    R = torch.randn(conv(x).shape, dtype=DT)
    dw, gw, _, _ = one_step_update(conv, x, R, norm_source="nlms_patch")
    pads = (pad,) * 4 if isinstance(pad, int) else pad
    xp = F.pad(x, pads, mode="constant" if mode == "zeros" else mode)
    U = F.unfold(xp, conv.kernel_size, conv.dilation, 0, conv.stride)
    assert U.shape[-1] == conv(x).shape[-1] * conv(x).shape[-2]
    D = float((U ** 2).sum(1).mean()) + 0.01
    torch.testing.assert_close(dw, -gw / D, rtol=1e-12, atol=1e-14)
