"""BYOL loss, tau schedule and EMA update against hand computation (Grill et al. 2020)."""

import math

import pytest
import torch
from torch import nn

from ssl_suite.config import ModelConfig
from ssl_suite.models import (MLPHead, build_byol, byol_loss, ema_update_, regression_loss,
                              tau_schedule)


def test_regression_loss_by_hand():
    p = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    z = torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    # cos = (12 + 12) / 25 = 0.96 ; orthogonal -> 0
    expected = torch.tensor([2 - 2 * 0.96, 2.0])
    assert torch.allclose(regression_loss(p, z), expected, atol=1e-6)


def test_byol_loss_sums_views_and_means_batch():
    q1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q2 = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    z1 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # pairs: (q1, z2): sample0 cos 1 -> 0 ; sample1 cos 0 -> 2
    #        (q2, z1): sample0 cos 1/sqrt2 -> 2 - sqrt2 ; sample1 cos 0 -> 2
    per_sample = torch.tensor([0 + (2 - math.sqrt(2)), 2 + 2])
    assert byol_loss(q1, q2, z1, z2).item() == pytest.approx(per_sample.mean().item(), abs=1e-6)
    # identical predictions and targets: zero loss, opposite: 8 per sample (upper bound)
    assert byol_loss(q1, q1, q1, q1).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(q1, q1, -q1, -q1).item() == pytest.approx(8.0, abs=1e-6)


def test_byol_loss_stops_gradient_into_target():
    q1, q2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    z1, z2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    byol_loss(q1, q2, z1, z2).backward()
    assert q1.grad is not None and q1.grad.abs().sum() > 0
    assert z1.grad is None and z2.grad is None


@pytest.mark.parametrize("base", [0.996, 0.99])
def test_tau_schedule_points(base):
    K = 1000
    assert tau_schedule(0, K, base) == pytest.approx(base)
    assert tau_schedule(K // 2, K, base) == pytest.approx(1 - (1 - base) / 2)
    assert tau_schedule(K, K, base) == pytest.approx(1.0)
    assert tau_schedule(2 * K, K, base) == pytest.approx(1.0)  # clamped
    k = 250
    assert tau_schedule(k, K, base) == pytest.approx(
        1 - (1 - base) * (math.cos(math.pi * k / K) + 1) / 2)


def test_ema_update_by_hand():
    target = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    online = [torch.tensor([3.0, -2.0]), torch.tensor([[10.0]])]
    ema_update_(target, online, tau=0.9)
    assert torch.allclose(target[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -2]))
    assert torch.allclose(target[1], torch.tensor([[1.0]]))
    assert torch.equal(online[0], torch.tensor([3.0, -2.0]))


def _tiny_cfg(**kw):
    base = dict(backbone="resnet18", cifar_stem=True, proj_hidden_dim=32, proj_dim=16,
                pred_hidden_dim=32, backbone_kwargs={})
    base.update(kw)
    return ModelConfig(**base)


def test_build_byol_shapes_and_target_properties():
    online, target = build_byol(_tiny_cfg())
    x = torch.randn(4, 3, 16, 16)
    q1, q2 = online(x, x.flip(-1))
    assert q1.shape == (4, 16) and q2.shape == (4, 16)
    assert target(x).shape == (4, 16)
    assert all(not p.requires_grad for p in target.parameters())
    assert isinstance(online.encoder.conv1, nn.Conv2d) and online.encoder.conv1.kernel_size == (3, 3)
    assert online.encoder.conv1.stride == (1, 1) and isinstance(online.encoder.maxpool, nn.Identity)
    # projector: Linear -> BN -> ReLU -> Linear without bias
    head = online.projector
    assert isinstance(head, MLPHead) and head[3].bias is None and head[0].out_features == 32
    # independent init (reference) differs from online; copy init is equal
    t_params, o_params = target.ema_pairs(online)
    assert not torch.equal(t_params[0], o_params[0])
    online_c, target_c = build_byol(_tiny_cfg(target_init="copy"))
    tc, oc = target_c.ema_pairs(online_c)
    assert all(torch.equal(a, b) for a, b in zip(tc, oc))


def test_ema_pairs_update_moves_target_toward_online():
    online, target = build_byol(_tiny_cfg())
    tgt, src = target.ema_pairs(online)
    before = [t.clone() for t in tgt]
    ema_update_(tgt, src, tau=0.99)
    for b, t, s in zip(before, tgt, src):
        assert torch.allclose(t, 0.99 * b + 0.01 * s, atol=1e-6)


def test_weighted_knn_by_hand():
    from ssl_suite.engine.knn import knn_accuracy, weighted_knn_predict
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[0.6, 0.8]])
    scores = weighted_knn_predict(train, labels, query, num_classes=2, k=2, temperature=0.5)
    # neighbours: [0.8,0.6] (sim 0.96) and [0,1] (sim 0.8), both class 1; class 0 not in top-2
    expected = torch.tensor([[0.0, math.exp(0.96 / 0.5) + math.exp(0.8 / 0.5)]])
    assert torch.allclose(scores, expected, rtol=1e-5)
    assert knn_accuracy(train, labels, query, torch.tensor([1]), 2, k=2, temperature=0.5) == 1.0
    # k=3 with a low temperature: the nearest sample dominates
    assert weighted_knn_predict(train, labels, torch.tensor([[1.0, 0.05]]), 2, 3, 0.01).argmax() == 0
