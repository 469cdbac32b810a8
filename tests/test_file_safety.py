"""Files read from disk cannot run code, corrupt caches are rebuilt, and cache keys fingerprint the data."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lightning_modules.evaluation.evaluator as evaluator_mod
from datamodules import ImageDataModule
from lightning_modules.evaluation import INCEPTION_WEIGHTS_FILENAME, InceptionExtractor, load_or_train_evaluator
from lightning_modules.evaluation.metrics import reference_cache_path, reference_features

from .test_datamodule import dump, make_cifar10, make_folder, make_mnist
from .test_metrics import ToyExtractor


class Payload:
    """Unpickling this calls `fn(*args)`: a stand-in for `os.system(...)` whose only effect is creating a file."""

    def __init__(self, fn: object, *args: object) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return self.fn, self.args


def payloads(marker: Path) -> list[Payload]:
    return [Payload(open, str(marker), "w"), Payload(eval, f"open({str(marker)!r}, 'w')")]


# ------------------------------------------------------------------------------------- CIFAR pickles
@pytest.mark.parametrize("which,name", [(0, "io.open"), (1, "__builtin__.eval")])  # protocol 2 spells builtins so
def test_cifar_pickle_that_runs_code_is_refused(tmp_path: Path, which: int, name: str) -> None:
    make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    dump(batch, {b"labels": [0], b"data": payloads(marker)[which]})
    dm = ImageDataModule("cifar10", data_dir=str(tmp_path))
    with pytest.raises(pickle.UnpicklingError) as err:
        dm.setup()
    msg = str(err.value)
    assert str(batch) in msg and f"refused global {name}" in msg and "re-extract" in msg
    assert not marker.exists()  # refused before anything ran


def test_cifar_pickle_numpy1_module_paths_still_load(tmp_path: Path) -> None:
    """The official files were written by numpy 1 (`numpy.core.multiarray`); numpy 2 writes `numpy._core`."""
    make_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    data = batch.read_bytes()
    assert b"numpy._core.multiarray\n_reconstruct" in data  # protocol 2: text GLOBALs, safe to rewrite
    batch.write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    xv, yv = ImageDataModule("cifar10", data_dir=str(tmp_path)).split_tensors("val")
    assert xv.shape == (6, 3, 32, 32) and yv.tolist() == [9, 8, 7, 6, 5, 4]


# ------------------------------------------------------------------------------------ Inception weights
def test_inception_weights_that_run_code_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "inception.pth"
    torch.save({"fc.weight": torch.zeros(2), "x": payloads(marker)[0]}, path)
    # Named by its own SHA-256 too: the hash check passes, weights_only loading must still refuse it.
    named = tmp_path / f"inception-{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}.pth"
    shutil.copy(path, named)
    for p in (path, named):
        with pytest.raises(ValueError, match="not a plain state dict") as err:
            InceptionExtractor(p)
        assert str(p) in str(err.value)
    assert not marker.exists()


def test_inception_weights_with_wrong_hash_are_refused(tmp_path: Path) -> None:
    path = tmp_path / INCEPTION_WEIGHTS_FILENAME  # name says SHA-256 6726825d...
    torch.save({"fc.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="6726825d") as err:
        InceptionExtractor(path)
    msg = str(err.value)
    assert str(path) in msg and "SHA-256" in msg and "wrong file" in msg and "download" in msg


def test_inception_weights_truncated_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "inception-copy.pth"
    torch.save({"fc.weight": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt") as err:
        InceptionExtractor(path)
    assert str(path) in str(err.value)


def test_torch_fidelity_gets_the_verified_tensors_not_the_path(tmp_path: Path, monkeypatch) -> None:
    """torch-fidelity loads with weights_only=False: it must never open the file itself (no TOCTOU)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    seen = {}

    class Recorder(nn.Module):
        def __init__(self, name: str, features: list, feature_extractor_weights_path: object, **kwargs: object):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))
            seen["source"] = feature_extractor_weights_path

    monkeypatch.setattr(fe, "FeatureExtractorInceptionV3", Recorder)
    state = {"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}
    path = tmp_path / "inception-local.pth"
    torch.save(state, path)
    ext = InceptionExtractor(path)
    source = seen["source"]
    assert not isinstance(source, (str, os.PathLike)) and isinstance(source, io.BytesIO)
    loaded = torch.load(source, weights_only=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert ext.extractor_id == f"inception-v3-compat-sha256-{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"


# ------------------------------------------------------------------------------------ corrupt caches
def test_corrupt_reference_cache_is_recomputed_and_rewritten(tmp_path: Path, caplog) -> None:
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ext = ToyExtractor()
    good = reference_features(x, ext, tmp_path, key="k")
    path = reference_cache_path(tmp_path, "k", ext.extractor_id)
    valid = path.read_bytes()
    wrong_shape = io.BytesIO()
    torch.save({"features": torch.zeros(10, 3), "extractor_id": ext.extractor_id, "key": "k"}, wrong_shape)
    for bad in (b"garbage, not a torch file", valid[: len(valid) // 2], wrong_shape.getvalue()):
        path.write_bytes(bad)
        calls = ext.calls
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            torch.testing.assert_close(reference_features(x, ext, tmp_path, key="k"), good)
        assert ext.calls > calls  # recomputed, not served
        assert str(path) in caplog.text and "recomputing" in caplog.text
        blob = torch.load(path, weights_only=True)  # rewritten: a valid cache again
        torch.testing.assert_close(blob["features"], good)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_corrupt_evaluator_cache_is_retrained_and_rewritten(tmp_path: Path, monkeypatch, caplog) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:300], dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target[:300], dtype=torch.long)
    args = (x[:200], y[:200], x[200:], y[200:])
    ev = load_or_train_evaluator(*args, num_classes=10, cache_dir=tmp_path, dataset_id="tiny", steps=5)
    (path,) = tmp_path.glob("evaluator-tiny-*.pt")
    valid = path.read_bytes()
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["head.weight"] = torch.zeros(3, 3)  # loads fine, does not fit the network
    misfit = io.BytesIO()
    torch.save(blob, misfit)
    trained = []
    real_train = evaluator_mod.train_evaluator
    monkeypatch.setattr(evaluator_mod, "train_evaluator", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    for bad in (b"garbage, not a torch file", valid[: len(valid) // 2], misfit.getvalue()):
        path.write_bytes(bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = load_or_train_evaluator(*args, num_classes=10, cache_dir=tmp_path, dataset_id="tiny", steps=5)
        assert str(path) in caplog.text and "retraining" in caplog.text
        assert again.extractor_id == ev.extractor_id  # deterministic retraining: the same network
        assert torch.load(path, weights_only=True)["state_dict"].keys() == blob["state_dict"].keys()
    assert len(trained) == 3 and [p.name for p in tmp_path.iterdir()] == [path.name]


# ------------------------------------------------------------------------------- dataset fingerprints
SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


def test_folder_dataset_id_changes_with_the_images(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    make_folder(root, per_class=4)  # 12 images
    first = ImageDataModule("folder", data_dir=str(root), image_size=8).dataset_id
    assert first == ImageDataModule("folder", data_dir=str(root), image_size=8).dataset_id  # stable
    assert SAFE.match(first) and len(first) < 80
    shutil.rmtree(root)
    make_folder(root, per_class=8)  # 24 other images, same folder and class names
    second = ImageDataModule("folder", data_dir=str(root), image_size=8).dataset_id
    assert second != first and second.startswith("folder-imgs-")
    # The id is keyed by content: a touched file (same bytes, new mtime) is the same dataset...
    img = root / "cat" / "0.png"
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 1_000_000_000))
    assert ImageDataModule("folder", data_dir=str(root), image_size=8).dataset_id == second
    # ...and an image edited in place (same name) is another one (tests/test_data_safety.py: same size and mtime).
    shutil.copy(root / "dog" / "1.png", img)
    assert ImageDataModule("folder", data_dir=str(root), image_size=8).dataset_id != second


def test_changed_folder_images_are_not_served_from_the_reference_cache(tmp_path: Path) -> None:
    root, cache = tmp_path / "imgs", tmp_path / "cache"

    def features(dm: ImageDataModule) -> tuple[torch.Tensor, torch.Tensor]:
        # What the sweep does: the cache key is the dataset id plus the split.
        feats = reference_features(dm.eval_dataloader("train"), ToyExtractor(), cache, f"{dm.dataset_id}-train")
        return feats, ToyExtractor().extract(dm.split_tensors("train")[0])[0]

    make_folder(root, per_class=4)
    cached, expected = features(ImageDataModule("folder", data_dir=str(root), image_size=8))
    torch.testing.assert_close(cached, expected)
    shutil.rmtree(root)
    make_folder(root, per_class=8)
    cached, expected = features(ImageDataModule("folder", data_dir=str(root), image_size=8))
    assert cached.shape == expected.shape  # not the 12-image features of before
    torch.testing.assert_close(cached, expected)


def test_cifar_and_mnist_dataset_ids_fingerprint_the_files(tmp_path: Path) -> None:
    make_cifar10(tmp_path / "a")
    make_cifar10(tmp_path / "b")
    rng = np.random.default_rng(9)
    dump(tmp_path / "b" / "cifar-10-batches-py" / "test_batch",
         {b"labels": [1] * 7, b"data": rng.integers(0, 256, size=(7, 3072), dtype=np.uint8)})
    ids = [ImageDataModule("cifar10", data_dir=str(tmp_path / s)).dataset_id for s in "aab"]
    assert ids[0] == ids[1] != ids[2] and all(SAFE.match(i) for i in ids)
    assert ids[0].startswith("cifar10-32px-c3-official-")
    make_mnist(tmp_path / "m1")
    make_mnist(tmp_path / "m2")
    f = tmp_path / "m2" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    f.write_bytes(f.read_bytes() + b"\0")
    assert ImageDataModule("mnist", data_dir=str(tmp_path / "m1")).dataset_id != ImageDataModule(
        "mnist", data_dir=str(tmp_path / "m2")).dataset_id
    assert ImageDataModule("digits").dataset_id == "digits-8px-c1-seed0-val0.15"  # unchanged


# ------------------------------------------------------------------------------- up-front weights check
def test_corrupt_inception_weights_are_an_option_error_before_training(tmp_path: Path, monkeypatch) -> None:
    """The check GuidanceSweep.setup and experiments/sweep.py run before any training or sampling reads the
    file: truncated, garbage, mis-hashed or another network's weights name `sweep.inception_weights`."""
    import lightning_modules.evaluation.features as features
    from lightning_modules.diffusion import OptionError
    from lightning_modules.sweep.evaluation import check_extractor_available

    signature = {name: torch.zeros(shape, dtype=torch.float16) for name, shape in features._INCEPTION_SIGNATURE.items()}
    good = tmp_path / "inception-local.pth"
    torch.save(signature, good)
    truncated = tmp_path / "inception-truncated.pth"
    truncated.write_bytes(good.read_bytes()[:4096])
    garbage = tmp_path / "inception-garbage.pth"
    garbage.write_bytes(b"\x00garbage" * 64)
    misnamed = tmp_path / INCEPTION_WEIGHTS_FILENAME  # its name says SHA-256 6726825d...
    shutil.copy(good, misnamed)
    other = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(10, 512), "conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
    cases = ((truncated, "corrupt"), (garbage, "corrupt"), (misnamed, "6726825d"), (other, "not torch-fidelity"))
    for bad, says in cases:
        with pytest.raises(OptionError, match=says) as err:
            check_extractor_available("inception", str(bad))
        assert err.value.option == "sweep.inception_weights" and str(bad) in str(err.value)
        assert str(err.value).count("Fix:") == 1
    check_extractor_available("evaluator", str(garbage))  # the evaluator needs no weights file

    reads = []
    real = features.load_inception_state_dict
    monkeypatch.setattr(features, "load_inception_state_dict", lambda p: reads.append(p) or real(p))
    check_extractor_available("inception", str(good))
    check_extractor_available("inception", str(good))  # the callback's setup, then the sweep: read once
    assert len(reads) == 1
    torch.save({**signature, "fc.bias": torch.zeros(7)}, good)  # the file changed: verified again, and refused
    with pytest.raises(OptionError, match="fc.bias"):
        check_extractor_available("inception", str(good))
