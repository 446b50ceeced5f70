"""Data: datasets (in-memory uint8 tensors, decoded image folders) and their splits.

See :mod:`ssl_suite.data.datasets` and :func:`build_data`.
"""

from ssl_suite.data.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    DataError,
    DataSplits,
    ImageFolderDataset,
    TensorImageDataset,
    balanced_indices,
    build_data,
    check_image_file,
    decode_image,
    holdout_indices,
)

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN",
    "IMAGENET_STD", "CorruptImageError", "DataError", "DataSplits", "ImageFolderDataset",
    "TensorImageDataset", "balanced_indices", "build_data", "check_image_file", "decode_image",
    "holdout_indices",
]
