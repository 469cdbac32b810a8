"""Data problems found at setup, before any training: content-keyed dataset ids (edits that keep size and mtime),
datasets with fewer than two classes, and corrupt image files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import ImageDataModule
from datamodules.sources import load_pickle
from lightning_modules.diffusion import OptionError
from lightning_modules.evaluation.metrics import reference_cache_path, reference_features

from .test_datamodule import dump, make_cifar10, make_folder
from .test_metrics import ToyExtractor


def bmp_folder(root: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 3, seed: int = 0) -> None:
    """BMPs are uncompressed: the byte size depends only on the image's size, so pixels can change alone."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)).save(root / c / f"{i}.bmp")


def overwrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """What `cp -p` / `rsync -a` leave behind: other bytes, the same size and the same timestamps."""
    st = path.stat()
    assert len(data) == st.st_size and data != path.read_bytes()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


# ------------------------------------------------------------------------------- content fingerprints
def test_image_edited_with_size_and_mtime_kept_is_not_served_stale_reference_features(tmp_path: Path) -> None:
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    bmp_folder(root)

    def features(dm: ImageDataModule) -> tuple[torch.Tensor, torch.Tensor, ToyExtractor]:
        ext = ToyExtractor()  # what the sweep does: the cache key is the dataset id plus the split
        feats = reference_features(dm.eval_dataloader("train"), ext, cache, f"{dm.dataset_id}-train")
        return feats, ToyExtractor().extract(dm.split_tensors("train")[0])[0], ext

    before = ImageDataModule("folder", data_dir=str(root), val_fraction=0.34)
    old, _, _ = features(before)
    assert features(ImageDataModule("folder", data_dir=str(root), val_fraction=0.34))[2].calls == 0  # cached
    img = root / "a" / "0.bmp"
    other = tmp_path / "other.bmp"
    Image.fromarray(np.full((6, 6, 3), 7, dtype=np.uint8)).save(other)
    overwrite_keeping_size_and_mtime(img, other.read_bytes())

    after = ImageDataModule("folder", data_dir=str(root), val_fraction=0.34)
    assert after.dataset_id != before.dataset_id
    key = ToyExtractor().extractor_id
    assert reference_cache_path(cache, f"{after.dataset_id}-train", key) != reference_cache_path(
        cache, f"{before.dataset_id}-train", key)
    cached, expected, ext = features(after)
    assert ext.calls > 0  # recomputed, not loaded
    torch.testing.assert_close(cached, expected)
    assert not torch.equal(cached, old)


def test_cifar_batch_edited_with_size_and_mtime_kept_changes_the_dataset_id(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    before = ImageDataModule("cifar10", data_dir=str(tmp_path)).dataset_id
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    entry = load_pickle(batch)
    # The images in reverse order: the same bytes in another order keep the pickle's size exactly.
    edited = tmp_path / "edited"
    dump(edited, {b"batch_label": b"x", b"labels": entry["labels"][::-1], b"data": entry["data"][::-1].copy(),
                  b"filenames": [b"f"] * 4})
    overwrite_keeping_size_and_mtime(batch, edited.read_bytes())
    dm = ImageDataModule("cifar10", data_dir=str(tmp_path))
    assert dm.dataset_id != before and dm.dataset_id.startswith("cifar10-32px-c3-official-")
    images = torch.as_tensor(entry["data"][::-1].copy()).reshape(-1, 3, 32, 32).float() / 127.5 - 1
    torch.testing.assert_close(dm.split_tensors("train")[0][8:12], images)  # the edited data are read


def test_dataset_id_is_hashed_once_per_data_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datamodules.sources as sources

    bmp_folder(tmp_path)
    calls = []
    real = sources._hash_and_check
    monkeypatch.setattr(sources, "_hash_and_check", lambda p: calls.append(p) or real(p))
    dm = ImageDataModule("folder", data_dir=str(tmp_path), val_fraction=0.34)
    first = dm.dataset_id
    dm.setup()
    dm.split_tensors("val")
    assert dm.dataset_id == first and len(calls) == 6  # each image read once, for id and check together


# ------------------------------------------------------------------------------- fewer than two classes
def test_one_class_folder_is_an_option_error(tmp_path: Path) -> None:
    bmp_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(OptionError, match="at least 2 classes") as err:
        ImageDataModule("folder", data_dir=str(tmp_path / "one"))
    assert err.value.option == "data.data_dir" and "Fix:" in str(err.value)
    # Two class folders, but one without images: found at setup, before any training.
    bmp_folder(tmp_path / "two", classes=("cat",))
    (tmp_path / "two" / "dog").mkdir()
    (tmp_path / "two" / "dog" / "notes.txt").write_text("not an image")
    dm = ImageDataModule("folder", data_dir=str(tmp_path / "two"))
    with pytest.raises(OptionError, match="cat") as err:
        dm.setup()
    assert err.value.option == "data.data_dir"
    with pytest.raises(OptionError):  # a retried setup fails the same way
        dm.train_dataloader()


def test_one_class_cifar_is_an_option_error(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        dump(tmp_path / "cifar-10-batches-py" / f"data_batch_{i}",
             {b"labels": [2] * 4, b"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)})
    with pytest.raises(OptionError, match="at least 2 classes") as err:
        ImageDataModule("cifar10", data_dir=str(tmp_path)).setup()
    assert err.value.option == "data.data_dir" and "[2]" in str(err.value)


# ------------------------------------------------------------------------------- corrupt images
def test_corrupt_images_are_named_at_setup(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    make_folder(root, per_class=3)  # PNGs
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(root / "dog" / "photo.jpg")
    ImageDataModule("folder", data_dir=str(root)).setup()  # all good

    truncated_png, garbage = root / "cat" / "1.png", root / "owl" / "2.png"
    truncated_png.write_bytes(truncated_png.read_bytes()[:-60])
    garbage.write_bytes(b"definitely not a png" * 10)
    jpg = root / "dog" / "photo.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    flipped = root / "dog" / "2.png"
    data = bytearray(flipped.read_bytes())
    data[data.index(b"IDAT") + 10] ^= 0xFF  # a bit error inside the pixel data: the chunk CRC tells
    flipped.write_bytes(bytes(data))

    dm = ImageDataModule("folder", data_dir=str(root))  # construction reads one header only
    with pytest.raises(OptionError) as err:
        dm.setup()
    msg = str(err.value)
    assert err.value.option == "data.data_dir" and msg.count("Fix:") == 1 and "4 image(s)" in msg
    for bad in (truncated_png, garbage, jpg, flipped):
        assert str(bad) in msg, bad
    assert str(root / "cat" / "0.png") not in msg
    assert dm.train_dataset is None  # nothing to train on was built


def test_unreadable_first_image_is_an_option_error_at_construction(tmp_path: Path) -> None:
    bmp_folder(tmp_path)
    (tmp_path / "a" / "0.bmp").write_bytes(b"BM not really")
    with pytest.raises(OptionError, match="0.bmp") as err:
        ImageDataModule("folder", data_dir=str(tmp_path))  # the size is read from the first image
    assert err.value.option == "data.data_dir"
    with pytest.raises(OptionError, match="0.bmp"):  # with a size given, the setup scan finds it
        ImageDataModule("folder", data_dir=str(tmp_path), image_size=6, val_fraction=0.34).setup()
