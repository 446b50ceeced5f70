"""Optimizer library part 1: the review's optimizers from configs, decoupled weight decay, RAdam's
rectification, LR scaling rules, schedules, and every name driving a BYOL run."""

import math

import pytest
import timm.optim
import torch
from torch import nn

from ssl_suite.cli import main
from ssl_suite.config import OptimConfig, ScheduleConfig
from ssl_suite.optim import (build_scheduler, create_optimizer, list_all,
                             normalized_weight_decay, resolve_name, scaled_lr)

REVIEW = {  # the review's standard optimizers -> the torch class our factory must build
    "plainsgd": torch.optim.SGD, "momentum": torch.optim.SGD, "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad, "adadelta": torch.optim.Adadelta,
    "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "adamax": torch.optim.Adamax,
    "nadam": torch.optim.NAdam, "amsgrad": torch.optim.Adam, "adamw": torch.optim.AdamW,
    "radam": torch.optim.RAdam,
}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("name", sorted(REVIEW))
def test_review_optimizers_from_config(name):
    net = _net()
    opt = create_optimizer({"encoder": net}, OptimConfig(name=name, base_lr=0.01,
                                                         weight_decay=1e-3), global_batch=256)
    assert type(opt) is REVIEW[name]
    groups = {(g["weight_decay"], g["lars_adapt"]): len(g["params"]) for g in opt.param_groups}
    assert groups == {(1e-3, True): 2, (0.0, False): 4}     # 2 weights; 2 biases + BN weight/bias
    d = opt.param_groups[0]
    if name == "sgd":
        assert d["nesterov"] and d["momentum"] == 0.9
    if name == "momentum":
        assert not d["nesterov"] and d["momentum"] == 0.9
    if name == "plainsgd":
        assert d["momentum"] == 0
    if name == "amsgrad":
        assert d["amsgrad"]
    before = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(16, 4)
    net(x).pow(2).mean().backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


def test_names_resolve_to_the_reference_lars_and_timm_lars():
    assert resolve_name("lars") == ("byollars", False)
    assert resolve_name("lookahead_lars") == ("byollars", True)
    assert resolve_name("timmlars") == ("lars", False)
    assert resolve_name("generic_adam") == ("genericadam", False)
    from ssl_suite.optim import LARS
    opt = create_optimizer({"encoder": _net()}, OptimConfig(name="lars"), 256)
    assert isinstance(opt, LARS)
    assert isinstance(create_optimizer({"encoder": _net()}, OptimConfig(name="timmlars"), 256),
                      timm.optim.Lars)


def _adam_by_hand(theta, grads, lr, wd, decoupled, b1=0.9, b2=0.999, eps=1e-8):
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        if decoupled:
            theta = theta - lr * wd * theta                     # torch AdamW: decay x current lr
        else:
            g = g + wd * theta                                  # L2 into the gradient
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mh, vh = m / (1 - b1 ** t), v / (1 - b2 ** t)
        theta = theta - lr * mh / (vh.sqrt() + eps)
    return theta


def test_adam_l2_and_decoupled_weight_decay_differ():
    torch.manual_seed(1)
    w0, grads = torch.randn(6), [torch.randn(6) for _ in range(3)]
    out = {}
    for cls, decoupled in ((torch.optim.Adam, False), (torch.optim.AdamW, True)):
        w = nn.Parameter(w0.clone())
        opt = cls([w], lr=0.1, weight_decay=0.5)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        assert torch.allclose(w.detach(), _adam_by_hand(w0, grads, 0.1, 0.5, decoupled), atol=1e-6)
        out[decoupled] = w.detach()
    assert (out[True] - out[False]).abs().max() > 1e-2


def test_sgd_l2_and_sgdw_coincide_after_rescaling_by_lr():
    """Plain SGD: theta - a(g + l theta) = theta - a g - (a l) theta: L2 with l equals the
    paper's decoupled decay l_paper = a l, which is what timm's SGDW does with wd = l."""
    torch.manual_seed(2)
    w0, g = torch.randn(5), torch.randn(5)
    lr, lam = 0.05, 0.3
    a = nn.Parameter(w0.clone())
    a.grad = g.clone()
    torch.optim.SGD([a], lr=lr, weight_decay=lam).step()
    b = nn.Parameter(w0.clone())
    b.grad = g.clone()
    timm.optim.SGDW([b], lr=lr, weight_decay=lam, momentum=0.0, nesterov=False).step()
    paper = w0 - lr * g - (lr * lam) * w0
    assert torch.allclose(a.detach(), paper, atol=1e-7) and torch.allclose(b.detach(), paper, atol=1e-7)


def test_radam_rectification_threshold_and_sgd_fallback():
    """torch RAdam (Liu et al. 2020): rho_t = rho_inf - 2 t b2^t / (1 - b2^t); while rho_t <= 5
    the step is SGD with (bias-corrected) momentum, afterwards the rectified adaptive step."""
    b1, b2, lr, eps = 0.9, 0.999, 0.01, 1e-8
    rho_inf = 2 / (1 - b2) - 1
    rho = [rho_inf - 2 * t * b2 ** t / (1 - b2 ** t) for t in range(1, 8)]
    assert [r > 5 for r in rho] == [False] * 5 + [True] * 2   # the first 5 steps fall back
    torch.manual_seed(3)
    w = nn.Parameter(torch.randn(4))
    theta, m, v = w.detach().clone(), torch.zeros(4), torch.zeros(4)
    opt = torch.optim.RAdam([w], lr=lr, betas=(b1, b2), eps=eps)
    for t in range(1, 8):
        g = torch.randn(4)
        w.grad = g.clone()
        opt.step()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        mh = m / (1 - b1 ** t)
        r = rho[t - 1]
        if r > 5:
            rect = math.sqrt((r - 4) * (r - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * r))
            adaptive = math.sqrt(1 - b2 ** t) / (v.sqrt() + eps)
            theta = theta - lr * mh * rect * adaptive
        else:
            theta = theta - lr * mh
        assert torch.allclose(w.detach(), theta, atol=1e-6), t


def test_lr_scaling_rules_and_normalized_weight_decay():
    assert scaled_lr(0.2, 4096, "linear") == pytest.approx(3.2)
    assert scaled_lr(1e-3, 1024, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(0.1, 4096, "none") == 0.1
    # Loshchilov & Hutter's example: b=128, B=50,000, T=100, lambda_norm=0.025 -> 1.26e-4
    assert normalized_weight_decay(0.025, 128, 50_000, 100) == pytest.approx(1.265e-4, rel=1e-3)
    net = _net()
    cfg = OptimConfig(name="adamw", base_lr=1e-3, normalized_weight_decay=0.025)
    opt = create_optimizer({"encoder": net}, cfg, 128, num_samples=50_000, epochs=100)
    assert max(g["weight_decay"] for g in opt.param_groups) == pytest.approx(1.265e-4, rel=1e-3)


def test_step_and_restart_schedules_by_hand():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = build_scheduler(opt, ScheduleConfig(name="step", warmup_epochs=1, milestones=[3, 5],
                                            gamma=0.1), steps_per_epoch=10, total_steps=100)
    lrs = []
    for _ in range(60):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs[5] == pytest.approx(0.5) and lrs[10] == 1.0 and lrs[29] == 1.0
    assert lrs[30] == pytest.approx(0.1) and lrs[50] == pytest.approx(0.01)
    opt = torch.optim.SGD([p], lr=1.0)
    s = build_scheduler(opt, ScheduleConfig(name="restarts", warmup_epochs=0, restart_epochs=1,
                                            restart_mult=2), steps_per_epoch=10, total_steps=100)
    lrs = []
    for _ in range(31):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs[0] == 1.0 and lrs[5] == pytest.approx(0.5)            # T_0 = 10 steps
    assert lrs[10] == 1.0 and lrs[20] == pytest.approx(0.5)          # T_1 = 20 steps
    assert lrs[30] == 1.0


def test_optimizers_command_lists_everything(capsys):
    assert main(["optimizers"]) == 0
    out = capsys.readouterr().out
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"lars", "byollars", "timmlars", "lamb", "sgd", "adamw", "radam", "amsgrad",
            "plainsgd", "adagrad", "adadelta", "rmsprop", "adamax", "nadam",
            "lookahead_<name>"} <= names
    assert len(names) == len(list_all())
