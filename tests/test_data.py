"""Tests for ssl_suite.data.datasets: digits, fake CIFAR / STL-10 files, image folders."""

from __future__ import annotations

import io
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_suite.config import DataConfig
from ssl_suite.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    IMAGENET_MEAN,
    CorruptImageError,
    DataError,
    ImageFolderDataset,
    TensorImageDataset,
    balanced_indices,
    build_data,
    holdout_indices,
)


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """Any attempt to fetch something fails the test."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.stl10 as tv_stl10

    def boom(*a, **k):  # pragma: no cover - only runs when a test is wrong
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", boom)
    monkeypatch.setattr(tv_stl10, "download_and_extract_archive", boom)


def one_line(err: BaseException) -> str:
    s = str(err)
    assert "\n" not in s, s
    return s


# --------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits32():
    return build_data(DataConfig(name="digits", image_size=32), show_progress=False)


def test_digits_shapes_and_split_sizes(digits32):
    s = digits32
    assert s.name == "digits" and s.num_classes == 10
    assert s.pretrain.in_memory is True
    assert s.pretrain is s.knn_train
    assert s.pretrain.images.dtype == torch.uint8
    assert s.pretrain.images.shape == (1437, 3, 32, 32)
    assert s.knn_test.images.shape == (360, 3, 32, 32)
    assert s.pretrain.images.is_contiguous()
    assert s.pretrain.labels.dtype == torch.int64
    assert s.pretrain.classes == [str(i) for i in range(10)]
    img, label = s.knn_test[0]
    assert img.shape == (3, 32, 32) and isinstance(label, int)


def test_digits_split_is_stratified(digits32):
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target, minlength=10)
    test = digits32.knn_test.labels.bincount(minlength=10).numpy()
    train = digits32.knn_train.labels.bincount(minlength=10).numpy()
    assert test.tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    np.testing.assert_array_equal(train + test, full)
    assert np.all(np.abs(test - 0.2 * full) <= 1)


def test_digits_pixels_channels_and_stats(digits32):
    x = digits32.pretrain.images
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert int(x.min()) == 0 and int(x.max()) == 255
    pix = x[:, 0].double() / 255
    for c in range(3):
        assert digits32.mean[c] == pytest.approx(float(pix.mean()), abs=1e-9)
        assert digits32.std[c] == pytest.approx(float(pix.std()), abs=1e-9)
    assert 0.2 < digits32.mean[0] < 0.4 and 0.25 < digits32.std[0] < 0.45


def test_digits_native_size_is_exact_scaling():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    s = build_data(DataConfig(name="digits", image_size=8))
    d = load_digits()
    tr, te = train_test_split(np.arange(1797), test_size=0.2, stratify=d.target, random_state=0)
    tr, te = np.sort(tr), np.sort(te)
    want = np.rint(d.images[te] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(s.knn_test.images[:, 2].numpy(), want)
    np.testing.assert_array_equal(s.knn_train.labels.numpy(), d.target[tr])
    assert len(np.intersect1d(tr, te)) == 0


def test_digits_deterministic(digits32):
    again = build_data(DataConfig(name="digits", image_size=32))
    assert torch.equal(again.pretrain.images, digits32.pretrain.images)
    assert torch.equal(again.knn_test.labels, digits32.knn_test.labels)
    assert again.mean == digits32.mean


def test_digits_without_sklearn(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError) as ei:
        build_data(DataConfig(name="digits"))
    assert one_line(ei.value) == ("data.name=digits needs scikit-learn: "
                                  "pip install 'ssl_suite[quickstart]'")


def test_knn_train_limit_caps_and_balances(digits32):
    s = build_data(DataConfig(name="digits", knn_train_limit=95))
    counts = s.knn_train.labels.bincount(minlength=10).tolist()
    assert counts == [10] * 5 + [9] * 5
    assert len(s.pretrain) == 1437 and len(s.knn_test) == 360  # only knn_train is capped
    # the capped items are the same images as in the uncapped train split
    idx = balanced_indices(digits32.knn_train.labels, 95)
    assert torch.equal(s.knn_train.images, digits32.knn_train.images[idx])
    big = build_data(DataConfig(name="digits", knn_train_limit=5000))
    assert len(big.knn_train) == 1437


def test_balanced_indices_water_filling_and_determinism():
    labels = torch.tensor([0] * 2 + [1] * 10 + [2] * 10 + [-1] * 5)
    idx = balanced_indices(labels, 12)
    assert labels[idx].bincount(minlength=3).tolist() == [2, 5, 5]
    assert torch.equal(idx, torch.sort(idx).values) and len(set(idx.tolist())) == 12
    assert torch.equal(idx, balanced_indices(labels, 12))
    assert not torch.equal(idx, balanced_indices(labels, 12, seed=1))
    assert labels[balanced_indices(labels, 7)].bincount(minlength=3).tolist() == [2, 3, 2]
    assert len(balanced_indices(labels, 100)) == 22  # the -1 items are never picked


def test_holdout_indices_balanced_and_keeps_every_class():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2])
    keep, held = holdout_indices(labels, 0.3)
    assert labels[held].bincount(minlength=3).tolist() == [3, 2, 0]
    assert sorted(keep.tolist() + held.tolist()) == list(range(16))
    k2, h2 = holdout_indices(labels, 0.3)
    assert torch.equal(h2, held) and torch.equal(k2, keep)


def test_tensor_dataset_unlabelled_subset_and_validation():
    imgs = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).reshape(4, 3, 2, 2)
    ds = TensorImageDataset(imgs, None)
    assert len(ds) == 4 and ds[2][1] == -1 and torch.equal(ds[2][0], imgs[2])
    sub = ds.subset(torch.tensor([3, 1]))
    assert torch.equal(sub.images, imgs[[3, 1]]) and sub.labels is None
    lab = TensorImageDataset(imgs, torch.tensor([5, 6, 7, 8]), ["a"]).subset(torch.tensor([2]))
    assert lab.labels.tolist() == [7] and lab[0][1] == 7
    with pytest.raises(DataError):
        TensorImageDataset(imgs.float(), None)
    with pytest.raises(DataError):
        TensorImageDataset(imgs, torch.zeros(3))


# --------------------------------------------------------------------------------------------
# CIFAR (fake files in the real pickle format)


def _write_cifar(root, n_train=(3, 2, 2, 2, 3), n_test=4, cifar100=False, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = "fine_labels" if cifar100 else "labels"
    ncls = 100 if cifar100 else 10
    train_files = ["train"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)]
    sizes = [sum(n_train)] if cifar100 else list(n_train)
    train_x, train_y = [], []
    for name, n in zip(train_files, sizes):
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)  # HWC, as we expect back
        y = rng.integers(0, ncls, size=n).tolist()
        flat = x.transpose(0, 3, 1, 2).reshape(n, 3072)  # the file stores R, G, B planes
        with open(folder / name, "wb") as f:
            pickle.dump({"data": flat, key: y}, f)
        train_x.append(x)
        train_y += y
    tx = rng.integers(0, 256, size=(n_test, 32, 32, 3), dtype=np.uint8)
    ty = rng.integers(0, ncls, size=n_test).tolist()
    with open(folder / ("test" if cifar100 else "test_batch"), "wb") as f:
        pickle.dump({"data": tx.transpose(0, 3, 1, 2).reshape(n_test, 3072), key: ty}, f)
    names = [f"class{i}" for i in range(ncls)]
    with open(folder / ("meta" if cifar100 else "batches.meta"), "wb") as f:
        pickle.dump({"fine_label_names" if cifar100 else "label_names": names}, f)
    return np.concatenate(train_x), np.array(train_y), tx, np.array(ty), names


@pytest.fixture
def skip_md5(monkeypatch):
    """The fake files cannot have the real md5 sums; accept any existing file."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.stl10 as tv_stl10

    for mod in (tv_cifar, tv_stl10):
        monkeypatch.setattr(mod, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def test_cifar10_fake_files_load_in_chw(tmp_path, skip_md5):
    x, y, tx, ty, names = _write_cifar(tmp_path)
    s = build_data(DataConfig(name="cifar10", root=str(tmp_path)))
    assert s.name == "cifar10" and s.num_classes == 10
    assert s.pretrain is s.knn_train
    assert s.pretrain.images.shape == (12, 3, 32, 32) and s.pretrain.images.dtype == torch.uint8
    assert s.pretrain.images.is_contiguous()
    np.testing.assert_array_equal(s.pretrain.images.numpy(), x.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(s.knn_test.images.numpy(), tx.transpose(0, 3, 1, 2))
    # one pixel by hand: image 4, channel G, row 5, column 7
    assert int(s.pretrain.images[4, 1, 5, 7]) == int(x[4, 5, 7, 1])
    assert s.pretrain.labels.tolist() == y.tolist() and s.knn_test.labels.tolist() == ty.tolist()
    assert s.pretrain.classes == names
    assert s.mean == CIFAR10_MEAN and s.std == CIFAR10_STD
    # pointing root at the inner folder works too
    s2 = build_data(DataConfig(name="cifar10", root=str(tmp_path / "cifar-10-batches-py")))
    assert torch.equal(s2.knn_test.images, s.knn_test.images)


def test_cifar100_fake_files(tmp_path, skip_md5):
    x, y, tx, ty, _ = _write_cifar(tmp_path, cifar100=True, seed=1)
    s = build_data(DataConfig(name="cifar100", root=str(tmp_path), knn_train_limit=5))
    assert s.num_classes == 100 and s.mean == CIFAR100_MEAN
    np.testing.assert_array_equal(s.pretrain.images.numpy(), x.transpose(0, 3, 1, 2))
    assert s.knn_test.labels.tolist() == ty.tolist()
    assert len(s.pretrain) == 12 and len(s.knn_train) == 5


def test_cifar_missing_root_is_one_line_data_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as ei:
        build_data(DataConfig(name="cifar10", root=str(missing)))
    msg = one_line(ei.value)
    assert msg.startswith(f"data.root: {missing} does not exist")
    assert "cifar-10-batches-py" in msg and "data.download=true" in msg

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as ei:
        build_data(DataConfig(name="cifar10", root=str(empty)))
    assert one_line(ei.value) == (
        f"data.root: {empty} has no CIFAR-10 files (set data.root to the folder that holds "
        "cifar-10-batches-py, or data.download=true to fetch it)")

    with pytest.raises(DataError) as ei:
        build_data(DataConfig(name="cifar100", root=None))
    assert one_line(ei.value).startswith("data.root: not set")


def test_cifar_real_md5_check_rejects_fake_files(tmp_path):
    _write_cifar(tmp_path)  # without skip_md5 torchvision's md5 check fails -> DataError
    with pytest.raises(DataError, match=r"^data\.root: .* has no CIFAR-10 files"):
        build_data(DataConfig(name="cifar10", root=str(tmp_path)))


# --------------------------------------------------------------------------------------------
# STL-10 (fake binary files)


def test_stl10_fake_files(tmp_path, skip_md5):
    rng = np.random.default_rng(2)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()

    def write_x(name, n):
        x = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)
        x.transpose(0, 1, 3, 2).tofile(folder / name)  # the files are column-major
        return x

    def write_y(name, y):
        (np.asarray(y, dtype=np.uint8) + 1).tofile(folder / name)  # 1-based on disk

    train_x, test_x, unl_x = write_x("train_X.bin", 4), write_x("test_X.bin", 3), \
        write_x("unlabeled_X.bin", 5)
    write_y("train_y.bin", [0, 9, 3, 3])
    write_y("test_y.bin", [1, 2, 8])
    s = build_data(DataConfig(name="stl10", root=str(tmp_path)))
    assert s.num_classes == 10 and s.mean == IMAGENET_MEAN
    assert s.pretrain.images.shape == (9, 3, 96, 96) and s.pretrain.images.is_contiguous()
    np.testing.assert_array_equal(s.pretrain.images.numpy(), np.concatenate([train_x, unl_x]))
    assert s.pretrain.labels.tolist() == [0, 9, 3, 3, -1, -1, -1, -1, -1]
    np.testing.assert_array_equal(s.knn_train.images.numpy(), train_x)
    assert s.knn_train.labels.tolist() == [0, 9, 3, 3]
    np.testing.assert_array_equal(s.knn_test.images.numpy(), test_x)
    assert s.knn_test.labels.tolist() == [1, 2, 8] and s.knn_test.images.is_contiguous()
    assert s.pretrain.classes[0] == "airplane"


# --------------------------------------------------------------------------------------------
# image folders

CLASSES = ["ant", "bee", "cat"]


def _png(path, mode, size, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def _make_folder(root, per_class=6):
    """3 classes x 6 images of different sizes, modes and formats."""
    for ci, c in enumerate(CLASSES):
        for k in range(per_class):
            kind = k % 6
            if kind == 0:
                _png(root / c / f"{k}.png", "RGB", (40, 30), (200, 10 * ci, 5))
            elif kind == 1:
                _png(root / c / f"{k}.png", "L", (30, 50), 77)
            elif kind == 2:
                _png(root / c / f"{k}.png", "RGBA", (64, 64), (10, 20, 30, 0))
            elif kind == 3:
                _png(root / c / f"{k}.jpg", "RGB", (50, 70), (0, 128, 255))
            elif kind == 4:
                img = Image.new("P", (20, 20))
                img.putpalette([0, 0, 0, 9, 99, 199] + [0] * 762)
                img.paste(1, (0, 0, 20, 20))
                img.save(root / c / f"{k}.png")
            else:
                # 90x30: red | green | blue thirds; the centre crop must be all green
                arr = np.zeros((30, 90, 3), np.uint8)
                arr[:, :30, 0] = 255
                arr[:, 30:60, 1] = 255
                arr[:, 60:, 2] = 255
                Image.fromarray(arr).save(root / c / f"{k}.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def folder(tmp_path):
    return _make_folder(tmp_path / "train")


def test_imagefolder_decodes_to_fixed_size_rgb(folder):
    ds = ImageFolderDataset(folder, 16, show_progress=False)
    assert ds.in_memory is False
    assert ds.classes == CLASSES and len(ds) == 18 and ds.num_skipped == 0
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert ds.samples[0] == (str(folder / "ant" / "0.png"), 0)
    items = {os.path.basename(ds.path(i)): ds[i] for i in range(6)}
    for img, _ in items.values():
        assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and img.is_contiguous()
    assert items["0.png"][0][:, 3, 3].tolist() == [200, 0, 5]
    assert items["1.png"][0].unique().tolist() == [77]  # L -> 3 equal channels
    assert items["2.png"][0][:, 8, 8].tolist() == [10, 20, 30]  # RGBA: alpha dropped
    assert (items["3.jpg"][0][:, 8, 8].int() - torch.tensor([0, 128, 255])).abs().max() <= 3
    assert items["4.png"][0][:, 0, 0].tolist() == [9, 99, 199]  # palette resolved
    mid = items["5.png"][0]  # 90x30 -> 48x16 -> centre 16x16 is the green third
    assert mid[1, :, 2:-2].min() >= 250  # (bicubic mixes in a little red/blue at the edges)
    assert mid[0, :, 2:].max() <= 5 and mid[2, :, :-2].max() <= 5
    assert mid[0, :, 0].min() > 5 and mid[2, :, -1].min() > 5
    assert ds[1][1] == 0 and ds[7][1] == 1 and ds[-1][1] == 2
    with pytest.raises(IndexError):
        ds[18]


def test_imagefolder_in_a_dataloader(folder):
    ds = ImageFolderDataset(folder, 8, show_progress=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=0)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [5, 5, 5, 3]
    assert batches[0][0].shape == (5, 3, 8, 8) and batches[0][0].dtype == torch.uint8
    assert torch.cat([b[1] for b in batches]).tolist() == ds.labels.tolist()


def test_imagefolder_holdout_split(folder):
    s = build_data(DataConfig(name="imagefolder", root=str(folder), image_size=12,
                              holdout_fraction=0.2), show_progress=False)
    assert s.num_classes == 3 and s.mean == IMAGENET_MEAN
    assert s.pretrain is s.knn_train
    assert len(s.pretrain) == 15 and len(s.knn_test) == 3
    assert s.knn_test.labels.bincount(minlength=3).tolist() == [1, 1, 1]
    train_paths = {p for p, _ in s.pretrain.samples}
    test_paths = {p for p, _ in s.knn_test.samples}
    assert not train_paths & test_paths and len(train_paths | test_paths) == 18
    assert s.knn_test[0][0].shape == (3, 12, 12)
    again = build_data(DataConfig(name="imagefolder", root=str(folder), holdout_fraction=0.2),
                       show_progress=False)
    assert {p for p, _ in again.knn_test.samples} == test_paths

    half = build_data(DataConfig(name="imagefolder", root=str(folder), holdout_fraction=0.5,
                                 knn_train_limit=6), show_progress=False)
    assert len(half.knn_test) == 9 and len(half.pretrain) == 9
    assert half.knn_train.labels.bincount(minlength=3).tolist() == [2, 2, 2]

    none = build_data(DataConfig(name="imagefolder", root=str(folder), holdout_fraction=0.0),
                      show_progress=False)
    assert none.knn_test is None and len(none.pretrain) == 18


def test_imagefolder_test_root(folder, tmp_path):
    test = _make_folder(tmp_path / "val", per_class=2)
    s = build_data(DataConfig(name="imagefolder", root=str(folder), test_root=str(test)),
                   show_progress=False)
    assert len(s.pretrain) == 18 and len(s.knn_test) == 6
    assert s.knn_test.classes == CLASSES and s.knn_test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert all(p.startswith(str(test)) for p, _ in s.knn_test.samples)

    (test / "dog").mkdir()
    _png(test / "dog" / "0.png", "RGB", (8, 8), (0, 0, 0))
    with pytest.raises(DataError) as ei:
        build_data(DataConfig(name="imagefolder", root=str(folder), test_root=str(test)),
                   show_progress=False)
    msg = one_line(ei.value)
    assert msg.startswith(f"data.test_root: {test}: class folders differ")
    assert "extra: dog" in msg and "missing: none" in msg


def _corrupt(folder):
    (folder / "ant" / "bad.jpg").write_bytes(b"this is not a jpeg" * 20)
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    (folder / "bee" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return str(folder / "ant" / "bad.jpg"), str(folder / "bee" / "truncated.jpg")


def test_imagefolder_skip_drops_corrupt_files(folder, caplog):
    bad, trunc = _corrupt(folder)
    with caplog.at_level(logging.WARNING, logger="ssl_suite"):
        ds = ImageFolderDataset(folder, 8, on_corrupt="skip", show_progress=False)
    assert ds.num_skipped == 2 and len(ds) == 18
    assert bad not in ds.samples and trunc not in {p for p, _ in ds.samples}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"imagefolder {folder}: skipped 2 unreadable image(s) of 20 "
                                  f"(first: {bad}")
    # the subsets of a split remember the count
    assert ds.subset(torch.tensor([0, 1])).num_skipped == 2


def test_imagefolder_error_mode_raises_naming_the_file(folder):
    bad, trunc = _corrupt(folder)
    ds = ImageFolderDataset(folder, 8, on_corrupt="error", show_progress=False)
    assert len(ds) == 20 and ds.num_skipped == 0
    i_bad = next(i for i in range(len(ds)) if ds.path(i) == bad)
    i_trunc = next(i for i in range(len(ds)) if ds.path(i) == trunc)
    for i, path in ((i_bad, bad), (i_trunc, trunc)):
        with pytest.raises(CorruptImageError) as ei:
            ds[i]
        assert one_line(ei.value).startswith(f"cannot read image {path}: ")
    with pytest.raises(CorruptImageError, match="cannot read image"):
        for _ in torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0):
            pass


def test_corrupt_error_from_a_worker_process_stays_one_line(folder):
    bad, _ = _corrupt(folder)
    ds = ImageFolderDataset(folder, 8, on_corrupt="error", show_progress=False)
    i_bad = next(i for i in range(len(ds)) if ds.path(i) == bad)
    sub = ds.subset(torch.tensor([i_bad]))
    with pytest.raises(CorruptImageError) as ei:
        next(iter(torch.utils.data.DataLoader(sub, batch_size=1, num_workers=1)))
    assert one_line(ei.value).startswith(f"cannot read image {bad}: ")


def test_imagefolder_skip_substitutes_when_a_file_breaks_later(folder, caplog):
    ds = ImageFolderDataset(folder, 8, on_corrupt="skip", show_progress=False)
    (folder / "ant" / "5.png").write_bytes(b"garbage")  # breaks after the scan
    i = next(i for i in range(len(ds)) if ds.path(i).endswith(os.path.join("ant", "5.png")))
    assert ds.path(i + 1).endswith(os.path.join("bee", "0.png"))
    with caplog.at_level(logging.WARNING, logger="ssl_suite"):
        img, label = ds[i]
        img2, _ = ds[i]
    assert label == 1 and torch.equal(img, ds[i + 1][0]) and torch.equal(img, img2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "5.png" in warnings[0] and "substituting" in warnings[0]


def test_imagefolder_bad_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as ei:
        ImageFolderDataset(empty, 8, show_progress=False)
    assert one_line(ei.value) == f"{empty} has no class subfolders (expected {empty}/<class>/<image>)"

    flat = tmp_path / "flat"
    _png(flat / "a.png", "RGB", (8, 8), (0, 0, 0))  # images but no class subfolders
    with pytest.raises(DataError) as ei:
        build_data(DataConfig(name="imagefolder", root=str(flat)), show_progress=False)
    assert one_line(ei.value).startswith(f"data.root: {flat} has no class subfolders")

    no_images = tmp_path / "noimg"
    (no_images / "a").mkdir(parents=True)
    (no_images / "a" / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"has class subfolders but no images"):
        ImageFolderDataset(no_images, 8, show_progress=False)

    with pytest.raises(DataError) as ei:
        build_data(DataConfig(name="imagefolder", root=str(tmp_path / "missing")))
    assert one_line(ei.value) == f"data.root: {tmp_path / 'missing'} does not exist"

    with pytest.raises(DataError, match=r"^data\.root: not set"):
        build_data(DataConfig(name="imagefolder"))

    allbad = tmp_path / "allbad"
    (allbad / "a").mkdir(parents=True)
    (allbad / "a" / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"none of the 1 images can be read"):
        ImageFolderDataset(allbad, 8, show_progress=False)
