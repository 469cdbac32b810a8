"""What samples and references are exchanged as between evaluators: 8-bit images, ADM-style `.npz` files, image
folders, label files and FID statistics files, each read and checked whole before any feature is computed.

- Samples `.npz` (guided-diffusion's `evaluations/evaluator.py` convention, also what `--sweep.save_samples`
  writes): `arr_0` uint8 (N, H, W, C) with C = 1 or 3 (an (N, H, W) array is grey), optional `arr_1` labels.
- Image folder: every PNG/JPEG directly inside it, in file-name order, all of one size.
- Statistics `.npz`: `mu` (d,) and `sigma` (d, d) of features (Inception-v3 pool features, d = 2048, as
  pytorch-fid, clean-fid and EDM write them; ADM's reference batches carry them beside `arr_0`).

Nothing is unpickled (`allow_pickle=False`). Every problem is an OptionError naming the argument (`option`) that
named the file, with the fix.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from lightning_modules.diffusion.options import OptionError
from lightning_modules.files import atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what a samples folder holds (lossless PNG, or JPEG as some tools write)
_GREY_MODES = ("1", "L")


def to_pixels(images: Tensor) -> Tensor:
    """Images in [-1, 1] (N, C, H, W) → uint8 of the same shape and device, rounded as torchvision's
    `save_image` rounds: what a PNG or an ADM-style `.npz` of the samples holds."""
    return ((images.detach().float() + 1) / 2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def from_pixels(pixels: Tensor) -> Tensor:
    """uint8 (N, C, H, W) → float32 in [-1, 1] (exact inverse of `to_pixels` on its values)."""
    return pixels.float() / 127.5 - 1


def nhwc_to_images(pixels: np.ndarray) -> Tensor:
    """uint8 (N, H, W, C) → float32 (N, C, H, W) in [-1, 1], as the extractors take them."""
    return from_pixels(torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2))


@dataclass(frozen=True)
class Statistics:
    """FID statistics read from a file, with the SHA-256 of its bytes (what keys a sweep's cells)."""

    mu: np.ndarray  # (d,) float64
    sigma: np.ndarray  # (d, d) float64
    sha256: str
    path: Path

    @property
    def dim(self) -> int:
        return len(self.mu)


def _file(path: str | Path, option: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise OptionError(option, f"{what} {str(path)!r} does not exist or is not a file", "pass an existing file")
    return p


def npz_keys(path: str | Path, option: str) -> list[str]:
    """The array names in an `.npz` (its zip listing: no array is read)."""
    p = _file(path, option, ".npz file")
    try:
        with zipfile.ZipFile(p) as archive:
            return [name[:-4] if name.endswith(".npy") else name for name in archive.namelist()]
    except (zipfile.BadZipFile, OSError) as err:
        raise OptionError(option, f"{p} is not an .npz file, or is truncated ({type(err).__name__}: {err})",
                          "pass an intact .npz written by numpy.savez") from None


def _arrays(path: Path, names: list[str], option: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in names}
    except ValueError as err:  # an object array: only pickle could read it, which could run code
        raise OptionError(option, f"{path} holds Python objects, not plain arrays ({err})",
                          "save plain numeric arrays (numpy.savez of uint8 images / float statistics)") from None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise OptionError(option, f"{path} cannot be read ({type(err).__name__}: {err})",
                          "pass an intact .npz written by numpy.savez") from None


def is_statistics_file(path: str | Path, option: str) -> bool:
    """An `.npz` with `mu` and `sigma` and no images (`arr_0`)."""
    keys = npz_keys(path, option)
    return {"mu", "sigma"} <= set(keys) and "arr_0" not in keys


def read_statistics(path: str | Path, option: str) -> Statistics:
    """`mu` and `sigma` of an `.npz`, checked: a (d,) mean, a (d, d) covariance, all finite."""
    p = _file(path, option, "statistics file")
    keys = npz_keys(p, option)
    if not {"mu", "sigma"} <= set(keys):
        raise OptionError(option, f"{p} holds {sorted(keys)}, not the FID statistics `mu` and `sigma`",
                          "pass an .npz with mu (d,) and sigma (d, d), as pytorch-fid, clean-fid and EDM write them")
    arrays = _arrays(p, ["mu", "sigma"], option)
    mu, sigma = arrays["mu"], arrays["sigma"]
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise OptionError(option, f"{p}: mu is {mu.dtype}, sigma {sigma.dtype}, not floating point",
                          "write the statistics as float arrays")
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise OptionError(option, f"{p}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (d,) and (d, d)",
                          "pass the mean and covariance of one feature space")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise OptionError(option, f"{p}: mu or sigma holds NaN or infinite values", "recompute the statistics")
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return Statistics(mu.astype(np.float64), sigma.astype(np.float64), digest.hexdigest(), p)


def check_images(images: np.ndarray, where: str, option: str) -> np.ndarray:
    """uint8 (N, H, W, C), C ∈ {1, 3} (an (N, H, W) array becomes C = 1), at least 2 images."""
    if images.dtype != np.uint8:
        raise OptionError(option, f"{where}: images are {images.dtype}, not uint8 (0..255)",
                          "save the images as uint8 (N, H, W, C), as ADM's sampling scripts do")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise OptionError(option, f"{where}: images have shape {images.shape}, not (N, H, W, C) with C = 1 or 3",
                          "save channels last: uint8 (N, H, W, 3) for colour, (N, H, W) or (N, H, W, 1) for grey")
    if len(images) < 2:
        raise OptionError(option, f"{where}: {len(images)} image(s); every metric needs at least 2",
                          "pass more samples")
    return images


def read_images_npz(path: str | Path, option: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 (N, H, W, C) images from `arr_0`, int64 labels from `arr_1` or None)."""
    p = _file(path, option, ".npz file")
    keys = npz_keys(p, option)
    if "arr_0" not in keys:
        stats = " (FID statistics: give it as the reference instead)" if {"mu", "sigma"} <= set(keys) else ""
        raise OptionError(option, f"{p} has no images `arr_0` (it holds {sorted(keys)}){stats}",
                          "save the samples as numpy.savez(path, images_uint8_nhwc, labels), i.e. arr_0 and arr_1")
    arrays = _arrays(p, [k for k in ("arr_0", "arr_1") if k in keys], option)
    images = check_images(arrays["arr_0"], str(p), option)
    labels = check_labels(arrays["arr_1"], len(images), f"{p} arr_1", option) if "arr_1" in arrays else None
    return images, labels


def check_labels(labels: np.ndarray, n: int, where: str, option: str) -> np.ndarray:
    """(n,) non-negative integer class labels as int64."""
    labels = np.asarray(labels)
    integral = np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all() and (labels == np.round(labels)).all())
    if labels.ndim != 1 or len(labels) != n or not integral or (len(labels) and labels.min() < 0):
        raise OptionError(option, f"{where}: labels of shape {labels.shape} ({labels.dtype}) for {n} images",
                          f"give {n} non-negative integer class labels, one per image, in the images' order")
    return labels.astype(np.int64)


def read_labels(path: str | Path, n: int, option: str) -> np.ndarray:
    """Labels from `.npy`, `.npz` (`arr_1`, else `labels`, else `arr_0`) or a text file of integers."""
    p = _file(path, option, "labels file")
    if p.suffix == ".npz":
        keys = npz_keys(p, option)
        key = next((k for k in ("arr_1", "labels", "arr_0") if k in keys), None)
        if key is None:
            raise OptionError(option, f"{p} holds {sorted(keys)}, no labels", "save them as arr_1 or labels")
        return check_labels(_arrays(p, [key], option)[key], n, f"{p} {key}", option)
    try:
        labels = np.load(p, allow_pickle=False) if p.suffix == ".npy" else np.loadtxt(p, dtype=np.float64, ndmin=1)
    except (ValueError, OSError) as err:
        raise OptionError(option, f"{p} cannot be read as labels ({type(err).__name__}: {err})",
                          "pass a .npy / .npz of integers, or a text file with one integer per image") from None
    return check_labels(labels, n, str(p), option)


def read_image_folder(path: str | Path, option: str) -> np.ndarray:
    """uint8 (N, H, W, C) of every PNG/JPEG directly in a folder, in file-name order: grey (C = 1) if every image
    is, else RGB. Sizes are checked from the headers before any image is decoded."""
    folder = Path(path)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise OptionError(option, f"{folder} holds no {'/'.join(IMAGE_SUFFIXES)} images",
                          "pass a folder of sample images (directly inside it), an .npz, or a sweep directory "
                          "with --cell")
    heads = [_header(f, option) for f in files]
    sizes = sorted({size for size, _ in heads})
    if len(sizes) > 1:
        first = {size: f for f, (size, _) in reversed(list(zip(files, heads)))}  # the first file of each size
        examples = "; ".join(f"{first[size].name} is {size[0]}x{size[1]}" for size in sizes[:3])
        raise OptionError(option, f"{folder} mixes image sizes {[f'{w}x{h}' for w, h in sizes]} ({examples})",
                          "pass samples of one size (resize them, or split the folder)")
    grey = all(mode in _GREY_MODES for _, mode in heads)
    pixels = [_decode(f, "L" if grey else "RGB", option) for f in files]
    return check_images(np.stack(pixels), str(folder), option)


def _header(path: Path, option: str) -> tuple[tuple[int, int], str]:
    try:
        with Image.open(path) as img:
            return img.size, img.mode
    except (UnidentifiedImageError, OSError) as err:
        raise OptionError(option, f"{path} cannot be read as an image ({type(err).__name__}: {err})",
                          "replace or delete it") from None


def _decode(path: Path, mode: str, option: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode), dtype=np.uint8).reshape(img.size[1], img.size[0], -1)
    except (OSError, ValueError) as err:  # truncated or corrupt pixel data
        raise OptionError(option, f"{path} cannot be decoded ({type(err).__name__}: {err})",
                          "replace or delete it") from None


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """numpy.savez of `arrays` (uncompressed, as ADM writes them), atomically: readers never see a partial file."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, buffer.getvalue())
