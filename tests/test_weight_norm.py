"""Weight normalization, data-dependent init and mean-only BN (Salimans & Kingma 2016)."""

import copy

import pytest
import timm
import torch
from torch import nn

import ssl_suite  # noqa: F401  (registers resnet18_cifar)
from ssl_suite.models.backbone import create_backbone
from ssl_suite.models.heads import MLPHead
from ssl_suite.models.weight_norm import (MeanOnlyBatchNorm, apply_weight_norm,
                                          data_dependent_init, fold_weight_norm,
                                          mean_only_batchnorm, to_batchnorm, weight_norm_layers)

TINY = dict(channels=[8, 16, 32, 64], stem_width=8)


def tiny_resnet(dtype=torch.float64):
    return create_backbone("resnet18", cifar_stem=True, **TINY).to(dtype)


def encoder_projector(dtype=torch.float64):
    """A tiny BYOL encoder + projector: ResNet-18 (CIFAR stem) -> Linear -> BN -> ReLU -> Linear."""
    enc = tiny_resnet(dtype)
    return nn.Sequential(enc, MLPHead(enc.num_features, 32, 16)).to(dtype)


def capture_outputs(model, names, run):
    """Outputs of the named submodules during ``run()`` (every call appended)."""
    out, handles = {}, []
    for n in names:
        handles.append(model.get_submodule(n).register_forward_hook(
            lambda m, a, y, n=n: out.setdefault(n, []).append(y.detach().clone())))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return out


def per_unit(y):
    """Per-unit mean and (population) variance: channels of a conv output, columns of a matrix."""
    dims = [0] + list(range(2, y.dim())) if y.dim() > 2 else [0]
    return y.mean(dim=dims), y.var(dim=dims, unbiased=False)


# ---- the reparametrisation -------------------------------------------------------------------


def test_linear_and_conv_compute_the_same_function():
    lin = nn.Linear(5, 7).double()
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x, img = torch.randn(6, 5, dtype=torch.float64), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    w_lin, w_conv = lin.weight.detach().clone(), conv.weight.detach().clone()
    ref_lin, ref_conv = lin(x), conv(img)
    assert apply_weight_norm(lin) == [""] and apply_weight_norm(conv) == [""]
    torch.testing.assert_close(lin(x), ref_lin, rtol=0, atol=1e-12)
    torch.testing.assert_close(conv(img), ref_conv, rtol=0, atol=1e-12)
    # g = ||w|| per output unit, v = w (eq. 2 with the function unchanged)
    g = conv.parametrizations.weight.original0
    assert g.shape == (4, 1, 1, 1)
    torch.testing.assert_close(g.flatten(), w_conv.flatten(1).norm(dim=1))
    torch.testing.assert_close(lin.parametrizations.weight.original0.flatten(),
                               w_lin.norm(dim=1))
    # scaling g of one unit scales exactly that unit's output (direction and magnitude decoupled)
    with torch.no_grad():
        lin.parametrizations.weight.original0[2] *= 3.0
    y = lin(x)
    torch.testing.assert_close(y[:, 2] - lin.bias[2], 3.0 * (ref_lin[:, 2] - lin.bias[2]))
    torch.testing.assert_close(y[:, 0], ref_lin[:, 0])
    # applying twice is a no-op
    assert apply_weight_norm(lin) == []


def test_layer_kinds_and_exclude():
    head = MLPHead(8, 16, 4)
    assert apply_weight_norm(copy.deepcopy(head), exclude=("3",)) == ["0"]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    assert apply_weight_norm(copy.deepcopy(model), layers=("linear",)) == ["2"]
    assert apply_weight_norm(copy.deepcopy(model), layers=("conv",)) == ["0"]
    net = tiny_resnet()
    names = apply_weight_norm(net, exclude=("layer4", "conv1"))
    assert "conv1" not in names and not any(n.startswith("layer4") for n in names)
    assert "layer3.0.downsample.0" in names and "layer1.0.conv1" in names
    with pytest.raises(ValueError, match="layers must be"):
        apply_weight_norm(head, layers=("attention",))


@pytest.mark.parametrize("train", [False, True])
def test_timm_resnet_computes_the_same_function(train):
    net = tiny_resnet().train(train)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    n_conv = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    with torch.no_grad():
        ref = net(x)
    names = apply_weight_norm(net)
    assert len(names) == n_conv == 21   # stem, 16 block convs, 4 downsamples
    assert "conv1.parametrizations.weight.original0" in net.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, rtol=0, atol=1e-10)


# ---- data-dependent initialisation ----------------------------------------------------------


def test_data_dependent_init_gives_zero_mean_unit_variance_preactivations():
    model = encoder_projector().train()
    names = apply_weight_norm(model)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    before = capture_outputs(model, names, lambda: model(x))
    # the init is not a no-op: the default (Kaiming) init is far from unit variance somewhere
    assert max((per_unit(before[n][0])[1] - 1).abs().max().item() for n in names) > 0.1
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}

    stats = data_dependent_init(model, lambda: model(x))
    for k, v in buffers.items():   # BN running statistics untouched by the init pass
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    assert list(stats) == names   # every layer, in forward order (= module order for a ResNet)
    assert stats["0.conv1"]["bias"] is False and stats["1.0"]["bias"] is True

    after = capture_outputs(model, names, lambda: model(x))
    for n in names:
        mean, var = per_unit(after[n][0])
        torch.testing.assert_close(var, torch.ones_like(var), rtol=0, atol=1e-5, msg=n)
        if stats[n]["bias"]:
            torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-5, msg=n)
        else:   # no bias: only g is set; the mean mu/sigma stays
            torch.testing.assert_close(mean, stats[n]["mean"] / stats[n]["std"], rtol=0,
                                       atol=1e-5, msg=n)


def test_data_dependent_init_matches_a_sequential_reference():
    """One hooked pass == the paper's layer-by-layer procedure that re-runs the network per layer."""
    torch.manual_seed(1)
    model = encoder_projector().train()
    names = apply_weight_norm(model)
    ref = copy.deepcopy(model)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    data_dependent_init(model, lambda: model(x), init_scale=2.0)

    buffers = copy.deepcopy(ref.state_dict())
    for n in names:   # sequential reference: re-run the forward for every layer
        layer = ref.get_submodule(n)
        seen = {}
        h = layer.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        with torch.no_grad():
            ref(x)
        h.remove()
        v = layer.parametrizations.weight.original1.detach()
        t = layer._conv_forward(seen["x"], v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1), None) \
            if isinstance(layer, nn.Conv2d) else seen["x"] @ (v / v.norm(dim=1, keepdim=True)).T
        mu, var = per_unit(t)
        sigma = (var + 1e-8).sqrt()
        with torch.no_grad():
            g = layer.parametrizations.weight.original0
            g.copy_((2.0 / sigma).view(g.shape))
            if layer.bias is not None:
                layer.bias.copy_(-mu * 2.0 / sigma)
    ref.load_state_dict({k: v for k, v in buffers.items() if "running" in k or "tracked" in k},
                        strict=False)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-9, atol=1e-10, msg=k)


def test_data_dependent_init_with_mean_only_bn():
    """WN + mean-only BN (§2.2): after the init every mean-only BN emits mean b, variance 1."""
    model = encoder_projector(torch.float32).train()
    mobn = mean_only_batchnorm(model)
    apply_weight_norm(model)
    assert len(mobn) == 22 and all(isinstance(model.get_submodule(n), MeanOnlyBatchNorm)
                                   for n in mobn)
    x = torch.randn(32, 3, 8, 8)
    data_dependent_init(model, lambda: model(x))
    out = capture_outputs(model, mobn, lambda: model(x))
    for n in mobn:
        mean, var = per_unit(out[n][0])
        torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-4, msg=n)
        torch.testing.assert_close(var, torch.ones_like(var), rtol=0, atol=1e-4, msg=n)


def test_data_dependent_init_needs_weight_norm_and_warns_on_unreached_layers():
    with pytest.raises(ValueError, match="apply_weight_norm"):
        data_dependent_init(nn.Linear(3, 3), lambda: None)
    model = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3)})
    apply_weight_norm(model)
    with pytest.warns(UserWarning, match="never reached"):
        stats = data_dependent_init(model, lambda: model["a"](torch.randn(8, 3)))
    assert list(stats) == ["a"]


# ---- mean-only batch norm --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 5), (8, 5, 3), (8, 5, 3, 4)])
def test_mean_only_bn_by_hand(shape):
    m = MeanOnlyBatchNorm(5, momentum=0.1)
    with torch.no_grad():
        m.bias.copy_(torch.arange(5.0))
    b = torch.arange(5.0).view((1, 5) + (1,) * (len(shape) - 2))
    dims = [0] + list(range(2, len(shape)))
    xs = [torch.randn(shape) * 3 + 2 for _ in range(2)]
    running = torch.zeros(5)
    for x in xs:   # train: x - batch mean + b, running <- 0.9 running + 0.1 mu_B
        mu = x.mean(dim=dims)
        torch.testing.assert_close(m(x), x - mu.view(b.shape) + b)
        running = 0.9 * running + 0.1 * mu
    torch.testing.assert_close(m.running_mean, running)
    assert int(m.num_batches_tracked) == 2
    m.eval()   # eval: x - running mean + b
    x = torch.randn(shape)
    torch.testing.assert_close(m(x), x - running.view(b.shape) + b)
    # no division by the batch std: scaling the centred input scales the output
    m.train()
    y1, y2 = m(xs[0]), m(4 * xs[0])
    torch.testing.assert_close(y2 - b, 4 * (y1 - b))


def test_mean_only_batchnorm_replaces_bn_and_keeps_beta_and_running_mean():
    head = MLPHead(6, 8, 4)
    with torch.no_grad():
        head[1].bias.copy_(torch.linspace(-1, 1, 8))
        head[1].weight.fill_(3.0)
        head[1].running_mean.copy_(torch.linspace(0, 1, 8))
    assert mean_only_batchnorm(head) == ["1"]
    new = head[1]
    assert isinstance(new, MeanOnlyBatchNorm) and new.kind == "BatchNorm1d"
    torch.testing.assert_close(new.bias.detach(), torch.linspace(-1, 1, 8))
    torch.testing.assert_close(new.running_mean, torch.linspace(0, 1, 8))
    assert set(head.state_dict()) == {"0.weight", "0.bias", "1.bias", "1.running_mean",
                                      "1.num_batches_tracked", "3.weight"}
    # gradients reach the bias and pass through the mean subtraction (sum over batch is zero)
    x = torch.randn(10, 6, requires_grad=True)
    head(x).sum().backward()
    assert head[1].bias.grad is not None and head[0].weight.grad.abs().sum() > 0
    no_affine = nn.Sequential(nn.BatchNorm2d(3, affine=False))
    mean_only_batchnorm(no_affine)
    assert no_affine[0].bias is None and no_affine[0].kind == "BatchNorm2d"
    from timm.layers import BatchNormAct2d
    with pytest.raises(ValueError, match="BatchNormAct2d"):
        mean_only_batchnorm(nn.Sequential(BatchNormAct2d(3)))


# ---- folding for export ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_fold_and_to_batchnorm_load_into_a_plain_timm_model(dtype, tol):
    net = tiny_resnet(dtype).train()
    mean_only_batchnorm(net)
    apply_weight_norm(net)
    x = torch.randn(16, 3, 8, 8, dtype=dtype)
    data_dependent_init(net, lambda: net(x))
    with torch.no_grad():   # a few train steps' worth of running means and non-zero biases
        for _ in range(3):
            net(torch.randn(16, 3, 8, 8, dtype=dtype) + 0.5)
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    net.eval()
    test = torch.randn(5, 3, 8, 8, dtype=dtype)
    with torch.no_grad():
        ref = net(test)

    fold_weight_norm(net)
    assert not weight_norm_layers(net)
    to_batchnorm(net)
    assert not any(isinstance(m, MeanOnlyBatchNorm) for m in net.modules())
    with torch.no_grad():
        torch.testing.assert_close(net(test), ref, rtol=tol, atol=tol)

    fresh = timm.create_model("resnet18_cifar", num_classes=0, **TINY).to(dtype)
    state = net.state_dict()
    assert set(state) == set(fresh.state_dict())
    assert not any("parametrizations" in k for k in state)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(test), ref, rtol=tol, atol=tol)


def test_fold_refuses_stacked_parametrizations():
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w
    lin = nn.Linear(3, 3)
    apply_weight_norm(lin)
    torch.nn.utils.parametrize.register_parametrization(lin, "weight", Double())
    with pytest.raises(ValueError, match="2 parametrizations"):
        fold_weight_norm(lin)


# ---- BYOL target network ---------------------------------------------------------------------


def test_target_network_needs_the_same_parametrization(tmp_path):
    from ssl_suite.models.byol import build_byol, ema_update_
    from helpers import tiny_config

    cfg = tiny_config(tmp_path, **{"model.target_init": "copy"})
    online, target = build_byol(cfg.model)
    for part in (online.encoder, online.projector, online.predictor):
        mean_only_batchnorm(part)
        apply_weight_norm(part)
    with pytest.raises(RuntimeError):   # plain target: the EMA pairs no longer line up
        target.ema_pairs(online)
    for part in (target.encoder, target.projector):
        mean_only_batchnorm(part)
        apply_weight_norm(part)
    x = torch.randn(8, 3, 16, 16)
    online.train()
    data_dependent_init(online, lambda: online(x))
    target.encoder.load_state_dict(online.encoder.state_dict())
    target.projector.load_state_dict(online.projector.state_dict())
    tgt, src = target.ema_pairs(online)
    names_t = [n for n, _ in target.encoder.named_parameters()]
    names_o = [n for n, _ in online.encoder.named_parameters()]
    assert names_t == names_o and any("original0" in n for n in names_t)
    with torch.no_grad():
        for p in src:
            p.add_(1.0)
    before = [t.clone() for t in tgt]
    ema_update_(tgt, src, 0.9)
    for t, b, s in zip(tgt, before, src):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)


def test_a_layer_called_twice_is_initialised_at_its_first_call():
    lin = nn.Linear(4, 4).double()
    apply_weight_norm(lin)
    x = torch.randn(32, 4, dtype=torch.float64) * 5 + 3
    data_dependent_init(lin, lambda: lin(torch.tanh(lin(x))))
    with torch.no_grad():
        mean, var = per_unit(lin(x))
        torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-8)
        torch.testing.assert_close(var, torch.ones_like(var), rtol=0, atol=1e-8)


def test_byol_pretraining_with_weight_norm_and_mean_only_bn_exports_to_timm(tmp_path):
    """model.weight_norm + model.mean_only_bn from the config: a few steps train, the EMA target
    carries the same parametrisation, linear-eval's encoder is plain, and the export loads
    strictly into timm and computes the same function."""
    import timm
    from helpers import tiny_config
    from ssl_suite.engine.pretrain import pretrain
    from ssl_suite.engine.runs import load_encoder
    from ssl_suite.export import export_encoder, load_backbone

    run = tmp_path / "run"
    res = pretrain(tiny_config(run, **{"train.max_steps": 3, "model.weight_norm": True,
                                       "model.mean_only_bn": True, "optim.name": "momentum",
                                       "optim.base_lr": 0.05}))
    assert torch.isfinite(torch.tensor(res.final_loss))
    assert weight_norm_layers(res.online) and weight_norm_layers(res.target)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in res.online.modules())
    enc, _ = load_encoder(run)
    assert not weight_norm_layers(enc)
    assert not any(isinstance(m, MeanOnlyBatchNorm) for m in enc.modules())
    out = export_encoder(run, tmp_path / "enc.safetensors")
    model = load_backbone(out)
    x = torch.randn(2, 3, 16, 16)
    enc.eval(), model.eval()
    torch.testing.assert_close(model(x), enc(x))
    assert isinstance(model, timm.models.ResNet)


def test_weight_decay_skips_the_weight_norm_gains():
    from ssl_suite.optim import param_groups
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    apply_weight_norm(net)
    groups = param_groups({"m": net}, 0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for m in (net[0], net[2]):
        assert id(m.parametrizations.weight.original0) not in decayed       # g: a scale
        assert id(m.parametrizations.weight.original1) in decayed           # v: the direction


def test_pretraining_data_dependent_init_standardises_the_init_batch(tmp_path):
    """The engine's init (one micro-batch, views drawn from the seed): afterwards, on those views,
    every weight-normalised layer of the online network with a bias has per-unit zero mean and unit
    variance; the target (independent init) is initialised on the same views; the global RNG is
    untouched."""
    from helpers import tiny_config
    import ssl_suite.engine.pretrain as pre
    from ssl_suite.data import build_data
    from ssl_suite.models import build_byol

    cfg = tiny_config(tmp_path / "run", **{"model.weight_norm": True})
    data = build_data(cfg.data, show_progress=False)
    torch.manual_seed(0)
    online, target = build_byol(cfg.model)
    seen = {}
    real = pre._weight_norm_init

    before = torch.get_rng_state()
    real(online, target, cfg, data, 32, torch.device("cpu"))
    assert torch.equal(before, torch.get_rng_state())
    # recompute the init batch's views exactly as the engine drew them
    g = torch.Generator().manual_seed(cfg.seed * 7_919 + 3)
    idx = torch.randperm(len(data.pretrain), generator=g)[:32]
    images = data.pretrain.images[idx]
    aug = pre.BYOLAugment(cfg.augment, data.mean, data.std)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed * 7_919 + 5)
        with torch.no_grad():
            v1, v2 = aug(images)
    hooks = []
    for name, m in weight_norm_layers(online).items():
        if m.bias is not None:
            hooks.append(m.register_forward_hook(
                lambda mod, a, out, name=name: seen.setdefault(name, out.detach())))
    online.train()
    with torch.no_grad():
        online(v1, v2)
    for h in hooks:
        h.remove()
    assert seen
    for name, y in seen.items():
        dims = [0] + list(range(2, y.dim()))
        torch.testing.assert_close(y.mean(dims), torch.zeros(y.shape[1]), atol=1e-4, rtol=0)
        torch.testing.assert_close(y.var(dims, unbiased=False), torch.ones(y.shape[1]),
                                   atol=1e-3, rtol=0)
    g_t = [m.parametrizations.weight.original0 for m in weight_norm_layers(target).values()]
    v_t = [m.parametrizations.weight.original1 for m in weight_norm_layers(target).values()]
    assert any(not torch.allclose(gt.flatten(), vt.flatten(1).norm(dim=1)) for gt, vt in zip(g_t, v_t))
