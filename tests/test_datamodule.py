"""ImageDataModule: embedded digits, and tiny files in the real MNIST / CIFAR / image-folder formats."""

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import ImageDataModule
from datamodules.image_datamodule import stratified_split

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the network through torchvision fails the test."""
    import torchvision.datasets.mnist as tv_mnist
    import torchvision.datasets.utils as tv_utils

    def forbidden(*args: object, **kwargs: object) -> None:
        pytest.fail(f"download attempted: {args}")

    for module in (tv_utils, tv_mnist):
        for fn in ("download_and_extract_archive", "download_url", "download_file_from_google_drive"):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, forbidden)
    monkeypatch.setattr("urllib.request.urlopen", forbidden)


# ---------------------------------------------------------------- writers of the real formats
def write_idx(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """IDX files as published: big-endian magic 2051 (images) / 2049 (labels), then dims, then uint8."""
    raw.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def make_mnist(root: Path, sub: str = "MNIST") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", 20), ("t10k", 10)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255  # both extremes present
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / sub / "raw", prefix, images, labels)
        out[prefix] = (images, labels)
    return out


def dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(root: Path) -> np.ndarray:
    """Five 4-image train batches and a 6-image test batch; returns the first train image as (3, 32, 32)."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    first = None
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        if first is None:
            first = data[0].reshape(3, 32, 32)
        dump(folder / f"data_batch_{i}", {b"batch_label": b"x", b"labels": [(i + k) % 10 for k in range(4)],
                                          b"data": data, b"filenames": [b"f"] * 4})
    test = rng.integers(0, 256, size=(6, 3072), dtype=np.uint8)
    dump(folder / "test_batch", {b"labels": [9, 8, 7, 6, 5, 4], b"data": test})
    dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072})
    return first


def make_cifar100(root: Path) -> None:
    rng = np.random.default_rng(2)
    folder = root / "cifar-100-python"
    dump(folder / "train", {b"data": rng.integers(0, 256, size=(12, 3072), dtype=np.uint8),
                            b"fine_labels": list(range(0, 96, 8)), b"coarse_labels": [0] * 12})
    dump(folder / "test", {b"data": rng.integers(0, 256, size=(5, 3072), dtype=np.uint8),
                           b"fine_labels": [99, 1, 2, 3, 4], b"coarse_labels": [0] * 5})
    dump(folder / "meta", {b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                           b"coarse_label_names": [b"c"] * 20})


def make_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "owl"), per_class: int = 6) -> None:
    rng = np.random.default_rng(3)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
            img = Image.fromarray(arr) if i else Image.fromarray(arr[..., 0], mode="L")  # one greyscale
            img.save(root / c / f"{i}.png")


# ---------------------------------------------------------------- digits
def test_digits_split_values_and_attributes() -> None:
    dm = ImageDataModule("digits", batch_size=64)
    assert (dm.num_classes, dm.image_size, dm.channels) == (10, 8, 1)
    assert dm.dataset_id == "digits-8px-c1-seed0-val0.15"
    assert dm.class_names == [str(i) for i in range(10)]
    xt, yt = dm.split_tensors("train")
    xv, yv = dm.split_tensors("val")
    assert len(xt) + len(xv) == 1797 and 0.1 < len(xv) / 1797 < 0.2
    assert xt.shape[1:] == (1, 8, 8) and xt.dtype == torch.float32 and yt.dtype == torch.int64
    allx = torch.cat([xt, xv])
    assert allx.min() == -1.0 and allx.max() == 1.0
    assert set(torch.cat([yt, yv]).tolist()) == set(range(10))
    xs, ys = dm.split_tensors("test")  # test == val
    assert torch.equal(xs, xv) and torch.equal(ys, yv)


def test_digits_split_disjoint_and_used_by_module() -> None:
    from sklearn.datasets import load_digits

    labels = torch.as_tensor(load_digits().target)
    tr, va = stratified_split(labels, 0.15, seed=0)
    assert not set(tr.tolist()) & set(va.tolist()) and len(tr) + len(va) == 1797
    assert sorted(tr.tolist() + va.tolist()) == list(range(1797))
    images = torch.as_tensor(load_digits().images).unsqueeze(1).float() / 8 - 1
    xv, yv = ImageDataModule("digits", seed=0).split_tensors("val")
    assert torch.equal(xv, images[va]) and torch.equal(yv, labels[va])


def test_digits_split_deterministic_per_seed() -> None:
    a = ImageDataModule("digits", seed=0).split_tensors("val")
    b = ImageDataModule("digits", seed=0).split_tensors("val")
    c = ImageDataModule("digits", seed=1).split_tensors("val")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert ImageDataModule("digits", seed=1).dataset_id != ImageDataModule("digits", seed=0).dataset_id


def test_digits_resize_and_no_flip() -> None:
    dm = ImageDataModule("digits", image_size=16)
    assert dm.image_size == 16 and dm.dataset_id.startswith("digits-16px")
    x, _ = dm.split_tensors("val")
    assert x.shape[1:] == (1, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert ImageDataModule("digits").hflip is False
    for name in ("digits", "mnist", "fashion_mnist"):
        with pytest.raises(ValueError, match="hflip"):
            ImageDataModule(name, hflip=True)


def test_digits_train_dataloader_batch() -> None:
    dm = ImageDataModule("digits", batch_size=32)
    dm.setup("fit")
    loader = dm.train_dataloader()
    x, y = next(iter(loader))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    assert loader.drop_last and len(loader) == len(dm.train_dataset) // 32
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape[1:] == (1, 8, 8) and yv.dtype == torch.int64
    ex, ey = next(iter(dm.eval_dataloader("train", batch_size=7)))
    assert ex.shape == (7, 1, 8, 8) and torch.equal(ex, dm.split_tensors("train")[0][:7])


def test_unknown_name_and_split() -> None:
    with pytest.raises(ValueError, match="digits.*mnist.*fashion_mnist.*cifar10.*cifar100.*folder"):
        ImageDataModule("imagenet")
    with pytest.raises(ValueError, match="split"):
        ImageDataModule("digits").split_tensors("holdout")


# ---------------------------------------------------------------- MNIST / Fashion-MNIST
@pytest.mark.parametrize("name,sub", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_files(tmp_path: Path, no_download: None, name: str, sub: str) -> None:
    raw = make_mnist(tmp_path, sub)
    dm = ImageDataModule(name, data_dir=str(tmp_path), batch_size=8)
    assert (dm.num_classes, dm.image_size, dm.channels) == (10, 28, 1)
    assert dm.dataset_id.startswith(f"{name}-28px-c1-official-")  # + a fingerprint of the files
    xt, yt = dm.split_tensors("train")
    xv, yv = dm.split_tensors("val")
    assert xt.shape == (20, 1, 28, 28) and xv.shape == (10, 1, 28, 28)
    assert xt.min() == -1.0 and xt.max() == 1.0
    assert torch.equal(yt, torch.as_tensor(raw["train"][1], dtype=torch.long))
    assert torch.equal(yv, torch.as_tensor(raw["t10k"][1], dtype=torch.long))
    expected = torch.as_tensor(raw["train"][0][3]).float() / 127.5 - 1
    assert torch.allclose(xt[3, 0], expected, atol=1e-6)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64


def test_mnist_resize(tmp_path: Path, no_download: None) -> None:
    make_mnist(tmp_path)
    dm = ImageDataModule("mnist", data_dir=str(tmp_path), image_size=32)
    x, _ = dm.split_tensors("val")
    assert x.shape == (10, 1, 32, 32) and x.min() >= -1 and x.max() <= 1


# ---------------------------------------------------------------- CIFAR
def test_cifar10_pickles(tmp_path: Path, no_download: None) -> None:
    first = make_cifar10(tmp_path)
    dm = ImageDataModule("cifar10", data_dir=str(tmp_path), batch_size=8)
    assert (dm.num_classes, dm.image_size, dm.channels) == (10, 32, 3) and dm.hflip is True
    assert dm.class_names == CIFAR10_NAMES
    xt, yt = dm.split_tensors("train")
    xv, yv = dm.split_tensors("test")
    assert xt.shape == (20, 3, 32, 32) and xv.shape == (6, 3, 32, 32)
    assert yt[:4].tolist() == [1, 2, 3, 4] and yv.tolist() == [9, 8, 7, 6, 5, 4]
    # Channel-major rows (1024 R, 1024 G, 1024 B) round-trip exactly, unflipped in split_tensors.
    assert torch.allclose(xt[0], torch.as_tensor(first).float() / 127.5 - 1, atol=1e-6)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_cifar10_train_flip_only_on_train(tmp_path: Path, no_download: None) -> None:
    make_cifar10(tmp_path)
    dm = ImageDataModule("cifar10", data_dir=str(tmp_path), batch_size=20)
    dm.setup("fit")
    clean, _ = dm.split_tensors("train")
    torch.manual_seed(0)
    x, y = next(iter(dm._loader(dm.train_dataset, 20, shuffle=False, drop_last=False)))
    flipped = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(x, clean)])
    same = torch.tensor([torch.equal(a, b) for a, b in zip(x, clean)])
    assert bool((flipped | same).all()) and 0 < int(flipped.sum()) < 20
    assert torch.equal(next(iter(dm.val_dataloader()))[0], dm.split_tensors("val")[0])
    no_flip = ImageDataModule("cifar10", data_dir=str(tmp_path), hflip=False, batch_size=20)
    no_flip.setup()
    assert torch.equal(no_flip.train_dataset.__getitems__(list(range(20)))[0], clean)


def test_cifar100_pickles(tmp_path: Path, no_download: None) -> None:
    make_cifar100(tmp_path)
    dm = ImageDataModule("cifar100", data_dir=str(tmp_path), image_size=16)
    assert (dm.num_classes, dm.image_size, dm.channels) == (100, 16, 3)
    assert dm.class_names[99] == "class99" and len(dm.class_names) == 100
    xt, yt = dm.split_tensors("train")
    xv, yv = dm.split_tensors("val")
    assert xt.shape == (12, 3, 16, 16) and yt.tolist() == list(range(0, 96, 8))
    assert yv.tolist() == [99, 1, 2, 3, 4] and xv.min() >= -1 and xv.max() <= 1


def test_cifar_download_goes_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download(url: str, download_root: str, **kwargs: object) -> None:
        calls.append((url, kwargs.get("md5")))
        make_cifar10(Path(download_root))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    dm = ImageDataModule("cifar10", data_dir=str(tmp_path), download=True)  # no error: download pending
    dm.prepare_data()
    dm.setup()
    assert len(calls) == 1 and calls[0][0].endswith("cifar-10-python.tar.gz") and calls[0][1]
    assert len(dm.train_dataset) == 20
    dm.prepare_data()  # files present: no second download
    assert len(calls) == 1


# ---------------------------------------------------------------- missing files offline
@pytest.mark.parametrize("name,sub,file", [
    ("mnist", "MNIST/raw", "train-images-idx3-ubyte"),
    ("fashion_mnist", "FashionMNIST/raw", "t10k-labels-idx1-ubyte"),
    ("cifar10", "cifar-10-batches-py", "data_batch_1"),
    ("cifar100", "cifar-100-python", "train"),
])
def test_missing_files_offline(tmp_path: Path, no_download: None, name: str, sub: str, file: str) -> None:
    with pytest.raises(FileNotFoundError) as err:
        ImageDataModule(name, data_dir=str(tmp_path))
    msg = str(err.value)
    assert file in msg and str(tmp_path / sub) in msg and "--data.download=true" in msg
    assert not any(tmp_path.iterdir())  # nothing was fetched or created


def test_partially_missing_cifar_names_only_missing(tmp_path: Path, no_download: None) -> None:
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3") as err:
        ImageDataModule("cifar10", data_dir=str(tmp_path))
    assert "data_batch_1" not in str(err.value)


# ---------------------------------------------------------------- image folder
def test_image_folder_seeded_split(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs")
    dm = ImageDataModule("folder", data_dir=str(tmp_path / "imgs"), batch_size=4, val_fraction=0.34)
    assert (dm.num_classes, dm.channels, dm.image_size) == (3, 3, 10) and dm.hflip is True
    assert dm.class_names == ["cat", "dog", "owl"]
    assert dm.dataset_id.startswith("folder-imgs-") and "10px-c3-seed0-val0.34" in dm.dataset_id
    xt, yt = dm.split_tensors("train")
    xv, yv = dm.split_tensors("val")
    assert len(xt) + len(xv) == 18 and yv.bincount().tolist() == [2, 2, 2]
    assert xt.shape[1:] == (3, 10, 10) and xt.min() >= -1 and xt.max() <= 1 and yt.dtype == torch.int64
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 10, 10) and x.dtype == torch.float32 and y.dtype == torch.int64
    again = ImageDataModule("folder", data_dir=str(tmp_path / "imgs"), val_fraction=0.34).split_tensors("val")
    assert torch.equal(again[0], xv)


def test_image_folder_train_val_dirs_and_resize(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", per_class=3)
    make_folder(tmp_path / "val", classes=("dog", "owl"), per_class=2)  # a class may be absent from val
    dm = ImageDataModule("folder", data_dir=str(tmp_path), image_size=8)
    assert dm.num_classes == 3 and "trainval" in dm.dataset_id
    xt, yt = dm.split_tensors("train")
    xv, yv = dm.split_tensors("val")
    assert xt.shape == (9, 3, 8, 8) and yt.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert xv.shape == (4, 3, 8, 8) and yv.tolist() == [1, 1, 2, 2]  # labels follow train's class order


def test_image_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ImageDataModule("folder", data_dir=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="class"):
        ImageDataModule("folder", data_dir=str(tmp_path / "empty"))


def test_on_device_batches_cover_the_epoch_and_split_ranks(tmp_path: Path, no_download: None) -> None:
    """Data kept on the accelerator: every epoch is a fresh permutation, ranks take disjoint equal shares,
    images are the same transform of the same data (flips included), and bad combinations are refused."""
    from datamodules.datasets import DeviceBatches, TensorImageDataset

    make_cifar10(tmp_path)
    dm = ImageDataModule("cifar10", data_dir=str(tmp_path), batch_size=4, on_device=True)
    loader = dm.train_dataloader()  # no trainer attached: the CPU is "the device"
    clean, labels = dm.split_tensors("train")
    batches = list(loader)
    assert len(batches) == len(loader) == 5 and all(x.shape == (4, 3, 32, 32) for x, _ in batches)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    # Each image is a (possibly mirrored) training image; label order follows the same permutation.
    match = [next(i for i in range(20) if torch.equal(a, clean[i]) or torch.equal(a, clean[i].flip(-1)))
             for a in x]
    assert sorted(match) == list(range(20)) and torch.equal(y, labels[match])
    epochs = iter(range(3))
    ds = TensorImageDataset(torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1), torch.arange(20), 255, 1, False)
    shards = [DeviceBatches(ds, 3, True, seed=0, epoch=lambda: 0, rank=r, world=2) for r in range(2)]
    seen = [torch.cat([b for _, b in s]).tolist() for s in shards]
    assert [len(s) for s in shards] == [3, 3] and len(seen[0]) == len(seen[1]) == 9
    assert not set(seen[0]) & set(seen[1])  # the two ranks never train on the same image in an epoch
    perm_a = torch.cat([b for _, b in DeviceBatches(ds, 20, False, 0, lambda: next(epochs))])
    perm_b = torch.cat([b for _, b in DeviceBatches(ds, 20, False, 0, lambda: next(epochs))])
    assert not torch.equal(perm_a, perm_b)  # a new order each epoch
    with pytest.raises(ValueError, match="num_workers=0"):
        ImageDataModule("cifar10", data_dir=str(tmp_path), on_device=True, num_workers=2)
