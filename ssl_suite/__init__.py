"""ssl_suite: BYOL self-supervised pretraining with timm backbones, kornia views and Accelerate."""

__version__ = "0.1.0"
