"""ssl_suite: BYOL self-supervised pretraining with timm backbones, kornia views and Accelerate."""

__version__ = "0.1.0"

# Registers resnet18_cifar ... resnet152_cifar with timm (see ssl_suite.models.timm_models).
from .models import timm_models as _timm_models  # noqa: E402,F401
from .export import export_encoder, load_backbone  # noqa: E402

__all__ = ["__version__", "export_encoder", "load_backbone"]
