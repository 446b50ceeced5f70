"""CIFAR-stem ResNets registered as timm models (``resnet18_cifar`` ... ``resnet152_cifar``).

Importing :mod:`ssl_suite` registers them, after which::

    import ssl_suite, timm
    model = timm.create_model("resnet18_cifar", num_classes=0)
    model = timm.create_model("resnet18_cifar", num_classes=0, channels=[8, 16, 32, 64])

Each is timm's ``resnetXX`` (same blocks, same keyword arguments) with the CIFAR stem of
:func:`ssl_suite.models.backbone.apply_cifar_stem`: ``conv1`` is a 3x3, stride-1, padding-1
convolution without bias and ``maxpool`` is an ``nn.Identity``. Module and state-dict key names are
those of ``create_backbone("resnetXX", cifar_stem=True)``, so weights move between the two with no
renaming; built under the same RNG seed, the two are even initialised identically (the new
``conv1`` keeps PyTorch's default init, as in ``apply_cifar_stem``).

The registered pretrained configs point at no weights (no URL, no Hugging Face hub id), so
``pretrained=True`` needs a local file: ``pretrained_cfg_overlay=dict(file="x.safetensors")``.
They describe 32x32 CIFAR-10 input (10 classes, CIFAR-10 mean/std); see
:mod:`ssl_suite.export` for loading exported encoders.
"""

from __future__ import annotations

from typing import Any, Dict

from torch import nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["CifarResNet", "CIFAR_RESNETS"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

#: Architectures that have a ``<name>_cifar`` variant.
CIFAR_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class CifarResNet(ResNet):
    """timm ``ResNet`` with a 3x3/1 first convolution and no max-pool (total stride 8, not 32)."""

    def __init__(self, *args: Any, device=None, dtype=None, **kwargs: Any):
        super().__init__(*args, device=device, dtype=dtype, **kwargs)
        conv = self.conv1
        if not isinstance(conv, nn.Conv2d):
            raise ValueError("the CIFAR stem replaces a single 7x7 conv1; "
                             f"stem_type={kwargs.get('stem_type')!r} gives a deep stem")
        # Same construction as ssl_suite.models.backbone.apply_cifar_stem (same RNG draws).
        self.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1,
                               padding=1, bias=False, device=device, dtype=dtype)
        self.maxpool = nn.Identity()
        # The stem no longer downsamples: act1 is at stride 1, every stage 4x less than before.
        for info in self.feature_info:
            info["reduction"] = 1 if info["module"] == "act1" else max(info["reduction"] // 4, 1)


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (4, 4),
        "crop_pct": 1.0, "interpolation": "bicubic",
        "mean": CIFAR10_MEAN, "std": CIFAR10_STD,
        "first_conv": "conv1", "classifier": "fc",
        "license": "apache-2.0",
        "description": "CIFAR stem (3x3/1 conv1, no max-pool); no published weights, "
                       "load a file with pretrained_cfg_overlay=dict(file=...)",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({f"{name}_cifar": _cfg() for name in CIFAR_RESNETS})


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-18 with a CIFAR stem (3x3/1 conv1, no max-pool)."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_cifar_resnet("resnet18_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet34_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-34 with a CIFAR stem (3x3/1 conv1, no max-pool)."""
    model_args = dict(block=BasicBlock, layers=(3, 4, 6, 3))
    return _create_cifar_resnet("resnet34_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-50 with a CIFAR stem (3x3/1 conv1, no max-pool)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_cifar_resnet("resnet50_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet101_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-101 with a CIFAR stem (3x3/1 conv1, no max-pool)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 23, 3))
    return _create_cifar_resnet("resnet101_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet152_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-152 with a CIFAR stem (3x3/1 conv1, no max-pool)."""
    model_args = dict(block=Bottleneck, layers=(3, 8, 36, 3))
    return _create_cifar_resnet("resnet152_cifar", pretrained, **dict(model_args, **kwargs))
