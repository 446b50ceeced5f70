"""Backbones from timm by name.

``timm.create_model(name, num_classes=0)`` gives a feature extractor whose pooled output size is
``model.num_features``; :func:`create_backbone` adds the CIFAR stem used by small-image recipes
(solo-learn, lightly; byol.md A.9): a 3x3 stride-1 first convolution and no max-pool.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn


class BackboneError(ValueError):
    """A backbone that cannot be built; one line naming the setting."""


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """Replace a timm ResNet's 7x7/2 stem conv with 3x3/1 and drop the max-pool (in place)."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise BackboneError(
            "model.cifar_stem: only ResNet-style timm models with a single conv1 and a maxpool "
            f"have a CIFAR stem; {type(model).__name__} has none (use e.g. resnet18/resnet50)")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1,
                            padding=1, bias=conv.bias is not None)
    model.maxpool = nn.Identity()
    return model


def create_backbone(name: str, cifar_stem: bool = False, pretrained: bool = False,
                    **kwargs: Any) -> nn.Module:
    """A timm model with its classifier removed (``num_classes=0``); ``.num_features`` is set."""
    if name not in timm.list_models() and not timm.is_model(name):
        raise BackboneError(f"model.backbone: {name!r} is not a timm model name "
                            "(see timm.list_models())")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError as e:
        raise BackboneError(f"model.backbone_kwargs: {e}") from None
    if cifar_stem:
        apply_cifar_stem(model)
    if not hasattr(model, "num_features"):
        with torch.no_grad():
            model.num_features = int(model.eval()(torch.zeros(1, 3, 32, 32)).shape[-1])
        model.train()
    return model
