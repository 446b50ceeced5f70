"""BYOL's two view distributions T and T', run batched on the device of the images.

Reference: Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised
Learning", App. B, Table 6, and the official code (``byol/utils/augmentations.py``,
``byol/utils/dataset.py``). Per image, in this order::

    random resized crop -> horizontal flip -> colour jitter (4 ops, random order per image,
    applied as a whole with prob. jitter_prob) -> grayscale -> Gaussian blur -> solarise
    -> clip to [0, 1]                      (then (x - mean) / std in :class:`BYOLAugment`)

=====================  ==========  ==========
parameter              T (view1)   T' (view2)
=====================  ==========  ==========
crop / flip            1.0 / 0.5   1.0 / 0.5
colour jitter          0.8         0.8
b / c / s / h          .4/.4/.2/.1 .4/.4/.2/.1
grayscale              0.2         0.2
Gaussian blur          1.0         0.1
solarise               0.0         0.2
=====================  ==========  ==========

Every random parameter is drawn **per sample** from torch's global RNG on the images' device
(one ``torch.rand`` call per view and batch), so restoring ``torch.get_rng_state()`` (or the
CUDA state) reproduces the views bit for bit. :meth:`ViewAugment.sample_params` returns the
draws and :meth:`ViewAugment.apply` is a pure function of image and parameters.

Where this deviates from kornia's built-in augmentations, and why:

* **Colour jitter** is our own batched code, not ``kornia.augmentation.ColorJiggle`` /
  ``ColorJitter``: kornia 0.9 draws one permutation of the four ops for the whole batch
  (``order`` has shape (4,)), the reference draws it per image; kornia's contrast is a plain
  multiplication (ColorJiggle) or a blend with the grayscale mean (ColorJitter), the
  reference (TF semantics) scales each channel around *that channel's* spatial mean;
  brightness is the reference's additive delta. The per-image op order is applied stage by
  stage; saturation and hue inside it are kornia's functional ``kornia.enhance.adjust_saturation``
  / ``adjust_hue`` (per-sample factors, the same HSV semantics as TF), grayscale is
  ``kornia.color.rgb_to_grayscale`` with the reference's luma weights.
* **Crop and flip** are our own: kornia's ``RandomResizedCrop`` samples torchvision-style
  (10 candidate boxes per image, the first that fits wins, else the whole image); the
  reference makes exactly one attempt, with integer w/h rounded and clipped to the image,
  which puts extra mass on full-width/full-height boxes. The crop+resize+flip of the whole batch is
  two batched matmuls with per-sample separable interpolation matrices (half-pixel centres,
  no antialiasing, taps clamped to the box, i.e. crop-then-resize as the reference; the flip
  reverses the rows of the x matrix). Bicubic uses Keys' a = -0.5 like TF's resize
  (``CUBIC_A``; PyTorch/kornia bicubic uses -0.75). On CUDA with TF32 matmuls enabled
  (``torch.backends.cuda.matmul.allow_tf32``) the resize runs in TF32 (~1e-3 relative
  error, below uint8 quantisation).
* **Blur** is our own separable depthwise convolution with zero padding ('SAME', as the
  reference), kernel side ``2 * int(blur_kernel_frac * image_size / 2) + 1`` (224 -> 23,
  96 -> 9, 32 -> 3) and sigma ~ U[blur_sigma] per sample. It equals
  ``kornia.filters.gaussian_blur2d(x, k, sigma_(B,2), border_type="constant")`` (tested), but
  kornia's positivity check on a device sigma reads it back to the host (a sync on CUDA).

Ops with probability 0 are skipped (no draw, no compute); ops with probability 1 draw no mask
and run on the whole batch. Ops with probability in (0, 1) run on the selected samples only
(``index_select``/``index_copy_``) on CPU, and on the whole batch followed by ``torch.where``
on other devices, which avoids the host-device sync of ``nonzero``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional, Sequence

import kornia
import torch
import torch.nn.functional as F

from ssl_suite.config import AugmentConfig, ViewConfig

__all__ = ["ViewAugment", "BYOLAugment", "eval_transform", "to_unit_float", "cpu_threads",
           "GRAY_WEIGHTS", "CUBIC_A"]

#: Luma weights of the reference ``_to_grayscale`` (ITU-R 601, as tf.image.rgb_to_grayscale).
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)

# Indices of the colour ops in ``params["order"]``.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]; a floating tensor is returned as float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.is_floating_point():
        return images.to(torch.float32)
    raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")


@contextlib.contextmanager
def cpu_threads(x: torch.Tensor, limit: Optional[int]) -> Iterator[None]:
    """Cap torch's intra-op threads at ``limit`` while processing the CPU tensor ``x``.

    The augmentation is ~100 small elementwise ops per view; on a small CPU each parallel
    region costs a thread hand-off, and when the cores are shared with other processes every
    one of them waits for a descheduled thread (measured on 2 shared cores: 1.4 s instead of
    10 ms per batch of 64 at 32 px). One thread is as fast on a quiet machine at 32 px. No-op
    for ``limit=None``, for non-CPU tensors and when the current setting is already lower.
    """
    n = torch.get_num_threads()
    if limit is None or x.device.type != "cpu" or n <= limit:
        yield
        return
    torch.set_num_threads(limit)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# Single ops (batched, per-sample parameters of shape (n,)). Inputs are float in [0, 1].


def adjust_brightness(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """TF ``adjust_brightness``: ``clip(x + delta)``, delta per sample."""
    return (x + delta.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """TF ``adjust_contrast``: ``clip((x - mean_c) * f + mean_c)``, mean per sample and channel."""
    f = factor.view(-1, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return torch.addcmul(mean * (1.0 - f), x, f).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """HSV ``s <- clip(s * f, 0, 1)`` with h and v kept (TF ``adjust_saturation``), f per sample.

    ``kornia.enhance.adjust_saturation`` has exactly these semantics and takes a factor per sample.
    """
    return kornia.enhance.adjust_saturation(x, factor)


def adjust_hue(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """HSV hue rotation by ``delta`` turns per sample (TF ``adjust_hue``), RGB -> HSV -> RGB.

    ``kornia.enhance.adjust_hue`` rotates by an angle in radians, so ``delta`` is scaled by 2 pi.
    """
    return kornia.enhance.adjust_hue(x, delta * (2.0 * math.pi))


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma 0.2989 R + 0.5870 G + 0.1140 B (the reference's weights), replicated to 3 channels."""
    weights = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype)
    return kornia.color.rgb_to_grayscale(x, rgb_weights=weights).expand_as(x)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x if x < threshold else 1 - x``."""
    return torch.where(x < threshold, x, 1.0 - x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int,
                  impl: str = "auto") -> torch.Tensor:
    """Separable Gaussian blur, kernel side 2*radius+1, per-sample sigma, zero ('SAME') padding.

    ``impl="shift"`` sums 2*radius+1 shifted copies per direction (fast on CPU, where oneDNN
    re-plans a grouped convolution for every new subset size); ``impl="conv"`` runs two
    depthwise ``conv2d`` calls with one kernel per sample and channel (used on accelerators);
    ``"auto"`` picks shift on CPU. Both give the same result up to float rounding.
    """
    if radius <= 0:
        return x
    n, c, h, w = x.shape
    size = 2 * radius + 1
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t * t) / (2.0 * sigma.to(x.dtype).view(-1, 1) ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # (n, K)
    if impl == "auto":
        impl = "shift" if x.device.type == "cpu" else "conv"
    if impl == "shift":
        kk = k.view(n, 1, 1, 1, size)
        xp = F.pad(x, (radius, radius))
        y = xp[..., 0:w] * kk[..., 0]
        for j in range(1, size):
            y.addcmul_(xp[..., j:j + w], kk[..., j])
        yp = F.pad(y, (0, 0, radius, radius))
        z = yp[..., 0:h, :] * kk[..., 0]
        for j in range(1, size):
            z.addcmul_(yp[..., j:j + h, :], kk[..., j])
        return z
    k = k.repeat_interleave(c, dim=0)  # (n*c, K)
    y = F.conv2d(x.reshape(1, n * c, h, w), k.view(n * c, 1, 1, size),
                 padding=(0, radius), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, size, 1), padding=(radius, 0), groups=n * c)
    return y.view(n, c, h, w)


#: Keys' cubic-convolution coefficient of TF's ``tf.image.resize(method="bicubic")``, which the
#: reference uses; PyTorch's ``interpolate``/``grid_sample`` bicubic uses -0.75.
CUBIC_A = -0.5


def _resize_matrix(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int,
                   mode: str, cubic_a: float) -> torch.Tensor:
    """(n, out_size, in_size) interpolation matrices resampling ``[start, start + length)``.

    Half-pixel centres (source coordinate ``(i + 0.5) * length / out_size - 0.5`` in the box),
    no antialiasing, taps clamped to the box: exactly "crop, then resize the crop" as the
    reference (``decode_and_crop_jpeg`` then ``tf.image.resize``) and ``F.interpolate`` do.
    """
    dev = start.device
    i = torch.arange(out_size, device=dev, dtype=torch.float32)
    local = (i + 0.5) * (length / out_size).view(-1, 1) - 0.5  # (n, S)
    fl = local.floor()
    frac = (local - fl).unsqueeze(-1)
    if mode == "bicubic":
        t = torch.arange(-1, 3, device=dev, dtype=torch.float32)
        s = (frac - t).abs()
        s2, s3 = s * s, s * s * s
        a = cubic_a
        w = torch.where(s <= 1.0, (a + 2.0) * s3 - (a + 3.0) * s2 + 1.0,
                        torch.where(s < 2.0, a * s3 - 5.0 * a * s2 + 8.0 * a * s - 4.0 * a,
                                    torch.zeros_like(s)))
    elif mode == "bilinear":
        t = torch.arange(0, 2, device=dev, dtype=torch.float32)
        w = (1.0 - (frac - t).abs()).clamp_min(0.0)
    else:
        raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {mode!r}")
    idx = torch.minimum((fl.unsqueeze(-1) + t).clamp_min(0.0), (length - 1.0).view(-1, 1, 1))
    idx = (idx + start.view(-1, 1, 1)).long()  # (n, S, taps), inside the box
    mat = torch.zeros(start.shape[0], out_size, in_size, device=dev, dtype=torch.float32)
    # one tap at a time: clamped taps of a row may share a column, and adding them in a fixed
    # order keeps the result bitwise deterministic on CUDA too (no colliding atomics)
    for j in range(idx.shape[-1]):
        mat.scatter_add_(2, idx[..., j:j + 1], w[..., j:j + 1])
    return mat


def crop_resize_flip(x: torch.Tensor, boxes: torch.Tensor, flip: Optional[torch.Tensor],
                     size: int, mode: str = "bicubic", cubic_a: float = CUBIC_A) -> torch.Tensor:
    """Crop the per-sample box ``[x0, y0, w, h]`` (integer pixels) of x and resize it to
    ``size`` x ``size``; where ``flip`` is True the result is mirrored left-right.

    Separable: ``R_y @ x @ R_x^T`` with per-sample interpolation matrices (two batched
    matmuls; faster than ``grid_sample`` on CPU and exact crop-then-resize semantics, since
    ``grid_sample`` would read pixels outside the box near its edges). A flipped sample uses
    the row-reversed ``R_x``, so it is the exact mirror of its unflipped self. Clamped to [0, 1].
    """
    n, _, hgt, wid = x.shape
    boxes = boxes.to(device=x.device, dtype=torch.float32)
    x0, y0, bw, bh = boxes.unbind(dim=1)
    rx = _resize_matrix(x0, bw, wid, size, mode, cubic_a)
    ry = _resize_matrix(y0, bh, hgt, size, mode, cubic_a)
    if flip is not None:
        rx = torch.where(flip.to(x.device).view(-1, 1, 1), rx.flip(1), rx)
    y = torch.matmul(x, rx.transpose(1, 2).unsqueeze(1).to(x.dtype))  # (n, c, H, S)
    out = torch.matmul(ry.unsqueeze(1).to(x.dtype), y)  # (n, c, S, S)
    return out.clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------


class ViewAugment(torch.nn.Module):
    """One BYOL view distribution, T or T' (Grill et al. 2020, App. B, Table 6).

    ``view`` holds the probabilities and ranges, ``image_size`` the output side. Call
    ``forward(x)`` for a fresh draw, or ``apply(x, sample_params(...))`` to separate the
    random draw from the (deterministic) image processing. See the module docstring for the
    exact semantics and the deviations from kornia's augmentation classes.

    ``masked`` chooses how ops with a probability strictly between 0 and 1 are restricted to
    their samples: ``"index"`` (compute on the selected rows only; needs ``nonzero``, i.e. a
    host sync on CUDA), ``"where"`` (compute on all rows, select with ``torch.where``; no
    sync), or ``"auto"`` (index on CPU, where elsewhere). Results are the same either way.
    ``cpu_threads`` caps torch's intra-op threads during :meth:`apply` on CPU tensors (see
    :func:`cpu_threads`; ``None`` keeps torch's setting). With the default 1 the result does
    not depend on the machine's thread count either.
    """

    def __init__(self, view: ViewConfig, image_size: int, interpolation: str = "bicubic",
                 masked: str = "auto", cpu_threads: Optional[int] = 1):
        super().__init__()
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
        if masked not in ("auto", "index", "where"):
            raise ValueError(f"masked must be 'auto', 'index' or 'where', got {masked!r}")
        self.view = view
        self.image_size = int(image_size)
        self.interpolation = interpolation
        self.masked = masked
        self.cpu_threads = cpu_threads
        # reference: kernel_size = image_size / 10, radius = int(kernel_size / 2), side 2r + 1
        self.blur_radius = int(view.blur_kernel_frac * self.image_size / 2.0 + 1e-6)

    @property
    def blur_kernel_size(self) -> int:
        return 2 * self.blur_radius + 1

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, interpolation={self.interpolation}, view={self.view}"

    # -- parameters ---------------------------------------------------------------------------

    def _jitter_ops(self) -> list[int]:
        v = self.view
        strengths = (v.brightness, v.contrast, v.saturation, v.hue)
        return [i for i, s in enumerate(strengths) if s > 0]

    def sample_params(self, batch: int, height: int, width: int,
                      device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Draw per-sample parameters for ``batch`` images of ``height`` x ``width``.

        All draws come from one ``torch.rand(batch, k, device=device)`` call. Returns:

        * ``crop`` (B, 4) float32 ``[x0, y0, w, h]`` in input pixels (integers, as the
          reference's ``_decode_and_random_crop``), plus the raw draws ``crop_area`` (area
          fraction ~ U[crop_scale]) and ``crop_ratio`` (w/h, log-uniform in crop_ratio)
          before rounding and clipping;
        * ``flip``, ``jitter``, ``grayscale``, ``blur``, ``solarize``: bool (B,) masks;
        * ``brightness`` (additive delta), ``contrast``, ``saturation`` (factors), ``hue``
          (delta in turns): (B,) float32 (neutral values where the op is switched off);
        * ``order`` (B, 4) int64: ``order[i, k]`` is the colour op (0 brightness, 1 contrast,
          2 saturation, 3 hue) applied at stage k to image i, a permutation per image;
        * ``blur_sigma`` (B,) float32.

        Masks of ops with probability exactly 0 or 1 are constant (no draw) and
        :meth:`apply` takes the matching fast path without reading them.
        """
        v = self.view
        dev = torch.device(device) if device is not None else torch.device("cpu")
        B = int(batch)
        ops = self._jitter_ops()
        jitter_on = v.jitter_prob > 0 and len(ops) > 0
        probs = {"flip": v.flip_prob, "jitter": v.jitter_prob if jitter_on else 0.0,
                 "grayscale": v.grayscale_prob,
                 "blur": v.blur_prob if self.blur_radius > 0 else 0.0,
                 "solarize": v.solarize_prob}
        blur_on = probs["blur"] > 0
        masks = [k for k, p in probs.items() if 0.0 < p < 1.0]
        ncols = 4 + len(masks) + (4 + 4 if jitter_on else 0) + (1 if blur_on else 0)
        u = torch.rand(B, ncols, device=dev)
        cols = iter(u.unbind(dim=1))
        out: dict[str, torch.Tensor] = {}

        # crop: area fraction U[scale], ratio log-uniform, round, clip to the image, one try
        lo_s, hi_s = v.crop_scale
        lo_r, hi_r = math.log(v.crop_ratio[0]), math.log(v.crop_ratio[1])
        area_frac = lo_s + (hi_s - lo_s) * next(cols)
        ratio = torch.exp(lo_r + (hi_r - lo_r) * next(cols))
        area = area_frac * float(height * width)
        w = torch.round(torch.sqrt(area * ratio)).clamp_(1, width)
        h = torch.round(torch.sqrt(area / ratio)).clamp_(1, height)
        x0 = torch.floor(next(cols) * (width - w + 1)).clamp_(max=width - w)
        y0 = torch.floor(next(cols) * (height - h + 1)).clamp_(max=height - h)
        out["crop"] = torch.stack((x0, y0, w, h), dim=1)
        out["crop_area"] = area_frac
        out["crop_ratio"] = ratio

        for key in probs:
            p = probs[key]
            if p <= 0.0:
                out[key] = torch.zeros(B, dtype=torch.bool, device=dev)
            elif p >= 1.0:
                out[key] = torch.ones(B, dtype=torch.bool, device=dev)
            else:
                out[key] = next(cols) < p  # consumes columns in the order of `masks`

        if jitter_on:
            b, c, s, hh = (next(cols) for _ in range(4))
            out["brightness"] = (2.0 * b - 1.0) * v.brightness
            out["contrast"] = 1.0 + (2.0 * c - 1.0) * v.contrast
            out["saturation"] = 1.0 + (2.0 * s - 1.0) * v.saturation
            out["hue"] = (2.0 * hh - 1.0) * v.hue
            keys = torch.stack([next(cols) for _ in range(4)], dim=1)
            out["order"] = keys.argsort(dim=1)
        else:
            out["brightness"] = torch.zeros(B, device=dev)
            out["contrast"] = torch.ones(B, device=dev)
            out["saturation"] = torch.ones(B, device=dev)
            out["hue"] = torch.zeros(B, device=dev)
            out["order"] = torch.arange(4, device=dev).expand(B, 4).clone()
        if blur_on:
            lo, hi = v.blur_sigma
            out["blur_sigma"] = lo + (hi - lo) * next(cols)
        else:
            out["blur_sigma"] = torch.full((B,), float(v.blur_sigma[0]), device=dev)
        return out

    # -- processing ---------------------------------------------------------------------------

    def _use_index(self, x: torch.Tensor) -> bool:
        if self.masked == "auto":
            return x.device.type == "cpu"
        return self.masked == "index"

    def _masked(self, x: torch.Tensor, mask: torch.Tensor, prob: float,
                fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        """Apply ``fn(x, *args)`` to the samples where ``mask`` holds (x is owned: may be written)."""
        if prob <= 0.0:
            return x
        if prob >= 1.0:
            return fn(x, *args)
        return self._select(x, mask, fn, *args)

    def _select(self, x: torch.Tensor, mask: torch.Tensor,
                fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        if self._use_index(x):
            idx = mask.nonzero().squeeze(1)
            if idx.numel() == 0:
                return x
            if idx.numel() == x.shape[0]:
                return fn(x, *args)
            y = fn(x.index_select(0, idx), *(a.index_select(0, idx) for a in args))
            return x.index_copy_(0, idx, y)
        return torch.where(mask.view(-1, 1, 1, 1), fn(x, *args), x)

    def _jitter(self, x: torch.Tensor, bright: torch.Tensor, contrast: torch.Tensor,
                sat: torch.Tensor, hue: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Four stages; at stage k each image applies the op ``order[:, k]`` names."""
        v = self.view
        for k in range(4):
            op = order[:, k]
            if v.brightness > 0 or v.contrast > 0:
                # brightness and contrast are both per-channel affine maps a*x + c: one pass,
                # exact identity (a=1, c=0) for the images doing another op at this stage
                is_b, is_c = op == BRIGHTNESS, op == CONTRAST
                a = torch.where(is_c, contrast, torch.ones_like(contrast)).view(-1, 1, 1, 1)
                off = torch.where(is_b, bright, torch.zeros_like(bright)).view(-1, 1, 1, 1)
                if v.contrast > 0:
                    mean = x.mean(dim=(2, 3), keepdim=True)
                    off = torch.where(is_c.view(-1, 1, 1, 1), mean * (1.0 - a), off)
                x = torch.addcmul(off, x, a).clamp_(0.0, 1.0)
            if v.saturation > 0:
                x = self._select(x, op == SATURATION, adjust_saturation, sat)
            if v.hue > 0:
                x = self._select(x, op == HUE, adjust_hue, hue)
        return x

    @torch.no_grad()
    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] (or uint8) -> (B, 3, S, S) float32 in [0, 1].

        Deterministic given ``params`` (from :meth:`sample_params` for this H, W); the input
        is not modified.
        """
        with cpu_threads(x, self.cpu_threads):
            return self._apply_params(to_unit_float(x), params)

    def _apply_params(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        v = self.view
        flip = params["flip"] if v.flip_prob > 0 else None
        if v.flip_prob >= 1.0:
            flip = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        out = crop_resize_flip(x, params["crop"], flip, self.image_size, self.interpolation)

        if v.jitter_prob > 0 and self._jitter_ops():
            out = self._masked(out, params["jitter"], v.jitter_prob, self._jitter,
                               params["brightness"], params["contrast"], params["saturation"],
                               params["hue"], params["order"])
        if v.grayscale_prob > 0:
            out = self._masked(out, params["grayscale"], v.grayscale_prob,
                               lambda t: to_grayscale(t).contiguous())
        if v.blur_prob > 0 and self.blur_radius > 0:
            r = self.blur_radius
            out = self._masked(out, params["blur"], v.blur_prob,
                               lambda t, s: gaussian_blur(t, s, r), params["blur_sigma"])
        if v.solarize_prob > 0:
            th = v.solarize_threshold
            out = self._masked(out, params["solarize"], v.solarize_prob,
                               lambda t: solarize(t, th))
        return out.clamp_(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return self.apply(x, self.sample_params(b, h, w, x.device))


class BYOLAugment(torch.nn.Module):
    """Both BYOL views, T (``cfg.view1``) and T' (``cfg.view2``), normalised.

    ``mean``/``std`` are the dataset's; ``cfg.mean``/``cfg.std`` win when set. Normalisation
    comes after augmentation, as in the reference (Grill et al. 2020, App. B).
    ``cpu_threads``: see :class:`ViewAugment`.
    """

    def __init__(self, cfg: AugmentConfig, mean: Sequence[float], std: Sequence[float],
                 cpu_threads: Optional[int] = 1):
        super().__init__()
        self.cfg = cfg
        self.cpu_threads = cpu_threads
        self.view1 = ViewAugment(cfg.view1, cfg.image_size, cfg.interpolation,
                                 cpu_threads=cpu_threads)
        self.view2 = ViewAugment(cfg.view2, cfg.image_size, cfg.interpolation,
                                 cpu_threads=cpu_threads)
        m = cfg.mean if cfg.mean is not None else mean
        s = cfg.std if cfg.std is not None else std
        self.register_buffer("mean", torch.tensor(tuple(m), dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(tuple(s), dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` (in place on x)."""
        if self.mean.device != x.device:  # follow the images once, not on every call
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return x.sub_(self.mean).div_(self.std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) or float in [0, 1] -> (view1, view2), float32 (B, 3, S, S), normalised."""
        with cpu_threads(images, self.cpu_threads):
            x = to_unit_float(images)
            return self.normalize(self.view1(x)), self.normalize(self.view2(x))


@torch.no_grad()
def eval_transform(images: torch.Tensor, image_size: int, mean: Sequence[float],
                   std: Sequence[float]) -> torch.Tensor:
    """uint8 or [0, 1] float batch -> float32, resized to ``image_size`` (bicubic, antialiased,
    clamped to [0, 1]) if its sides differ, then ``(x - mean) / std``. For kNN/linear evaluation."""
    x = to_unit_float(images)
    if x.shape[-2] != image_size or x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False,
                          antialias=True).clamp_(0.0, 1.0)
    elif x.data_ptr() == images.data_ptr():
        x = x.clone()
    for c, (m, s) in enumerate(zip(mean, std)):  # python scalars: no host-to-device copy
        x[:, c].sub_(float(m)).div_(float(s))
    return x
