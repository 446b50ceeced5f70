"""timm's Lamb against LAMB as the paper writes it (You et al., ICLR 2020, Algorithm 2).

Algorithm 2, per layer i, with phi the identity (as in the paper's experiments)::

    m_t = beta1 m_{t-1} + (1 - beta1) g_t           v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
    m^_t = m_t / (1 - beta1^t)                      v^_t = v_t / (1 - beta2^t)
    r_t = m^_t / (sqrt(v^_t) + eps)
    x_{t+1} = x_t - lr * ||x_t|| / ||r_t + lam x_t|| * (r_t + lam x_t)

(the bias-corrected moments feed r_t only; the stored m_t, v_t stay uncorrected, as in Adam).

timm's ``Lamb`` (an NVLAMB port) computes exactly this when built with
``max_grad_norm=None, always_adapt=True`` and its defaults ``bias_correction=True,
grad_averaging=True, trust_clip=False, decoupled_decay=False, caution=False``. Its defaults
differ from the paper in two places, both checked below:

* ``max_grad_norm=1.0``: every gradient is first divided by max(1, ||g_all|| / 1.0), a global
  pre-normalisation the paper does not have;
* ``always_adapt=False``: layers with weight decay 0 (our bias / norm groups) skip the trust
  ratio and take a plain Adam step; the paper adapts every layer.

Where ||x|| or ||r + lam x|| is 0, timm uses a trust ratio of 1 (the paper leaves 0/0 open).
Options that leave the paper: ``trust_clip=True`` (LAMBC, ratio <= 1), ``decoupled_decay=True``
(AdamW-style decay outside the ratio), ``grad_averaging=False`` (m without the 1 - beta1),
``bias_correction=False`` (arXiv v3, without m^ and v^); the paper's phi clip to
[gamma_l, gamma_u] is not offered (identity, as in the paper's experiments).
So ssl_suite needs no LAMB of its own: ``lamb`` from timm's registry, with
``optim.kwargs: {max_grad_norm: null, always_adapt: true}`` for the paper's form.
"""

import math

import pytest
import torch
from timm.optim import Lamb
from torch import nn

PAPER_KWARGS = dict(max_grad_norm=None, always_adapt=True, bias_correction=True,
                    grad_averaging=True, trust_clip=False, decoupled_decay=False)
LR, BETA1, BETA2, EPS = 0.05, 0.9, 0.999, 1e-6
WDS = [0.01, 0.0]  # a decayed matrix and an excluded (bias-like) vector, as our groups are


def _paper_lamb(layers, grads_per_step, wds, adapt=None):
    """Algorithm 2 with Python floats, one element at a time; the layers after each step.

    ``layers``: flat float lists, one per layer; ``grads_per_step[t][i]``: layer i's gradient at
    step t + 1; ``wds[i]``: lambda of layer i; ``adapt[i]=False`` sets layer i's trust ratio to 1
    (not in the paper: what timm does for wd=0 layers unless ``always_adapt``).
    """
    adapt = adapt or [True] * len(layers)
    x = [list(layer) for layer in layers]
    m = [[0.0] * len(layer) for layer in layers]
    v = [[0.0] * len(layer) for layer in layers]
    history = []
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (xi, gi) in enumerate(zip(x, grads)):
            update = []                                       # r_t + lambda x_t
            for j, g in enumerate(gi):
                m[i][j] = BETA1 * m[i][j] + (1 - BETA1) * g
                v[i][j] = BETA2 * v[i][j] + (1 - BETA2) * g * g
                m_hat = m[i][j] / (1 - BETA1 ** t)
                v_hat = v[i][j] / (1 - BETA2 ** t)
                update.append(m_hat / (math.sqrt(v_hat) + EPS) + wds[i] * xi[j])
            x_norm = math.sqrt(sum(a * a for a in xi))
            u_norm = math.sqrt(sum(a * a for a in update))
            trust = x_norm / u_norm if adapt[i] and x_norm > 0 and u_norm > 0 else 1.0
            x[i] = [a - LR * trust * u for a, u in zip(xi, update)]  # phi = identity
        history.append([list(xi) for xi in x])
    return history


def _setup(seed, steps=3, scales=None):
    """A 5x4 matrix, a 4-vector and ``steps`` random gradients (float64)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(5, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    scales = scales or [2.0] * steps  # global gradient norms of about 9 * scale / 2
    grads = [[s * torch.randn(5, 4, generator=g, dtype=torch.float64),
              s * torch.randn(4, generator=g, dtype=torch.float64)] for s in scales]
    return [weight, bias], grads


def _timm(init, grads, **kwargs):
    """Run timm's Lamb over the steps; the layers after each step."""
    weight, bias = (nn.Parameter(t.clone()) for t in init)
    opt = Lamb([{"params": [weight], "weight_decay": WDS[0]},
                {"params": [bias], "weight_decay": WDS[1]}],
               lr=LR, betas=(BETA1, BETA2), eps=EPS, **kwargs)
    history = []
    for step_grads in grads:
        weight.grad, bias.grad = (gr.clone() for gr in step_grads)
        opt.step()
        history.append([weight.detach().clone(), bias.detach().clone()])
    return history


def _paper(init, grads, adapt=None):
    layers = [t.flatten().tolist() for t in init]
    flat = [[gr.flatten().tolist() for gr in step] for step in grads]
    return [[torch.tensor(x, dtype=torch.float64).view_as(t) for x, t in zip(step, init)]
            for step in _paper_lamb(layers, flat, WDS, adapt)]


def _close(a, b, rtol=1e-10):
    return all(torch.allclose(x, y, rtol=rtol, atol=1e-12) for sa, sb in zip(a, b)
               for x, y in zip(sa, sb))


@pytest.mark.parametrize("foreach", [False, True], ids=["single_tensor", "foreach"])
def test_timm_lamb_matches_paper_algorithm2(foreach):
    """3 steps on random tensors: timm == Algorithm 2 by hand, step by step, both timm paths."""
    init, grads = _setup(seed=0)
    expected = _paper(init, grads)
    got = _timm(init, grads, foreach=foreach, **PAPER_KWARGS)
    for t, (exp_t, got_t) in enumerate(zip(expected, got), start=1):
        for name, e, g in zip(("matrix", "vector"), exp_t, got_t):
            assert torch.allclose(g, e, rtol=1e-10, atol=1e-12), f"step {t}, {name}"
    # each layer moved, by lr * ||x|| per step at most: a wrong or vanishing update would show
    for x0, x3 in zip(init, got[-1]):
        assert 0.1 * LR * x0.norm() < (x3 - x0).norm() <= 3 * LR * x0.norm() * (1 + LR) ** 2


def test_timm_default_max_grad_norm_is_a_global_pre_normalisation():
    """max_grad_norm=1.0 (timm's default) == the paper on g / max(1, ||g_all||), per step."""
    init, grads = _setup(seed=1, scales=[2.0, 20.0, 0.05])  # norms ~9, ~90, ~0.2
    norms = [torch.cat([gr.flatten() for gr in step]).norm() for step in grads]
    assert norms[0] > 1 and norms[1] > 1 and norms[2] < 1
    clipped = [[gr / max(1.0, float(n)) for gr in step] for step, n in zip(grads, norms)]
    got = _timm(init, grads, **{**PAPER_KWARGS, "max_grad_norm": 1.0})
    assert _close(got, _paper(init, clipped))
    assert not _close(got, _paper(init, grads), rtol=1e-4)


def test_timm_default_always_adapt_false_skips_zero_decay_layers():
    """always_adapt=False (timm's default): the wd=0 vector takes a plain Adam step (trust 1),
    the decayed matrix is adapted as in the paper."""
    init, grads = _setup(seed=2)
    got = _timm(init, grads, **{**PAPER_KWARGS, "always_adapt": False})
    assert _close(got, _paper(init, grads, adapt=[True, False]))
    assert not _close([s[1:] for s in got], [s[1:] for s in _paper(init, grads)], rtol=1e-4)
    # step 1 of Adam is lr * g / (|g| + eps): about lr * sign(g)
    g1 = grads[0][1]
    assert torch.allclose(got[0][1], init[1] - LR * g1 / (g1.abs() + EPS), rtol=1e-12)
