"""Replicated SGD (Pittorino et al., ICLR 2021): one replica is SGD, the elastic update and the
coupling schedule by hand, lr*gamma = 1 collapses the replicas onto the centre, the model holds the
centre, the closure protocol, exact resume, independent inits, a learning run on digits, and the
BatchNorm re-estimation against a cumulative average by hand."""

import copy

import pytest
import torch
from torch import nn

from ssl_suite.analysis import small_tasks
from ssl_suite.optim import protocol
from ssl_suite.optim.replica_sgd import ReplicaSGD, recompute_bn_stats

D = torch.float64
A = torch.tensor([1.0, 3.0, 0.5], dtype=D)
B = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5], [-1.0, 2.0, 1.0], [0.0, 0.5, 0.3],
                  [2.0, -0.2, 0.7]], dtype=D)
X0 = torch.tensor([0.3, -0.7, 1.1], dtype=D)


def _grad(x, k):
    return A * (x - B[k % len(B)])


def _closure(opt, x, calls):
    """f_k(x) = 1/2 sum_i a_i (x_i - b_{k,i})^2 with a fresh batch k on every call."""
    def closure():
        opt.zero_grad(set_to_none=True)
        k = len(calls)
        calls.append(x.detach().clone())
        loss = 0.5 * (A * (x - B[k % len(B)]).square()).sum()
        loss.backward()
        return loss.detach().reshape(1)
    return closure


def _reference(steps, y, lr, gammas, reps, mom=0.0, nesterov=False, wd=0.0):
    """The rSGD step of spec 2.3 written out: replica a uses batch (y t + a)."""
    reps = [r.clone() for r in reps]
    bufs = [None] * y
    calls = 0
    for t in range(steps):
        centre = sum(reps) / y
        for a in range(y):
            d = _grad(reps[a], calls) + gammas[t] * (reps[a] - centre) + wd * reps[a]
            calls += 1
            if mom:
                bufs[a] = d.clone() if bufs[a] is None else mom * bufs[a] + d
                d = d + mom * bufs[a] if nesterov else bufs[a]
            reps[a] = reps[a] - lr * d
    return reps


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def test_one_replica_is_sgd():
    m1 = _mlp()
    m2 = copy.deepcopy(m1)
    opt1 = ReplicaSGD(m1.parameters(), lr=0.1, replicas=1, gamma0=5.0, momentum=0.9,
                      nesterov=True, weight_decay=0.01)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                           weight_decay=0.01)
    s1 = torch.optim.lr_scheduler.StepLR(opt1, step_size=2, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        xb, yb = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
        outs = []
        for m, o in ((m1, opt1), (m2, opt2)):
            def closure(m=m, o=o):
                o.zero_grad(set_to_none=True)
                losses = nn.functional.cross_entropy(m(xb), yb, reduction="none")
                losses.mean().backward()
                return losses.detach()
            outs.append(o.step(closure))
        torch.testing.assert_close(outs[0], outs[1])
        s1.step()
        s2.step()
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)


def test_coupling_schedule_by_hand():
    x = nn.Parameter(X0.clone())
    cases = [
        (dict(gamma0=0.1, gamma1=0.5, gamma_every=2), [0.1, 0.1, 0.15, 0.15, 0.225, 0.225]),
        (dict(gamma0=0.1, gamma1=0.5, schedule="lin"), [0.1, 0.6, 1.1, 1.6, 2.1, 2.6]),
        (dict(gamma0=0.1, gamma1=1.0, gamma_max=0.5), [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]),
        (dict(gamma0=0.0, schedule="cosine", gamma_max=2.0, total_steps=4),
         [0.0, 1 - 0.5 ** 0.5, 1.0, 1 + 0.5 ** 0.5, 2.0, 2.0]),
        (dict(gamma0=0.1, gamma_growth=1e4, total_steps=4), [0.1, 1.0, 10.0, 100.0, 1000.0,
                                                             10000.0]),
        (dict(gamma0=0.1, gamma_growth=5.0, total_steps=8, gamma_every=2, schedule="lin"),
         [0.1, 0.1, 0.2, 0.2, 0.3, 0.3]),
    ]
    for kw, want in cases:
        opt = ReplicaSGD([x], lr=0.0, replicas=2, **kw)
        seen = []
        for _ in range(6):
            seen.append(opt.gamma())
            opt.step(_closure(opt, x, []))
        assert seen == pytest.approx(want, rel=1e-12), kw


@pytest.mark.parametrize("mom", [0.0, 0.9])
def test_elastic_update_and_schedule_by_hand(mom):
    """Three replicas from different starts, exp schedule, momentum, weight decay: 4 steps."""
    x = nn.Parameter(X0.clone())
    opt = ReplicaSGD([x], lr=0.05, replicas=3, gamma0=0.5, gamma1=0.4, momentum=mom,
                     nesterov=mom > 0, weight_decay=0.02)
    starts = [X0, X0 + torch.tensor([0.5, -0.2, 0.1], dtype=D),
              X0 - torch.tensor([0.3, 0.3, -0.6], dtype=D)]
    opt.state[x]["replicas"] = [s.clone() for s in starts]
    calls = []
    for _ in range(4):
        out = opt.step(_closure(opt, x, calls))
        assert out.shape == (3,)                 # one loss per replica, concatenated
    want = _reference(4, 3, 0.05, [0.5 * 1.4 ** t for t in range(4)], starts, mom=mom,
                      nesterov=mom > 0, wd=0.02)
    got = opt.state[x]["replicas"]
    for a in range(3):
        torch.testing.assert_close(got[a], want[a], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(x.detach(), sum(want) / 3, rtol=1e-13, atol=1e-13)  # the centre
    # each closure call saw its replica in the model (steps 1.. start from the updated replicas)
    assert len(calls) == 12
    for a in range(3):
        torch.testing.assert_close(calls[a], starts[a])


def test_strong_coupling_collapses_onto_the_centre():
    """lr gamma = 1 (the strongest explicit coupling): w^a <- w_bar - lr g_a, so the centre moves
    by SGD with the replicas' mean gradient and the replicas sit on it up to their own step."""
    x = nn.Parameter(X0.clone())
    lr = 0.01
    opt = ReplicaSGD([x], lr=lr, replicas=4, gamma0=1.0 / lr)
    starts = [X0 + 0.3 * torch.randn(3, dtype=D) for _ in range(4)]
    opt.state[x]["replicas"] = [s.clone() for s in starts]
    centre = sum(starts) / 4
    calls = []
    opt.step(_closure(opt, x, calls))
    grads = [_grad(starts[a], a) for a in range(4)]
    for a in range(4):
        torch.testing.assert_close(opt.state[x]["replicas"][a], centre - lr * grads[a],
                                   rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.detach(), centre - lr * sum(grads) / 4, rtol=1e-12, atol=1e-12)
    # with zero data gradient every replica lands exactly on the centre
    opt.zero_grad()

    def flat():
        opt.zero_grad(set_to_none=True)
        (0.0 * x.sum()).backward()
        return x.detach().sum().reshape(1)
    before = x.detach().clone()
    opt.step(flat)
    for r in opt.state[x]["replicas"]:
        torch.testing.assert_close(r, before, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x.detach(), before, rtol=1e-12, atol=1e-14)


def test_state_dict_round_trip_and_use_replica():
    m1 = _mlp()
    opt1 = ReplicaSGD(m1.parameters(), lr=0.1, replicas=3, gamma0=0.1, gamma1=0.2,
                      momentum=0.9)
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(30)]

    def closure_for(m, o, it):
        def closure():
            o.zero_grad(set_to_none=True)
            xb, yb = next(it)
            losses = nn.functional.cross_entropy(m(xb), yb, reduction="none")
            losses.mean().backward()
            return losses.detach()
        return closure
    it1 = iter(data)
    for _ in range(3):
        opt1.step(closure_for(m1, opt1, it1))
    m2 = _mlp()
    m2.load_state_dict(m1.state_dict())
    opt2 = ReplicaSGD(m2.parameters(), lr=0.1, replicas=3, gamma0=0.1, gamma1=0.2,
                      momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    assert opt2.t == 3 and opt2.gamma() == pytest.approx(0.1 * 1.2 ** 3)
    it2 = iter(data[9:])
    for _ in range(3):
        opt1.step(closure_for(m1, opt1, it1))
        opt2.step(closure_for(m2, opt2, it2))
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    with opt1.use_replica(2):
        for p in m1.parameters():
            torch.testing.assert_close(p.detach(), opt1.state[p]["replicas"][2])
    centre = [p.detach().clone() for p in m1.parameters()]
    for p, c in zip(m1.parameters(), centre):
        torch.testing.assert_close(p.detach(), sum(opt1.state[p]["replicas"]) / 3)
        p.data.add_(1.0)                           # an edit by hand ...
    opt1.average_into_model()                      # ... is replaced by the replicas' mean
    for p, c in zip(m1.parameters(), centre):
        torch.testing.assert_close(p.detach(), c)
    with pytest.raises(ValueError, match="replicas"):
        ReplicaSGD(_mlp().parameters(), replicas=2).load_state_dict(opt1.state_dict())


def test_independent_init_through_protocol_attach():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    model[1].running_mean.fill_(0.7)
    before = copy.deepcopy(model.state_dict())
    opt = ReplicaSGD(model.parameters(), lr=0.1, replicas=3, independent_init=True)
    handle = protocol.attach(opt, model)
    handle.remove()
    for k, v in model.state_dict().items():            # weights and buffers restored
        torch.testing.assert_close(v, before[k])
    w = model[0].weight
    reps = opt.state[w]["replicas"]
    torch.testing.assert_close(reps[0], before["0.weight"])
    assert not torch.allclose(reps[1], reps[0]) and not torch.allclose(reps[2], reps[1])
    bn_w = opt.state[model[1].weight]["replicas"]      # BN's reset_parameters: ones
    assert all(torch.equal(r, torch.ones(6)) for r in bn_w)
    opt.average_into_model()
    torch.testing.assert_close(w.detach(), sum(reps) / 3)


def _digits_run(data, make, steps):
    """Train small_cnn with ``make(model)`` for ``steps`` steps (a fresh batch on every closure
    call); BN statistics re-estimated at the end. Returns (step losses, train loss, test acc)."""
    torch.manual_seed(0)
    model = small_tasks.small_cnn(width=8, batch_norm=True)
    opt = make(model)
    g = torch.Generator().manual_seed(0)
    n = len(data.y_train)

    def closure():
        opt.zero_grad(set_to_none=True)
        idx = torch.randint(0, n, (64,), generator=g)
        losses = small_tasks.cross_entropy_losses(model, data.x_train[idx], data.y_train[idx])
        losses.mean().backward()
        return losses.detach()

    handle = protocol.attach(opt, model)
    model.train()
    losses = [float(opt.step(closure).mean()) for _ in range(steps)]
    handle.remove()
    recompute_bn_stats(model, [data.x_train[i:i + 256] for i in range(0, n, 256)])
    model.eval()
    with torch.no_grad():
        end = float(small_tasks.cross_entropy_losses(model, data.x_train, data.y_train).mean())
    return losses, end, small_tasks.accuracy(model, data.x_test, data.y_test)


def test_digits_run_trains_the_centre():
    """The centre after 60 steps (each replica 60 SGD steps) against SGD for 60 steps."""
    data = small_tasks.digits()
    sgd = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    losses, end, acc = _digits_run(data, lambda m: ReplicaSGD(
        m.parameters(), replicas=2, gamma0=0.05, gamma1=0.02, **sgd), 60)
    _, end_sgd, acc_sgd = _digits_run(data, lambda m: torch.optim.SGD(m.parameters(), **sgd), 60)
    assert losses[0] > 2.0
    assert sum(losses[-10:]) / 10 < 0.25 * losses[0]
    assert end < 1.5 * end_sgd and acc > acc_sgd - 0.05 and acc > 0.85


def test_recompute_bn_stats_is_the_cumulative_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.BatchNorm1d(4, momentum=0.3))
    model.eval()
    bn = model[2]
    bn.running_mean.fill_(5.0)
    batches = [torch.randn(n, 3) for n in (5, 9, 4)]
    n = recompute_bn_stats(model, [(b, None) for b in batches])
    assert n == 3
    with torch.no_grad():
        feats = [model[0](b) for b in batches]      # dropout off during the pass
    mean = sum(f.mean(0) for f in feats) / 3
    var = sum(f.var(0, unbiased=True) for f in feats) / 3
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert int(bn.num_batches_tracked) == 3
    assert bn.momentum == 0.3 and not model.training and not bn.training


def test_requires_closure_and_validates():
    x = nn.Parameter(X0.clone())
    opt = ReplicaSGD([x], replicas=2)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    for bad in (dict(replicas=0), dict(schedule="x"), dict(schedule="cosine"),
                dict(gamma_growth=10.0), dict(nesterov=True), dict(gamma_every=0)):
        with pytest.raises(ValueError):
            ReplicaSGD([nn.Parameter(X0.clone())], **bad)
