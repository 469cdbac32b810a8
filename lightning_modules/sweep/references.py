"""What samples from outside a sweep are compared with (`python -m experiments.evaluate --reference REF`): a data
set's split (exactly the sweep's: `build_evaluation`), images (a folder, an `.npz` with `arr_0`), or FID
statistics alone (`mu`, `sigma`). Read and checked by `read_reference` before anything is computed; turned into
the sweep's `Evaluation` by `reference_evaluation`.

What is computed against what: FID against the reference's (μ, Σ) — its images' own, or `reference_stats`' — and
KID and precision/recall against its features (not computed for statistics alone).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lightning_modules.diffusion import OptionError
from lightning_modules.evaluation import feature_statistics, reference_features
from lightning_modules.evaluation.metrics import reference_moments
from lightning_modules.evaluation.sample_files import (
    Statistics,
    is_statistics_file,
    nhwc_to_images,
    read_image_folder,
    read_images_npz,
    read_statistics,
)

from .evaluation import Evaluation, build_evaluation, build_extractor, check_statistics, with_reference_stats

OPTION = "reference"


@dataclass
class Reference:
    """A reference as given: a data set name, images (uint8 (N, H, W, C)) or statistics, one of them."""

    spec: str
    dataset: str | None = None
    images: np.ndarray | None = None
    stats: Statistics | None = None

    @property
    def kind(self) -> str:
        return "dataset" if self.dataset else "images" if self.images is not None else "statistics"


def read_reference(spec: str, datasets: tuple[str, ...]) -> Reference:
    """REF read and checked: one of `datasets`, a folder of images, an `.npz` of images or of statistics."""
    p = Path(spec)
    if spec in datasets and not p.exists():
        return Reference(spec, dataset=spec)
    if p.is_file() and p.suffix == ".npz":
        if is_statistics_file(p, OPTION):
            return Reference(spec, stats=read_statistics(p, OPTION))
        return Reference(spec, images=read_images_npz(p, OPTION)[0])
    if p.is_dir():
        return Reference(spec, images=read_image_folder(p, OPTION))
    raise OptionError(OPTION, f"{spec!r} is not a data set ({', '.join(datasets)}), an .npz or a folder of images",
                      "pass one of those")


def reference_evaluation(ref: Reference, kind: str, data, cache_dir: str | Path, inception_weights: str | None,
                         split: str, device: torch.device, dinov2_dir: str | None = None,
                         reference_stats: str | None = None) -> Evaluation:
    """The sweep's Evaluation for `ref`: extractor `kind` (resolved; `data` = the data set whose evaluator it is,
    or None), FID against `reference_stats` (an .npz of mu, sigma) when given. Statistics files are checked
    against the extractor's feature width before any reference feature is computed."""
    if ref.dataset:
        return build_evaluation(kind, data, cache_dir, inception_weights, split, device, dinov2_dir=dinov2_dir,
                                reference_stats=reference_stats, stats_option="reference_stats")
    extractor = build_extractor(kind, data, cache_dir, inception_weights, device, dinov2_dir)
    extra = None if reference_stats is None else check_statistics(reference_stats, extractor, "reference_stats")
    if ref.stats is not None:
        stats = check_statistics(ref.stats.path, extractor, OPTION)
        evaluation = Evaluation(extractor, kind, None, reference_moments(stats.mu, stats.sigma, device=device),
                                f"stats-{stats.sha256[:16]}")
    else:
        evaluation = image_evaluation(extractor, kind, ref.images, "npz" if Path(ref.spec).is_file() else "folder",
                                      cache_dir, device)
    return evaluation if extra is None else with_reference_stats(evaluation, extra)


def image_evaluation(extractor, kind: str, images: np.ndarray, name: str, cache_dir: str | Path,
                     device: torch.device) -> Evaluation:
    """Reference features of images, cached under a hash of their pixels (and the extractor's identity)."""
    digest = hashlib.sha256(f"{images.shape}".encode() + np.ascontiguousarray(images).tobytes()).hexdigest()[:16]
    key = f"{name}-{digest}"
    batches = (nhwc_to_images(images[i:i + 500]) for i in range(0, len(images), 500))
    feats = reference_features(batches, extractor, cache_dir, key).to(device)
    return Evaluation(extractor, kind, feats, reference_moments(*feature_statistics(feats), device=device), key)
