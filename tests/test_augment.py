"""Tests for ssl_suite.augment: BYOL's T and T' (Grill et al. 2020, App. B, Table 6)."""

from __future__ import annotations

import dataclasses
import math

import kornia
import pytest
import torch
import torch.nn.functional as F

from ssl_suite import augment as A
from ssl_suite.augment import BYOLAugment, ViewAugment, eval_transform
from ssl_suite.config import AugmentConfig, ViewConfig

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
T1 = AugmentConfig().view1
T2 = AugmentConfig().view2
OFF = ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
                 grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)


@pytest.fixture(autouse=True)
def _seed():
    """Each test starts from a fixed global RNG state (the augmentations draw from it)."""
    state = torch.get_rng_state()
    torch.manual_seed(1234)
    yield
    torch.set_rng_state(state)


def _images(b=8, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def _smooth(b=4, h=32, w=32, seed=0):
    """Smooth float images in [0, 1] (bicubic overshoot stays small)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, 4, 4, generator=g)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)


def _unnorm(v, mean=MEAN, std=STD):
    return v * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


# --------------------------------------------------------------------------------------------
# shapes, dtypes, ranges, normalisation


@pytest.mark.parametrize("in_size,out_size", [(32, 32), (40, 24), (24, 40)])
def test_byol_views_shape_dtype_range(in_size, out_size):
    aug = BYOLAugment(AugmentConfig(image_size=out_size), MEAN, STD)
    x = _images(6, in_size, in_size + 4)
    v1, v2 = aug(x)
    for v in (v1, v2):
        assert v.shape == (6, 3, out_size, out_size)
        assert v.dtype == torch.float32
        u = _unnorm(v)
        assert u.min() >= -1e-5 and u.max() <= 1 + 1e-5
    assert not torch.equal(v1, v2)
    assert x.dtype == torch.uint8  # input untouched


def test_normalisation_is_x_minus_mean_over_std():
    aug = BYOLAugment(AugmentConfig(image_size=32), MEAN, STD)
    x = _images(5)
    torch.manual_seed(3)
    v1, v2 = aug(x)
    torch.manual_seed(3)
    xf = x.float() / 255
    r1, r2 = aug.view1(xf), aug.view2(xf)
    assert r1.min() >= 0 and r1.max() <= 1 and r2.min() >= 0 and r2.max() <= 1
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(v1, (r1 - m) / s, rtol=0, atol=1e-5)
    torch.testing.assert_close(v2, (r2 - m) / s, rtol=0, atol=1e-5)


def test_cfg_mean_std_override_dataset_stats():
    cfg = AugmentConfig(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                        view1=OFF, view2=OFF)
    aug = BYOLAugment(cfg, MEAN, STD)
    x = torch.full((2, 3, 16, 16), 0.75)
    v1, v2 = aug(x)
    torch.testing.assert_close(v1, torch.full_like(v1, 1.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(v2, torch.full_like(v2, 1.0), rtol=0, atol=1e-5)


def test_uint8_and_float_inputs_agree():
    aug = ViewAugment(T2, 24)
    x = _images(4)
    p = aug.sample_params(4, 32, 32)
    torch.testing.assert_close(aug.apply(x, p), aug.apply(x.float() / 255, p), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# per-sample parameter draws


def test_parameters_are_drawn_per_sample():
    aug = ViewAugment(T2, 32)
    p = aug.sample_params(64, 32, 32)
    assert torch.unique(p["crop"], dim=0).shape[0] > 50
    for k in ("brightness", "contrast", "saturation", "hue", "blur_sigma", "crop_area"):
        assert torch.unique(p[k]).numel() > 60, k
    for k in ("flip", "jitter", "grayscale", "blur", "solarize"):
        assert p[k].shape == (64,) and p[k].dtype == torch.bool
        assert 0 < int(p[k].sum()) < 64, k  # P(all equal) is negligible for these probs
    order = p["order"]
    assert order.shape == (64, 4) and order.dtype == torch.int64
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(64, 4))
    assert torch.unique(order, dim=0).shape[0] >= 10  # not one permutation for the batch
    assert torch.unique(order[:, 0]).numel() == 4


def _se_bound(freq, p, n, k=5.0):
    se = math.sqrt(p * (1 - p) / n)
    return abs(freq - p) <= k * se + 1e-12


@pytest.mark.parametrize("name,view", [("T", T1), ("T'", T2)])
def test_probabilities_and_ranges(name, view):
    n = 20000
    aug = ViewAugment(view, 32)
    torch.manual_seed(0)
    p = aug.sample_params(n, 48, 40)
    expected = {"flip": view.flip_prob, "jitter": view.jitter_prob,
                "grayscale": view.grayscale_prob, "blur": view.blur_prob,
                "solarize": view.solarize_prob}
    assert expected["blur"] == (1.0 if name == "T" else 0.1)
    assert expected["solarize"] == (0.0 if name == "T" else 0.2)
    for k, prob in expected.items():
        freq = p[k].float().mean().item()
        assert _se_bound(freq, prob, n), (name, k, freq, prob)

    area, ratio = p["crop_area"], p["crop_ratio"]
    assert area.min() >= 0.08 and area.max() <= 1.0
    assert ratio.min() >= 3 / 4 - 1e-6 and ratio.max() <= 4 / 3 + 1e-6
    # U[0.08, 1]: mean 0.54; log-ratio uniform on [log 3/4, log 4/3]: mean 0
    assert abs(area.mean().item() - 0.54) < 5 * 0.92 / math.sqrt(12 * n)
    assert abs(ratio.log().mean().item()) < 5 * 2 * math.log(4 / 3) / math.sqrt(12 * n)
    x0, y0, w, h = p["crop"].unbind(1)
    assert torch.equal(p["crop"], p["crop"].round())
    assert (w >= 1).all() and (h >= 1).all() and (w <= 40).all() and (h <= 48).all()
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (x0 + w <= 40).all() and (y0 + h <= 48).all()
    assert (w == 40).any() and (h == 48).any()  # clipped, not retried
    # every offset is reachable: the corner offsets both occur for small boxes
    # w, h are the rounded sqrt(A r), sqrt(A / r) of A = area * H * W, clipped to the image
    tw = torch.sqrt(area * 48 * 40 * ratio)
    th = torch.sqrt(area * 48 * 40 / ratio)
    assert ((w - tw.clamp(max=40)).abs() <= 0.5 + 1e-4).all()
    assert ((h - th.clamp(max=48)).abs() <= 0.5 + 1e-4).all()
    small = w < 20
    assert (x0[small] == 0).any() and ((x0 + w)[small] == 40).any()
    assert (y0[h < 24] == 0).any() and ((y0 + h)[h < 24] == 48).any()

    b, c, s, hue = p["brightness"], p["contrast"], p["saturation"], p["hue"]
    assert b.min() >= -0.4 and b.max() <= 0.4 and b.min() < -0.39 and b.max() > 0.39
    assert c.min() >= 0.6 and c.max() <= 1.4
    assert s.min() >= 0.8 and s.max() <= 1.2
    assert hue.min() >= -0.1 and hue.max() <= 0.1
    sig = p["blur_sigma"]
    assert sig.min() >= 0.1 and sig.max() <= 2.0
    # each op comes first in about a quarter of the images
    first = torch.bincount(p["order"][:, 0], minlength=4).float() / n
    assert ((first - 0.25).abs() <= 5 * math.sqrt(0.25 * 0.75 / n)).all()


def test_probability_one_and_zero_draw_no_mask():
    """p = 1 and p = 0 consume the same randomness (no Bernoulli draw in either case)."""
    states = []
    for prob in (0.0, 1.0):
        aug = ViewAugment(dataclasses.replace(T1, flip_prob=prob), 32)
        torch.manual_seed(0)
        p = aug.sample_params(16, 32, 32)
        assert bool(p["flip"].all()) == (prob == 1.0) and bool(p["flip"].any()) == (prob == 1.0)
        states.append(torch.get_rng_state())
    assert torch.equal(states[0], states[1])
    aug = ViewAugment(dataclasses.replace(T1, flip_prob=0.5), 32)
    torch.manual_seed(0)
    aug.sample_params(16, 32, 32)
    assert not torch.equal(torch.get_rng_state(), states[0])


def test_blur_kernel_size_rule():
    assert ViewAugment(T1, 224).blur_kernel_size == 23
    assert ViewAugment(T1, 96).blur_kernel_size == 9
    assert ViewAugment(T1, 64).blur_kernel_size == 7
    assert ViewAugment(T1, 32).blur_kernel_size == 3
    assert ViewAugment(T1, 8).blur_kernel_size == 1  # no blur possible: skipped


# --------------------------------------------------------------------------------------------
# single ops against hand-computed values


def test_solarize_values():
    x = torch.tensor([0.0, 0.1, 0.49, 0.5, 0.9, 1.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = A.solarize(x, 0.5)
    exp = torch.tensor([0.0, 0.1, 0.49, 0.5, 0.1, 0.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    torch.testing.assert_close(out, exp, rtol=0, atol=1e-7)
    y = torch.tensor([0.39, 0.4, 0.41]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    torch.testing.assert_close(A.solarize(y, 0.4)[0, 0, 0], torch.tensor([0.39, 0.6, 0.59]),
                               rtol=0, atol=1e-6)


def test_grayscale_weights():
    x = torch.eye(3).view(3, 3, 1, 1)  # pure red, green, blue images
    out = A.to_grayscale(x)
    exp = torch.tensor([0.2989, 0.5870, 0.1140]).view(3, 1, 1, 1).expand(3, 3, 1, 1)
    torch.testing.assert_close(out, exp, rtol=0, atol=1e-7)
    y = torch.tensor([0.2, 0.6, 1.0]).view(1, 3, 1, 1)
    assert A.to_grayscale(y)[0, :, 0, 0].tolist() == pytest.approx(
        [0.2989 * 0.2 + 0.587 * 0.6 + 0.114] * 3, abs=1e-6)


def test_brightness_is_additive_and_clipped():
    x = torch.tensor([0.0, 0.3, 0.9]).view(1, 1, 1, 3).expand(2, 3, 1, 3)
    out = A.adjust_brightness(x, torch.tensor([0.2, -0.35]))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.2, 0.5, 1.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1, 2, 0], torch.tensor([0.0, 0.0, 0.55]), rtol=0, atol=1e-6)


def test_contrast_around_each_channels_mean():
    x = torch.tensor([[[0.2, 0.4]], [[0.5, 0.7]], [[0.0, 1.0]]]).unsqueeze(0)  # (1,3,1,2)
    out = A.adjust_contrast(x, torch.tensor([2.0]))
    exp = torch.tensor([[[0.1, 0.5]], [[0.4, 0.8]], [[0.0, 1.0]]]).unsqueeze(0)
    torch.testing.assert_close(out, exp, rtol=0, atol=1e-6)
    out = A.adjust_contrast(x, torch.tensor([0.5]))
    exp = torch.tensor([[[0.25, 0.35]], [[0.55, 0.65]], [[0.25, 0.75]]]).unsqueeze(0)
    torch.testing.assert_close(out, exp, rtol=0, atol=1e-6)


def _hsv_ref_saturation(x, f):
    hsv = kornia.color.rgb_to_hsv(x)
    s = (hsv[:, 1:2] * f.view(-1, 1, 1, 1)).clamp(0, 1)
    return kornia.color.hsv_to_rgb(torch.cat([hsv[:, :1], s, hsv[:, 2:]], 1))


def _hsv_ref_hue(x, d):
    hsv = kornia.color.rgb_to_hsv(x)
    h = torch.remainder(hsv[:, :1] + 2 * math.pi * d.view(-1, 1, 1, 1), 2 * math.pi)
    return kornia.color.hsv_to_rgb(torch.cat([h, hsv[:, 1:]], 1))


def _colour_probe(n=6):
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x[0, :, :2] = 0.4  # gray pixels
    x[1, 0] = x[1, 1]  # ties in the max channel
    x[2, :, 0, 0] = 0.0
    x[2, :, 0, 1] = 1.0
    return x


def test_saturation_matches_hsv_reference():
    x = _colour_probe()
    f = torch.tensor([0.0, 0.8, 1.2, 3.0, 1.0, 0.5])
    torch.testing.assert_close(A.adjust_saturation(x, f), _hsv_ref_saturation(x, f),
                               rtol=0, atol=2e-6)
    # factor 0 gives the HSV value (max channel) everywhere
    torch.testing.assert_close(A.adjust_saturation(x, torch.zeros(6)),
                               x.amax(1, keepdim=True).expand_as(x), rtol=0, atol=1e-7)


def test_hue_matches_hsv_reference():
    x = _colour_probe()
    d = torch.tensor([0.0, 0.1, -0.1, 0.5, -0.37, 0.05])
    torch.testing.assert_close(A.adjust_hue(x, d), _hsv_ref_hue(x, d), rtol=0, atol=3e-6)
    torch.testing.assert_close(A.adjust_hue(x, torch.zeros(6)), x, rtol=0, atol=1e-6)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(A.adjust_hue(red, torch.tensor([1 / 3])),
                               torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["shift", "conv"])
def test_blur_matches_kornia_with_zero_padding(impl):
    x = torch.rand(5, 3, 12, 10, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    out = A.gaussian_blur(x, sigma, 2, impl=impl)
    ref = kornia.filters.gaussian_blur2d(x, (5, 5), torch.stack([sigma, sigma], 1),
                                         border_type="constant")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # hand check: 3-tap kernel, sigma 1: weights e^-0.5, 1, e^-0.5 normalised; zero padding
    k = torch.tensor([math.exp(-0.5), 1.0, math.exp(-0.5)])
    k = k / k.sum()
    one = torch.zeros(1, 3, 3, 3)
    one[:, :, 1, 1] = 1.0
    out = A.gaussian_blur(one, torch.tensor([1.0]), 1, impl=impl)
    torch.testing.assert_close(out[0, 0], torch.outer(k, k), rtol=0, atol=1e-7)
    flat = A.gaussian_blur(torch.ones(1, 3, 3, 3), torch.tensor([1.0]), 1, impl=impl)
    assert flat[0, 0, 0, 0].item() == pytest.approx(float((k[1] + k[2]) ** 2), abs=1e-6)


def test_crop_full_box_same_size_is_identity_and_flip_is_mirror():
    x = _smooth(3, 20, 20)
    box = torch.tensor([[0.0, 0.0, 20.0, 20.0]]).expand(3, 4)
    for mode in ("bicubic", "bilinear"):
        out = A.crop_resize_flip(x, box, None, 20, mode)
        torch.testing.assert_close(out, x, rtol=0, atol=1e-6)
        flipped = A.crop_resize_flip(x, box, torch.ones(3, dtype=torch.bool), 20, mode)
        torch.testing.assert_close(flipped, x.flip(-1), rtol=0, atol=1e-6)
    # arbitrary boxes: a flipped sample is the exact mirror of its unflipped self
    boxes = torch.tensor([[3.0, 1.0, 11.0, 17.0], [0.0, 5.0, 20.0, 7.0], [7.0, 7.0, 2.0, 3.0]])
    a = A.crop_resize_flip(x, boxes, torch.zeros(3, dtype=torch.bool), 16)
    b = A.crop_resize_flip(x, boxes, torch.tensor([True, False, True]), 16)
    assert torch.equal(b[0], a[0].flip(-1)) and torch.equal(b[1], a[1])
    assert torch.equal(b[2], a[2].flip(-1))


def test_crop_reproduces_the_box_region():
    x = _smooth(2, 30, 40)
    boxes = torch.tensor([[5.0, 7.0, 16.0, 12.0], [20.0, 0.0, 20.0, 30.0]])
    # same size as the box side -> the region itself (rows of a 16x12 box resized to 16x16
    # are interpolated, so check the x direction exactly on a square box)
    sq = torch.tensor([[5.0, 7.0, 16.0, 16.0], [24.0, 14.0, 16.0, 16.0]])
    out = A.crop_resize_flip(x, sq, None, 16)
    torch.testing.assert_close(out[0], x[0, :, 7:23, 5:21], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], x[1, :, 14:30, 24:40], rtol=0, atol=1e-6)
    # rescaling: crop then resize, exactly as F.interpolate on the cropped region (taps clamped
    # to the box); with PyTorch's cubic coefficient -0.75 the numbers must agree
    for mode, a in (("bicubic", -0.75), ("bilinear", A.CUBIC_A)):
        out = A.crop_resize_flip(x, boxes, None, 24, mode, cubic_a=a)
        for i, (x0, y0, w, h) in enumerate(boxes.long().tolist()):
            region = x[i:i + 1, :, y0:y0 + h, x0:x0 + w]
            ref = F.interpolate(region, size=(24, 24), mode=mode, align_corners=False)
            torch.testing.assert_close(out[i:i + 1], ref.clamp(0, 1), rtol=0, atol=2e-6)
    # Keys a = -0.5 (TF) reproduces linear ramps exactly inside the box
    ramp = torch.arange(40.0).view(1, 1, 1, 40).expand(1, 3, 30, 40) / 40
    out = A.crop_resize_flip(ramp, torch.tensor([[8.0, 0.0, 16.0, 30.0]]), None, 32)
    src = 8 + (torch.arange(32) + 0.5) * 0.5 - 0.5
    torch.testing.assert_close(out[0, 0, 5, 3:-3], src[3:-3] / 40, rtol=0, atol=1e-6)
    # ... and near the box edges the taps are clamped to the box, not read from outside it
    assert abs(out[0, 0, 5, 0].item() - src[0].item() / 40) > 1e-4


# --------------------------------------------------------------------------------------------
# the whole view against a per-sample reference


def _reference_view(aug: ViewAugment, x: torch.Tensor, p: dict) -> torch.Tensor:
    """Slow per-image reference (python loop, kornia HSV/blur, F.interpolate crop)."""
    v = aug.view
    outs = []
    ops = {0: lambda t, i: (t + p["brightness"][i]).clamp(0, 1),
           1: lambda t, i: A.adjust_contrast(t, p["contrast"][i:i + 1]),
           2: lambda t, i: _hsv_ref_saturation(t, p["saturation"][i:i + 1]).clamp(0, 1),
           3: lambda t, i: _hsv_ref_hue(t, p["hue"][i:i + 1]).clamp(0, 1)}
    for i in range(x.shape[0]):
        x0, y0, w, h = p["crop"][i].long().tolist()
        t = x[i:i + 1, :, y0:y0 + h, x0:x0 + w]
        t = A.crop_resize_flip(t, torch.tensor([[0.0, 0.0, w, h]]), None, aug.image_size,
                               aug.interpolation)
        if p["flip"][i]:
            t = t.flip(-1)
        if p["jitter"][i]:
            for op in p["order"][i].tolist():
                t = ops[op](t, i)
        if p["grayscale"][i]:
            t = A.to_grayscale(t)
        if p["blur"][i] and aug.blur_radius > 0:
            s = p["blur_sigma"][i].item()
            k = aug.blur_kernel_size
            t = kornia.filters.gaussian_blur2d(t, (k, k), (s, s), border_type="constant")
        if p["solarize"][i]:
            t = torch.where(t < v.solarize_threshold, t, 1 - t)
        outs.append(t.clamp(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("masked", ["index", "where"])
@pytest.mark.parametrize("size", [24, 40])
def test_apply_matches_per_sample_reference(masked, size, monkeypatch):
    if masked == "where":  # the accelerator path: dense ops + torch.where, conv blur
        blur = A.gaussian_blur
        monkeypatch.setattr(A, "gaussian_blur", lambda x, s, r: blur(x, s, r, impl="conv"))
    view = dataclasses.replace(T2, blur_prob=0.5, solarize_prob=0.5, grayscale_prob=0.3)
    aug = ViewAugment(view, size, masked=masked)
    x = torch.rand(24, 3, 36, 30, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(11)
    p = aug.sample_params(24, 36, 30)
    out = aug.apply(x, p)
    ref = _reference_view(aug, x, p)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    assert out.min() >= 0 and out.max() <= 1


def test_jitter_order_changes_result_per_sample():
    aug = ViewAugment(dataclasses.replace(OFF, jitter_prob=0.5), 8)
    x = _colour_probe()[3:4]
    p = aug.sample_params(2, 8, 8)
    p.update(jitter=torch.tensor([True, True]), brightness=torch.tensor([0.3, 0.3]),
             contrast=torch.tensor([1.0, 1.0]), saturation=torch.tensor([1.0, 1.0]),
             hue=torch.tensor([0.0, 0.0]))
    same = torch.cat([x, x])
    p["saturation"] = torch.tensor([0.5, 0.5])
    p["order"] = torch.tensor([[0, 2, 1, 3], [2, 0, 1, 3]])
    out = aug.apply(same, p)
    bs = A.adjust_saturation(A.adjust_brightness(x, torch.tensor([0.3])), torch.tensor([0.5]))
    sb = A.adjust_brightness(A.adjust_saturation(x, torch.tensor([0.5])), torch.tensor([0.3]))
    torch.testing.assert_close(out[:1], bs, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1:], sb, rtol=0, atol=1e-6)
    assert (bs - sb).abs().max() > 0.01


# --------------------------------------------------------------------------------------------
# determinism and probability 0


def test_apply_is_deterministic_and_rng_state_reproduces_forward():
    aug = BYOLAugment(AugmentConfig(image_size=24), MEAN, STD)
    x = _images(16)
    p = aug.view2.sample_params(16, 32, 32)
    assert torch.equal(aug.view2.apply(x, p), aug.view2.apply(x, p))
    state = torch.get_rng_state()
    a1, a2 = aug(x)
    b1, b2 = aug(x)
    torch.set_rng_state(state)
    c1, c2 = aug(x)
    assert torch.equal(a1, c1) and torch.equal(a2, c2)
    assert not torch.equal(a1, b1)


def test_probability_zero_view_is_identity():
    x = _smooth(4, 32, 32)
    aug = ViewAugment(OFF, 32)
    out = aug(x)
    torch.testing.assert_close(out, x.clamp(0, 1), rtol=0, atol=1e-6)
    # and different output size: a plain resize of the whole image
    out = ViewAugment(OFF, 16, interpolation="bilinear")(x)
    ref = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_probability_zero_ops_do_no_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("op with probability 0 was computed")

    for name in ("adjust_saturation", "adjust_hue", "to_grayscale", "gaussian_blur", "solarize"):
        monkeypatch.setattr(A, name, boom)
    monkeypatch.setattr(ViewAugment, "_jitter", boom)
    aug = ViewAugment(dataclasses.replace(T1, jitter_prob=0.0, grayscale_prob=0.0,
                                          blur_prob=0.0, solarize_prob=0.0), 16)
    out = aug(_images(4))
    assert out.shape == (4, 3, 16, 16)


def test_masked_index_and_where_paths_agree():
    x = _images(32)
    a = ViewAugment(T2, 32, masked="index")
    b = ViewAugment(T2, 32, masked="where")
    p = a.sample_params(32, 32, 32)
    torch.testing.assert_close(a.apply(x, p), b.apply(x, p), rtol=0, atol=1e-6)


def test_cpu_thread_cap_is_restored_and_does_not_change_results():
    before = torch.get_num_threads()
    x = _images(16)
    a = ViewAugment(T2, 32, cpu_threads=1)
    b = ViewAugment(T2, 32, cpu_threads=None)
    p = a.sample_params(16, 32, 32)
    seen = []
    orig = A.adjust_hue

    def spy(*args):
        seen.append(torch.get_num_threads())
        return orig(*args)

    A.adjust_hue = spy
    try:
        out_a = a.apply(x, p)
    finally:
        A.adjust_hue = orig
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
    torch.testing.assert_close(out_a, b.apply(x, p), rtol=0, atol=1e-6)
    BYOLAugment(AugmentConfig(image_size=16), MEAN, STD)(x)
    assert torch.get_num_threads() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = _images(32)
    aug = ViewAugment(dataclasses.replace(T2, blur_prob=0.5), 32)
    p = aug.sample_params(32, 32, 32)
    ref = aug.apply(x, p)
    out = aug.apply(x.cuda(), {k: t.cuda() for k, t in p.items()})
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-4)
    v1, v2 = BYOLAugment(AugmentConfig(image_size=32), MEAN, STD)(x.cuda())
    assert v1.is_cuda and v1.shape == (32, 3, 32, 32)


# --------------------------------------------------------------------------------------------
# evaluation transform


def test_eval_transform_normalises_and_resizes():
    x = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    out = eval_transform(x, 16, MEAN, STD)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    exp = (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out[:, :, 3, 5], exp.expand(2, 3), rtol=0, atol=1e-5)
    y = _smooth(2, 32, 32)
    same = eval_transform(y, 32, MEAN, STD)
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(same, (y - m) / s, rtol=0, atol=1e-6)
    assert not torch.equal(same, y)  # input not normalised in place
    up = eval_transform(y, 48, MEAN, STD)
    ref = F.interpolate(y, size=(48, 48), mode="bicubic", align_corners=False,
                        antialias=True).clamp(0, 1)
    torch.testing.assert_close(up, (ref - m) / s, rtol=0, atol=1e-5)
