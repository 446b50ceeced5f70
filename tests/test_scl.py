"""SCL (Tang et al., arXiv 2201.05020): identity STE, per-feature mask-gradient normalisation,
connection-count regulariser, folding for export."""

import pytest
import torch
from torch import nn

from ssl_suite.analysis.small_tasks import digits, small_cnn, small_mlp
from ssl_suite.models.scl import (apply_scl, fold_scl, global_sparsity, mask_parameters,
                                  normalize_mask_grad, scl_layers, scl_regularizer,
                                  sparsity_report)


def _tiny_layer(norm):
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    w = layer.weight.detach().clone()
    apply_scl(layer, norm=norm)
    m_hat = layer.parametrizations.weight[0].m_hat
    with torch.no_grad():  # prune a few connections by hand
        m_hat.copy_(torch.tensor([[1.0, -0.5, 0.3, 2.0],
                                  [-1.0, 0.2, 0.7, -0.1],
                                  [0.4, 0.4, -2.0, 0.9]]))
    return layer, w, m_hat


def _hand_grads(w, m_hat):
    torch.manual_seed(1)
    x, c = torch.randn(5, 4), torch.randn(5, 3)
    h = (m_hat.detach() > 0).float()
    dl_dw = c.t() @ x  # L = sum(c * (x W^T)) => dL/dW = c^T x
    return x, c, h, dl_dw


def test_identity_ste_gradient_matches_hand_computation():
    layer, w, m_hat = _tiny_layer(norm=None)
    x, c, h, dl_dw = _hand_grads(w, m_hat)
    y = layer(x)
    torch.testing.assert_close(y, x @ (w * h).t() + layer.bias, rtol=0, atol=1e-6)
    (c * y).sum().backward()
    w_hat = layer.parametrizations.weight.original
    torch.testing.assert_close(w_hat.grad, h * dl_dw)          # pruned weights: zero task grad
    assert (w_hat.grad[h == 0] == 0).all()
    torch.testing.assert_close(m_hat.grad, w * dl_dw)          # identity STE: dH/dm_hat = 1
    assert (m_hat.grad[h == 0] != 0).all()                     # pruned masks can revive


@pytest.mark.parametrize("norm", ["rms", "l2", "maxabs"])
def test_per_feature_mask_gradient_normalisation_by_hand(norm):
    layer, w, m_hat = _tiny_layer(norm=norm)
    x, c, h, dl_dw = _hand_grads(w, m_hat)
    (c * layer(x)).sum().backward()
    g = w * dl_dw
    if norm == "rms":
        scale = g.pow(2).mean(dim=1, keepdim=True).sqrt()
    elif norm == "l2":
        scale = g.pow(2).sum(dim=1, keepdim=True).sqrt()
    else:
        scale = g.abs().max(dim=1, keepdim=True).values
    expected = g / (scale + 1e-8)
    torch.testing.assert_close(m_hat.grad, expected)
    assert not torch.allclose(expected, g)  # the normalisation did something
    torch.testing.assert_close(normalize_mask_grad(g, norm), expected)
    # the weight gradient is untouched by the hook
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, h * dl_dw)


def test_regulariser_value_and_gradient_are_not_normalised():
    layer, w, m_hat = _tiny_layer(norm="rms")
    x, c, h, dl_dw = _hand_grads(w, m_hat)
    lam = 0.7
    r = scl_regularizer(layer)
    assert r.item() == h.sum().item() == 8
    ((c * layer(x)).sum() + lam * r).backward()
    g = w * dl_dw
    g_tilde = g / (g.pow(2).mean(dim=1, keepdim=True).sqrt() + 1e-8)
    torch.testing.assert_close(m_hat.grad, g_tilde + lam)  # dJ/dm_hat = G~ + lambda
    m_hat.grad = None
    rn = scl_regularizer(layer, normalize=True)
    assert rn.item() == pytest.approx(8 / 12)
    (lam * rn).backward()
    torch.testing.assert_close(m_hat.grad, torch.full_like(m_hat, lam / 12))


def test_apply_scl_options_and_errors():
    net = small_cnn(width=4)
    handle = apply_scl(net, layers=("conv",), exclude=("0",))
    assert handle.names == ["3", "6"] and list(scl_layers(net)) == ["3", "6"]
    assert len(handle.mask_parameters()) == 2
    assert apply_scl(net, layers=("conv",)).names == ["0"]  # already-masked layers left alone
    assert sparsity_report(net) == {"0": 0.0, "3": 0.0, "6": 0.0}  # starts dense
    with pytest.raises(ValueError):
        apply_scl(small_mlp(), init=0.0)
    with pytest.raises(ValueError):
        apply_scl(small_mlp(), layers=("bn",))
    with pytest.raises(ValueError):
        scl_regularizer(small_mlp())


def _train_scl(lam, data, steps=300, seed=0):
    torch.manual_seed(seed)
    net = small_mlp(in_dim=64, hidden=32, depth=2)
    apply_scl(net)
    masks = mask_parameters(net)
    ids = {id(p) for p in masks}
    opt = torch.optim.SGD([{"params": [p for p in net.parameters() if id(p) not in ids],
                            "lr": 0.05, "momentum": 0.9},
                           {"params": masks, "lr": 0.02, "weight_decay": 0.0}])
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(data.y_train), (64,), generator=g)
        loss = nn.functional.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        (loss + lam * scl_regularizer(net)).backward()
        opt.step()
    with torch.no_grad():
        acc = (net(data.x_test).argmax(1) == data.y_test).float().mean().item()
    return global_sparsity(net), acc


def test_regulariser_drives_sparsity_up_with_lambda():
    data = digits(flat=True)
    results = {lam: _train_scl(lam, data) for lam in (0.0, 0.2, 0.6)}
    sp = [results[lam][0] for lam in (0.0, 0.2, 0.6)]
    assert sp[0] < 0.3, results
    assert sp[0] < sp[1] < sp[2], results
    assert sp[2] > 0.5, results
    assert results[0.0][1] > 0.85, results  # the masked net still learns the task


def test_fold_gives_identical_outputs_and_plain_keys():
    torch.manual_seed(0)
    plain = small_cnn(width=4)
    plain_keys = set(plain.state_dict())
    net = small_cnn(width=4)
    net.load_state_dict(plain.state_dict())
    apply_scl(net, init=1.0)
    with torch.no_grad():
        for p in mask_parameters(net):
            p.copy_(torch.randn_like(p))  # about half pruned
    net.eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        y = net(x)
    before = sparsity_report(net)
    assert all(0.2 < s < 0.8 for s in before.values())
    report = fold_scl(net)
    assert report == before
    assert set(net.state_dict()) == plain_keys and not scl_layers(net)
    with torch.no_grad():
        assert torch.equal(net(x), y)
    fresh = small_cnn(width=4)
    fresh.load_state_dict(net.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    zeros = (fresh[0].weight == 0).float().mean().item()
    assert zeros == pytest.approx(before["0"])
