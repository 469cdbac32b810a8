"""Raw-source readers behind ImageDataModule: file layouts, the CIFAR restricted unpickler, the MNIST / CIFAR
split reader, the image-folder scan, and the content fingerprint that keys the reference-feature and
evaluator caches.

The fingerprint hashes file *contents*: a stat-based key (size, mtime) is kept by `cp -p` / `rsync -a`, so
edited images would be served stale cached features. There is deliberately no hash cache across runs: one
keyed by (path, size, mtime, inode) would bring that bug back.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import torch
from PIL import Image
from torch import Tensor

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# name -> (sub-folder, train files, test files, meta file, meta key for class names, label key)
CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "label_names", "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels"),
}
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CHUNK = 1 << 20  # files are streamed through the hash in 1 MiB chunks: a large batch file never sits in memory
# hashlib and PIL's decoders release the GIL: a few threads overlap file reads and hashing.
_WORKERS = min(8, os.cpu_count() or 1)


def _hash_stream(f: BinaryIO) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 hex of a file's bytes, streamed in chunks; "missing" for an absent file or a dangling link."""
    try:
        with open(path, "rb") as f:  # follows links, as the loaders do
            return _hash_stream(f)
    except OSError:  # absent: still part of the identity
        return "missing"


def _check_image(f: BinaryIO) -> None:
    """Raise if PIL cannot read the open image file: verify() checks the structure (PNG chunk CRCs), then a
    decode finds truncated or garbled pixel data; JPEGs decode at 1/8 scale (draft), which still reads every
    coded byte, so the check stays cheap for large photos."""
    with Image.open(f) as img:
        img.verify()
    f.seek(0)
    with Image.open(f) as img:
        img.draft("RGB", (1, 1))
        img.load()


def _hash_and_check(path: Path) -> tuple[str, str | None]:
    """(SHA-256 hex, None) of a readable image, or (digest, reason) when it is not: one open per file."""
    try:
        with open(path, "rb") as f:
            digest = _hash_stream(f)
            f.seek(0)
            try:
                _check_image(f)
            except Exception as err:  # UnidentifiedImageError, truncated data, bad CRC, decompression bomb...
                return digest, f"{type(err).__name__}: {err}"
            return digest, None
    except OSError as err:
        return "missing", f"{type(err).__name__}: {err}"


def _combine(base: Path, entries: Sequence[tuple[Path, str]], salt: str, digests: Callable) -> tuple[str, list]:
    """12 hex of SHA-256 over (relative path, label, SHA-256 of the bytes) in sorted relative-path order.

    Each file's own digest stands in for its bytes so files can be hashed in parallel: any changed byte,
    renamed, added or removed file, or relabelling changes the result.
    """
    rows = sorted((p.relative_to(base).as_posix(), label, p) for p, label in entries)
    with ThreadPoolExecutor(_WORKERS) as pool:
        results = list(pool.map(digests, [p for _, _, p in rows]))
    h = hashlib.sha256(salt.encode())
    bad = []
    for (rel, label, path), result in zip(rows, results):
        digest, problem = result if isinstance(result, tuple) else (result, None)
        h.update(f"{rel}\0{label}\0{digest}\n".encode())
        if problem is not None:
            bad.append((path, problem))
    return h.hexdigest()[:12], bad


def content_fingerprint(base: Path, paths: Iterable[Path], salt: str = "") -> str:
    """12 hex of a hash over every file's relative path and bytes (labels live inside these files)."""
    return _combine(base, [(p, "") for p in paths], salt, file_sha256)[0]


def scan_images(base: Path, samples: Iterable[tuple[str, int]], salt: str = "") -> tuple[str, list[tuple[Path, str]]]:
    """(fingerprint, bad files) of image-folder samples (path, label): every file is hashed and checked to
    decode in the same single read, so a corrupt image is found at setup, not mid-epoch."""
    return _combine(base, [(Path(p), str(y)) for p, y in samples], salt, _hash_and_check)


# Globals a CIFAR batch may name: numpy array/scalar reconstruction (numpy 1 and 2 module paths), builtin
# containers (Python 2 names too: find_class sees them before pickle's own renaming) and _codecs.encode,
# which Python 3 uses to write bytes at protocol <= 2. Anything else (os.system, eval, ...) is refused.
PICKLE_ALLOWED = {
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((mod, name) for mod in ("builtins", "__builtin__") for name in ("set", "frozenset", "bytearray")),
}


class CifarUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only `PICKLE_ALLOWED`: a crafted batch file cannot run code."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in PICKLE_ALLOWED:
            raise pickle.UnpicklingError(
                f"{self._path}: refused global {module}.{name} - a CIFAR batch holds only numpy arrays, lists "
                "and dicts, so this file is not an official CIFAR pickle (tampered or wrong file). Fix: delete "
                "it and re-extract the official archive (or pass --data.download=true).")
        return super().find_class(module, name)


def load_pickle(path: Path) -> dict:
    """A CIFAR batch or meta file as a dict with str keys, through the restricted unpickler."""
    # The official files are Python 2 pickles: encoding="bytes" is what the CIFAR page prescribes; keys and
    # strings then come back as bytes, which we decode so Python-3-written files read the same way.
    # Plain pickle.load would execute whatever a crafted file names: the restricted unpickler refuses it.
    with open(path, "rb") as f:
        raw = CifarUnpickler(f, path).load()
    if not isinstance(raw, dict):
        raise pickle.UnpicklingError(f"{path}: expected a dict (a CIFAR batch), got {type(raw).__name__}. "
                                     "Fix: re-extract the official archive.")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def load_split(name: str, data_dir: Path, train: bool) -> tuple[Tensor, Tensor]:
    """The official split of MNIST / Fashion-MNIST / CIFAR in `data_dir` as (uint8 (N, C, H, W), int64 (N,))."""
    if name in ("mnist", "fashion_mnist"):
        import torchvision.datasets as tvd

        # torchvision's own IDX reader; it checks only that the raw files exist (no md5).
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        ds = cls(str(data_dir), train=train, download=False)
        return ds.data.unsqueeze(1).contiguous(), ds.targets.long()
    # CIFAR: torchvision's CIFAR10/100 verify the md5 of every pickle on load, which rejects any tiny
    # test file in the real format; the format itself is a few lines to read, so we read it here and
    # use torchvision only to download.
    folder, train_files, test_files, _, _, label_key = CIFAR[name]
    images, labels = [], []
    for fname in train_files if train else test_files:
        entry = load_pickle(data_dir / folder / fname)
        images.append(torch.as_tensor(entry["data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(entry[label_key], dtype=torch.long))
    return torch.cat(images), torch.cat(labels)
