"""Datasets: in-memory uint8 tensors for small images, decoded folders for large ones.

Two storage kinds (see DESIGN.md, "The data path"):

* :class:`TensorImageDataset` (``in_memory = True``): the embedded default (scikit-learn digits),
  CIFAR-10/100 and STL-10 live as ONE contiguous ``uint8`` tensor ``(N, 3, H, W)``. A loader draws
  batches as index tensors into ``.images``; no per-sample Python call is needed.
* :class:`ImageFolderDataset` (``in_memory = False``): any folder of class subfolders. Each item
  is decoded in a DataLoader worker to a fixed storage size ``(3, S, S)`` uint8 (shorter side
  resized to ``S`` with antialiasing, centre crop). Random cropping and all photometric
  augmentation happen later, batched on the device.

:func:`build_data` turns a :class:`~ssl_suite.config.DataConfig` into :class:`DataSplits`
(pretraining set, labelled kNN memory bank, labelled test split, normalisation constants).
Every bad input raises :class:`DataError` whose ``str`` is one line naming the setting or file.
"""

from __future__ import annotations

import logging
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

if TYPE_CHECKING:  # pragma: no cover
    from ssl_suite.config import DataConfig

log = logging.getLogger("ssl_suite")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                 "truck"]

#: seed of every deterministic split in this module (digits test split, imagefolder holdout,
#: knn_train_limit subsets); fixed so that the same config always gives the same split.
SPLIT_SEED = 0
#: in skip mode, how many following items __getitem__ tries before giving up
_MAX_SUBSTITUTES = 64


# --------------------------------------------------------------------------------------------
# Errors


def _one_line(text: object, limit: int = 300) -> str:
    """Whitespace (newlines included) collapsed to single spaces, cut at ``limit`` chars."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


class DataError(RuntimeError):
    """Bad data input; ``str(err)`` is ONE line naming the setting or file.

    When a DataLoader worker raised the error, PyTorch re-creates it in the main process from a
    message holding the whole worker traceback; the constructor keeps only the original one-line
    message from it (the last line of that traceback), so the one-line promise holds there too.
    """

    def __init__(self, message: object = "") -> None:
        text = str(message)
        if "\n" in text:
            text = self._from_worker_traceback(text)
        super().__init__(text)

    @classmethod
    def _from_worker_traceback(cls, text: str) -> str:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if text.startswith("Caught ") and lines:
            last = lines[-1].strip()
            # the traceback ends with "package.module.ClassName: message"
            hits = []
            for name in (cls.__name__, "DataError", "CorruptImageError"):
                pos = last.find(f"{name}: ")
                if pos >= 0:
                    hits.append((pos, pos + len(name) + 2))
            if hits:
                return _one_line(last[min(hits)[1]:], limit=10_000)
            return _one_line(last, limit=10_000)
        return _one_line(text, limit=10_000)


class CorruptImageError(DataError):
    """An image file that cannot be decoded; the message names the file's path."""


# --------------------------------------------------------------------------------------------
# In-memory tensors


class TensorImageDataset(Dataset):
    """Images held in memory as one contiguous ``uint8`` tensor ``(N, 3, H, W)``.

    Args:
        images: ``uint8`` tensor ``(N, 3, H, W)``; made contiguous if it is not.
        labels: ``int64`` tensor ``(N,)``, or ``None`` for a wholly unlabelled set. Individual
            unlabelled items inside a labelled set (STL-10's ``train+unlabeled``) carry ``-1``.
        classes: class names, index = label.

    ``dataset[i]`` returns ``(images[i], label)`` with ``label = -1`` when unknown; loaders should
    rather index ``dataset.images`` / ``dataset.labels`` with a whole batch of indices.
    """

    in_memory = True

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor],
                 classes: Optional[list[str]] = None) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 \
                or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
            dtype = images.dtype if isinstance(images, torch.Tensor) else ""
            raise DataError(f"TensorImageDataset: images must be uint8 (N, 3, H, W), got "
                            f"{dtype} {shape}")
        if labels is not None:
            labels = torch.as_tensor(labels).to(torch.int64)
            if labels.shape != (images.shape[0],):
                raise DataError(f"TensorImageDataset: labels must have shape ({images.shape[0]},),"
                                f" got {tuple(labels.shape)}")
            labels = labels.contiguous()
        self.images = images.contiguous()
        self.labels = labels
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label = -1 if self.labels is None else int(self.labels[i])
        return self.images[i], label

    def subset(self, indices: torch.Tensor) -> "TensorImageDataset":
        """A new dataset holding copies of the items at ``indices`` (in that order)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        labels = None if self.labels is None else self.labels[idx]
        return TensorImageDataset(self.images[idx], labels, self.classes)

    def __repr__(self) -> str:
        n, _, h, w = self.images.shape
        lab = "unlabelled" if self.labels is None else f"{len(self.classes or [])} classes"
        return f"TensorImageDataset({n} images, {h}x{w}, {lab})"


# --------------------------------------------------------------------------------------------
# Image folders


def _img_extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return IMG_EXTENSIONS


def _to_rgb(img):
    """PIL image of any mode -> RGB. Alpha is dropped (as torchvision's loader does); 16-bit
    and float greyscale are rescaled to 8 bits instead of being clipped."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def decode_image(path: Union[str, os.PathLike], image_size: int) -> torch.Tensor:
    """Decode ``path`` to a ``uint8`` tensor ``(3, image_size, image_size)``.

    EXIF orientation is applied; any mode becomes RGB; the shorter side is resized to
    ``image_size`` (bicubic, antialiased, torchvision's size rounding) and the centre is cropped.
    JPEGs are first reduced in the DCT domain (``PIL draft``) by a power of two that keeps both
    sides at least ``image_size``, which makes large photos several times cheaper to decode.
    Raises whatever PIL raises for unreadable files (callers wrap it).
    """
    from PIL import Image, ImageOps
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    with Image.open(path) as im:
        im.draft(None, (image_size, image_size))
        im.load()
        img = ImageOps.exif_transpose(im)
        img = _to_rgb(img)
        img = TF.resize(img, image_size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, [image_size, image_size])
        arr = np.array(img, dtype=np.uint8, copy=True)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def check_image_file(path: str) -> Optional[str]:
    """Cheap readability check: ``None`` if ``path`` looks decodable, else a one-line reason.

    Reads the header and runs PIL's ``verify`` (a full CRC check for PNG). JPEGs whose last two
    bytes are not the end-of-image marker (truncated files, or trailing data) are decoded fully,
    so truncated JPEGs are caught without decoding every healthy one.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            fmt = img.format
            img.verify()
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(-2, os.SEEK_END)
                tail = f.read(2)
            if tail != b"\xff\xd9":
                with Image.open(path) as img:
                    img.load()
        return None
    except Exception as e:  # noqa: BLE001 - any failure means unreadable
        return _reason(e)


def _reason(e: BaseException) -> str:
    msg = _one_line(e, limit=200)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class _PathTable:
    """File paths packed in two numpy arrays (bytes + offsets).

    A Python list of 1M path strings in a Dataset is touched by every DataLoader worker, and the
    reference-count writes copy the forked memory page by page; two flat arrays do not.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        enc = [os.fsencode(p) for p in paths]
        lengths = np.fromiter((len(b) for b in enc), dtype=np.int64, count=len(enc))
        self.offsets = np.zeros(len(enc) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(enc), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes())

    def take(self, indices: Sequence[int]) -> list[str]:
        return [self[int(i)] for i in indices]


class ImageFolderDataset(Dataset):
    """Any folder of class subfolders, decoded per item to ``uint8 (3, image_size, image_size)``.

    Class discovery is torchvision ``ImageFolder``'s: sorted subfolder names are the classes,
    files with an extension in torchvision's ``IMG_EXTENSIONS`` (any depth below a class folder,
    symlinks followed) are the images. Empty class folders are allowed and keep their index.
    Decoding: see :func:`decode_image`.

    Args:
        root: the folder.
        image_size: stored side length ``S``.
        on_corrupt: ``"skip"``: at construction every file is checked with
            :func:`check_image_file` (a thread pool, tqdm bar if ``show_progress``), unreadable
            ones are dropped, counted in ``num_skipped`` and reported in ONE warning on the
            ``ssl_suite`` logger. If a file still fails in ``__getitem__``, the next readable item
            is returned instead (deterministic) and a warning is logged once per file and
            process. ``"error"``: no scan; ``__getitem__`` raises :class:`CorruptImageError`
            naming the file.
        samples: ``(path, class_index)`` pairs to use instead of discovering them; taken as they
            are (no scan). ``classes`` should be given with them.
        classes: without ``samples``: the expected class list; the folder's subfolders must be
            exactly these (used for a test folder that must match the training classes).
        show_progress: show the scan's progress bar.

    Attributes: ``root``, ``image_size``, ``on_corrupt``, ``classes``, ``labels`` (int64 ``(N,)``),
    ``samples`` (a list built on access), ``num_skipped``.
    """

    in_memory = False

    def __init__(self, root: Union[str, os.PathLike], image_size: int, on_corrupt: str = "skip",
                 samples: Optional[list[tuple[str, int]]] = None,
                 classes: Optional[list[str]] = None, show_progress: bool = True) -> None:
        if on_corrupt not in ("skip", "error"):
            raise DataError(f"data.on_corrupt: {on_corrupt!r} is not one of 'skip', 'error'")
        self.root = str(root)
        self.image_size = int(image_size)
        self.on_corrupt = on_corrupt
        self.num_skipped = 0
        self._warned: set[int] = set()

        if samples is None:
            classes, samples = self._discover(self.root, classes)
            if on_corrupt == "skip":
                samples = self._scan(samples, show_progress)
        elif classes is None:
            n = 1 + max((c for _, c in samples), default=-1)
            classes = [str(c) for c in range(n)]
        self.classes = list(classes)
        self._paths = _PathTable([p for p, _ in samples])
        self.labels = torch.tensor([c for _, c in samples], dtype=torch.int64)

    # -- construction helpers ---------------------------------------------------------------

    @staticmethod
    def _discover(root: str, expected: Optional[list[str]]) -> tuple[list[str], list]:
        from torchvision.datasets.folder import make_dataset

        if not os.path.exists(root):
            raise DataError(f"{root} does not exist")
        if not os.path.isdir(root):
            raise DataError(f"{root} is not a folder")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not classes:
            raise DataError(f"{root} has no class subfolders (expected {root}/<class>/<image>)")
        if expected is not None and classes != sorted(expected):
            missing = sorted(set(expected) - set(classes))
            extra = sorted(set(classes) - set(expected))
            raise DataError(f"{root}: class folders differ from the expected classes "
                            f"(missing: {_short_list(missing)}; extra: {_short_list(extra)})")
        if expected is not None:
            classes = list(expected)
        samples = make_dataset(root, {c: i for i, c in enumerate(classes)},
                               extensions=_img_extensions(), allow_empty=True)
        if not samples:
            exts = " ".join(_img_extensions())
            raise DataError(f"{root} has class subfolders but no images (extensions: {exts})")
        return classes, samples

    def _scan(self, samples: list, show_progress: bool) -> list:
        from tqdm.auto import tqdm

        paths = [p for p, _ in samples]
        chunk = 64
        chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
        reasons: list[Optional[str]] = []
        workers = min(32, 4 * (os.cpu_count() or 1), max(1, len(chunks)))
        with ThreadPoolExecutor(max_workers=workers) as pool, \
                tqdm(total=len(paths), desc=f"checking {self.root}", unit="img",
                     disable=not show_progress, leave=False) as bar:
            for res in pool.map(lambda ps: [check_image_file(p) for p in ps], chunks):
                reasons.extend(res)
                bar.update(len(res))
        bad = [i for i, r in enumerate(reasons) if r is not None]
        self.num_skipped = len(bad)
        if bad:
            first = bad[0]
            log.warning("imagefolder %s: skipped %d unreadable image(s) of %d (first: %s: %s)",
                        self.root, len(bad), len(samples), paths[first], reasons[first])
        if len(bad) == len(samples):
            raise DataError(f"{self.root}: none of the {len(samples)} images can be read "
                            f"(first: {paths[bad[0]]}: {reasons[bad[0]]})")
        bad_set = set(bad)
        return [s for i, s in enumerate(samples) if i not in bad_set]

    # -- Dataset protocol -------------------------------------------------------------------

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(path, class_index)`` pairs; a new list on each access."""
        return [(self._paths[i], int(c)) for i, c in enumerate(self.labels.tolist())]

    def path(self, i: int) -> str:
        """The file of item ``i``."""
        return self._paths[i]

    def __len__(self) -> int:
        return len(self._paths)

    def _load(self, i: int) -> torch.Tensor:
        path = self._paths[i]
        try:
            return decode_image(path, self.image_size)
        except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt image
            raise CorruptImageError(f"cannot read image {path}: {_reason(e)}") from e

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i %= n
        if self.on_corrupt == "error":
            return self._load(i), int(self.labels[i])
        first_err: Optional[CorruptImageError] = None
        for step in range(min(n, _MAX_SUBSTITUTES)):
            j = (i + step) % n
            try:
                img = self._load(j)
            except CorruptImageError as e:
                first_err = first_err or e
                if j not in self._warned:
                    self._warned.add(j)
                    log.warning("imagefolder %s: %s; substituting the next readable image",
                                self.root, e)
                continue
            return img, int(self.labels[j])
        raise CorruptImageError(f"{first_err} (and the next {min(n, _MAX_SUBSTITUTES) - 1} "
                                f"images are unreadable too)")

    def subset(self, indices) -> "ImageFolderDataset":
        """A dataset of the items at ``indices`` (no rescan; ``num_skipped`` is inherited)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).tolist()
        labels = self.labels.tolist()
        samples = [(self._paths[i], labels[i]) for i in idx]
        out = ImageFolderDataset(self.root, self.image_size, self.on_corrupt, samples=samples,
                                 classes=self.classes, show_progress=False)
        out.num_skipped = self.num_skipped
        return out

    def __repr__(self) -> str:
        return (f"ImageFolderDataset({self.root!r}, {len(self)} images, {len(self.classes)} "
                f"classes, {self.image_size}px)")


def _short_list(items: list[str], n: int = 5) -> str:
    if not items:
        return "none"
    s = ", ".join(items[:n])
    return s + (f", ... ({len(items)} in all)" if len(items) > n else "")


# --------------------------------------------------------------------------------------------
# Deterministic class-balanced selections


def balanced_indices(labels: torch.Tensor, count: int, seed: int = SPLIT_SEED) -> torch.Tensor:
    """Sorted indices of a class-balanced random subset of at most ``count`` items.

    Classes (labels ``>= 0``; ``-1`` items are never picked) get equal shares; a class with fewer
    items than its share gives the rest to the others (water-filling), and the remainder of an
    uneven division goes one each to the lowest class indices with room. Within a class the
    items are a seeded random draw, so the result depends only on ``labels``, ``count``, ``seed``.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels[labels >= 0]).tolist()
    members = {c: torch.nonzero(labels == c).flatten() for c in classes}
    counts = {c: len(members[c]) for c in classes}
    quota = {c: 0 for c in classes}
    remaining = min(int(count), sum(counts.values()))
    by_size = sorted(classes, key=lambda c: (counts[c], c))
    for k, c in enumerate(by_size):
        share = remaining // (len(by_size) - k)
        if counts[c] <= share:  # a small class: all of it
            quota[c] = counts[c]
            remaining -= counts[c]
            continue
        rest = by_size[k:]  # all larger than the share: each gets it, the remainder (fewer
        for r in rest:      # than len(rest)) goes one each to the lowest class indices
            quota[r] = share
        remaining -= share * len(rest)
        for r in sorted(rest)[:remaining]:
            quota[r] += 1
        break
    picked = [members[c][torch.randperm(counts[c], generator=g)[:quota[c]]] for c in classes]
    if not picked:
        return torch.zeros(0, dtype=torch.int64)
    return torch.sort(torch.cat(picked)).values


def holdout_indices(labels: torch.Tensor, fraction: float,
                    seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, held_out)`` sorted index tensors; each class holds out
    ``round(fraction * n_c)`` items (at most ``n_c - 1``, so every class stays in ``keep``),
    drawn with a seeded generator."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        n = len(members)
        k = min(int(fraction * n + 0.5), max(n - 1, 0))
        held.append(members[torch.randperm(n, generator=g)[:k]])
    held_t = torch.sort(torch.cat(held)).values if held else torch.zeros(0, dtype=torch.int64)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_t] = False
    return torch.nonzero(mask).flatten(), held_t


# --------------------------------------------------------------------------------------------
# build_data


AnyDataset = Union[TensorImageDataset, ImageFolderDataset]


@dataclass
class DataSplits:
    """What a run needs from its data.

    Attributes:
        pretrain: images for self-supervised pretraining (labels may exist but are unused;
            STL-10's ``train+unlabeled`` keeps a labels tensor with ``-1`` for unlabelled items).
        knn_train: labelled memory bank for kNN monitoring / linear-eval training set, or None.
        knn_test: labelled query / test split, or None.
        num_classes: number of classes (0 when unknown).
        mean, std: per-channel normalisation constants on the [0, 1] scale.
        name: the dataset name (``data.name``).
    """

    pretrain: AnyDataset
    knn_train: Optional[AnyDataset]
    knn_test: Optional[AnyDataset]
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str


def _digits(cfg: "DataConfig") -> DataSplits:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError("data.name=digits needs scikit-learn: "
                        "pip install 'ssl_suite[quickstart]'") from None
    import torch.nn.functional as F

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32) * (255.0 / 16.0)  # (N, 8, 8)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    x = x[:, None]
    if cfg.image_size != x.shape[-1]:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                          align_corners=False)
    images = x.round().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2,
                                           stratify=y.numpy(), random_state=SPLIT_SEED)
    train_idx = torch.as_tensor(np.sort(train_idx))
    test_idx = torch.as_tensor(np.sort(test_idx))
    classes = [str(c) for c in range(10)]
    train = TensorImageDataset(images[train_idx], y[train_idx], classes)
    test = TensorImageDataset(images[test_idx], y[test_idx], classes)
    pix = train.images[:, 0].to(torch.float64) / 255.0
    m, s = float(pix.mean()), float(pix.std())
    return DataSplits(train, train, test, 10, (m, m, m), (s, s, s), "digits")


def _resolve_root(cfg: "DataConfig", base_folder: str) -> str:
    hint = (f"set data.root to the folder that holds {base_folder}, or data.download=true "
            f"to fetch it")
    if not cfg.root:
        raise DataError(f"data.root: not set; data.name={cfg.name} needs it ({hint})")
    root = os.path.expanduser(str(cfg.root))
    if Path(root).name == base_folder:  # pointed at the inner folder itself
        root = str(Path(root).parent)
    if not cfg.download and not os.path.isdir(root):
        raise DataError(f"data.root: {cfg.root} does not exist ({hint})")
    return root


def _torchvision(cls, cfg: "DataConfig", root: str, base_folder: str, title: str, **kwargs):
    """Construct a torchvision dataset, turning its errors into one-line DataErrors."""
    try:
        return cls(root, download=cfg.download, **kwargs)
    except RuntimeError as e:
        if cfg.download:
            raise DataError(f"data.download: fetching {title} into {root} failed: "
                            f"{_one_line(e, 200)}") from e
        raise DataError(f"data.root: {cfg.root} has no {title} files (set data.root to the "
                        f"folder that holds {base_folder}, or data.download=true to fetch it)"
                        ) from e
    except (OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
        if cfg.download:
            raise DataError(f"data.download: fetching {title} into {root} failed: "
                            f"{_reason(e)}") from e
        raise DataError(f"data.root: reading {title} in {cfg.root} failed: {_reason(e)}") from e


def _cifar(cfg: "DataConfig") -> DataSplits:
    from torchvision.datasets import CIFAR10, CIFAR100

    if cfg.name == "cifar10":
        cls, title, n, mean, std = CIFAR10, "CIFAR-10", 10, CIFAR10_MEAN, CIFAR10_STD
    else:
        cls, title, n, mean, std = CIFAR100, "CIFAR-100", 100, CIFAR100_MEAN, CIFAR100_STD
    root = _resolve_root(cfg, cls.base_folder)
    out = []
    for train in (True, False):
        ds = _torchvision(cls, cfg, root, cls.base_folder, title, train=train)
        images = torch.from_numpy(np.asarray(ds.data, dtype=np.uint8)).permute(0, 3, 1, 2)
        labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
        out.append(TensorImageDataset(images.contiguous(), labels, list(ds.classes)))
    train_set, test_set = out
    return DataSplits(train_set, train_set, test_set, n, mean, std, cfg.name)


def _stl10(cfg: "DataConfig") -> DataSplits:
    from torchvision.datasets import STL10

    title = "STL-10"
    root = _resolve_root(cfg, STL10.base_folder)
    out = []
    for split in ("train+unlabeled", "test"):
        ds = _torchvision(STL10, cfg, root, STL10.base_folder, title, split=split)
        images = torch.from_numpy(np.ascontiguousarray(ds.data, dtype=np.uint8))
        labels = torch.as_tensor(np.asarray(ds.labels).astype(np.int64))
        classes = list(getattr(ds, "classes", STL10_CLASSES))
        out.append(TensorImageDataset(images, labels, classes))
        del ds
    pretrain, test_set = out
    labelled = torch.nonzero(pretrain.labels >= 0).flatten()
    knn_train = pretrain.subset(labelled)  # STL-10 "train": the labelled 5000
    return DataSplits(pretrain, knn_train, test_set, 10, IMAGENET_MEAN, IMAGENET_STD, "stl10")


def _imagefolder(cfg: "DataConfig", show_progress: bool) -> DataSplits:
    if not cfg.root:
        raise DataError("data.root: not set; data.name=imagefolder needs a folder of class "
                        "subfolders")
    root = os.path.expanduser(str(cfg.root))
    try:
        full = ImageFolderDataset(root, cfg.image_size, cfg.on_corrupt,
                                  show_progress=show_progress)
    except DataError as e:
        raise DataError(f"data.root: {e}") from e
    if cfg.test_root:
        test_root = os.path.expanduser(str(cfg.test_root))
        try:
            test = ImageFolderDataset(test_root, cfg.image_size, cfg.on_corrupt,
                                      classes=full.classes, show_progress=show_progress)
        except DataError as e:
            raise DataError(f"data.test_root: {e}") from e
        train = full
    elif cfg.holdout_fraction > 0:
        keep, held = holdout_indices(full.labels, cfg.holdout_fraction)
        train, test = full.subset(keep), full.subset(held)
        if len(test) == 0:
            test = None
    else:
        train, test = full, None
    return DataSplits(train, train, test, len(full.classes), IMAGENET_MEAN, IMAGENET_STD,
                      "imagefolder")


def build_data(cfg: "DataConfig", show_progress: bool = True) -> DataSplits:
    """Load the dataset named by ``cfg.name`` and split it (see :class:`DataSplits`).

    * ``digits``: scikit-learn's 1797 8x8 digits, scaled to 0..255, bilinearly upsampled to
      ``image_size``, grey replicated to 3 channels. Stratified 80/20 split with a fixed seed
      (1437 train / 360 test); pretrain = knn_train = train. mean/std from the train split.
    * ``cifar10`` / ``cifar100``: torchvision's files in ``root``; pretrain = knn_train = train,
      knn_test = test. ``image_size`` is not applied (stored at 32x32).
    * ``stl10``: pretrain = ``train+unlabeled`` (105000 images, labels -1 for the unlabelled),
      knn_train = its labelled ``train`` part (5000), knn_test = ``test``. Stored at 96x96.
    * ``imagefolder``: :class:`ImageFolderDataset` of ``root``; knn_test = ``test_root`` (same
      classes required) or a seeded class-balanced ``holdout_fraction`` of ``root``, which is
      then removed from pretrain = knn_train.

    ``knn_train_limit`` caps knn_train with :func:`balanced_indices`. Nothing is downloaded unless
    ``cfg.download``. Raises :class:`DataError` (one line naming the setting) on bad input.
    """
    if cfg.name == "digits":
        splits = _digits(cfg)
    elif cfg.name in ("cifar10", "cifar100"):
        splits = _cifar(cfg)
    elif cfg.name == "stl10":
        splits = _stl10(cfg)
    elif cfg.name == "imagefolder":
        splits = _imagefolder(cfg, show_progress)
    else:
        raise DataError(f"data.name: {cfg.name!r} is not one of 'digits', 'cifar10', "
                        f"'cifar100', 'stl10', 'imagefolder'")
    limit = cfg.knn_train_limit
    if limit is not None and splits.knn_train is not None and len(splits.knn_train) > limit:
        idx = balanced_indices(splits.knn_train.labels, limit)
        splits.knn_train = splits.knn_train.subset(idx)
    log.info("data %s: pretrain %d, knn_train %s, knn_test %s, %d classes", splits.name,
             len(splits.pretrain), _len(splits.knn_train), _len(splits.knn_test),
             splits.num_classes)
    return splits


def _len(ds: Optional[AnyDataset]) -> str:
    return "none" if ds is None else str(len(ds))
