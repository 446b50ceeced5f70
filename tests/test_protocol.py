"""The optimizer protocol: attach / backward dispatch, per-sample losses from every loop."""

import pytest
import torch
from torch import nn

from ssl_suite.analysis import small_tasks
from ssl_suite.engine import pretrain as pretrain_mod
from ssl_suite.engine.eval_common import train_classifier
from ssl_suite.optim import Lookahead, protocol
from ssl_suite.optim.factory import resolve_name, split_svi

from helpers import tiny_config


class Recording(torch.optim.SGD):
    """SGD that records what the protocol hands it."""

    def __init__(self, params, lr=0.1, **kw):
        super().__init__(params, lr=lr, **kw)
        self.attached, self.backwards, self.returned, self.removed = [], 0, [], 0

    def attach(self, model):
        self.attached.append(model)
        outer = self

        class H:
            def remove(self):
                outer.removed += 1
        return H()

    def backward(self, loss, accelerator=None):
        self.backwards += 1
        (accelerator.backward(loss) if accelerator is not None else loss.backward())

    def step(self, closure=None):
        out = closure()
        self.returned.append(out)
        super().step()
        return out


def test_dispatch_through_lookahead_and_defaults():
    model = nn.Linear(3, 2)
    rec = Recording(model.parameters())
    la = Lookahead(rec, k=2)
    assert protocol.unwrap(la) is rec
    handle = protocol.attach(la, model)
    assert rec.attached == [model]
    loss = model(torch.randn(4, 3)).pow(2).mean()
    protocol.backward(la, loss)
    assert rec.backwards == 1 and model.weight.grad is not None
    handle.remove()
    assert rec.removed == 1
    # a plain torch optimizer: no hooks, ordinary backward
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    model.zero_grad()
    with protocol.attach(plain, model):
        protocol.backward(plain, model(torch.ones(1, 3)).sum())
    assert torch.equal(model.weight.grad, torch.ones(2, 3))


def test_sample_losses_and_scalar():
    assert protocol.as_scalar(torch.tensor([1.0, 3.0])) == 2.0
    assert protocol.as_scalar(None) is None
    with pytest.raises(ValueError, match="KOALA needs per-sample losses.*got \\(\\)"):
        protocol.sample_losses(torch.tensor(1.0), "KOALA")
    v = torch.tensor([1.0, 2.0], requires_grad=True)
    assert not protocol.sample_losses(v, "x").requires_grad


def test_classifier_loop_returns_per_sample_losses():
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    opt_holder = {}
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    import ssl_suite.engine.eval_common as ec
    real = ec.eval_optimizer

    def fake(model, *a, **k):
        opt = Recording(model.parameters(), lr=0.1)
        opt_holder["opt"] = opt
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ec.eval_optimizer = fake
    try:
        train_classifier(head, lambda e: iter([(x, y)]), 1, 2, 0.1, 0.0, False, 0.0,
                         optimizer="recording")
    finally:
        ec.eval_optimizer = real
    opt = opt_holder["opt"]
    assert opt.attached == [head] and opt.removed == 1 and opt.backwards == 2
    assert [tuple(r.shape) for r in opt.returned] == [(8,), (8,)]


def test_pretrain_closure_returns_per_image_losses_over_micro_batches(tmp_path, monkeypatch):
    made = {}
    real = pretrain_mod.create_optimizer

    def fake(modules, cfg, *a, **k):
        base = real(modules, cfg, *a, **k)
        opt = Recording(base.param_groups, lr=0.01)
        made["opt"] = opt
        return opt
    monkeypatch.setattr(pretrain_mod, "create_optimizer", fake)
    cfg = tiny_config(tmp_path / "run", **{"train.max_steps": 2, "train.grad_accum_steps": 2,
                                           "optim.name": "sgd"})
    res = pretrain_mod.pretrain(cfg)
    opt = made["opt"]
    assert opt.attached == [res.online] and opt.removed == 1
    assert opt.backwards == 4  # 2 steps x 2 micro-batches
    assert [tuple(r.shape) for r in opt.returned] == [(32,), (32,)]
    assert res.final_loss == pytest.approx(float(opt.returned[-1].mean()), rel=1e-6)


def test_svi_prefix_resolution():
    assert resolve_name("svi_adamw") == ("svi", False)
    assert resolve_name("lookahead_svi_lars") == ("svi", True)
    assert split_svi("svi_lars") == "byollars" and split_svi("adamw") is None


def test_small_task_loop_trains():
    data = small_tasks.digits(flat=True)
    torch.manual_seed(0)
    model = small_tasks.small_mlp()
    curves = small_tasks.train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                               data, steps=60, eval_every=30)
    assert curves.step == [30, 60] and not curves.diverged
    assert curves.train_loss[-1] < 0.5 * curves.train_loss[0] or curves.final_acc > 0.8
