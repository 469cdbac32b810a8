"""Sample-quality metrics for one sweep cell, computed from features gathered once.

Why not torchmetrics' stateful metrics: its KID / IS keep every feature, draw subsets from the global
RNG inside `compute()` (DDP ranks disagree unless seeded alike) and can hang with uneven update counts,
and it has no precision/recall. The callback gathers (features, logits) for a cell once (all ranks), and
these pure functions compute everything from them, deterministically. The maths is torch-fidelity's
(`fid_features_to_statistics`, `fid_statistics_to_metric`, `kid_features_to_metric`,
`prc_features_to_metric`, `isc_features_to_metric`), so numbers match what the field reports.
torch-fidelity is imported lazily: it pulls in torchvision, which the embedded path does not need.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .evaluator import atomic_torch_save
from .features import FeatureExtractor

log = logging.getLogger(__name__)

ArrayLike = Tensor | np.ndarray
CELL_METRIC_KEYS = ("fid", "kid", "kid_std", "score", "precision", "recall", "accuracy")


def _f64(x: ArrayLike) -> Tensor:
    # torch-fidelity's FID maths runs in numpy on whatever dtype it is given: float64 statistics keep the
    # Frechet distance accurate (float32 was off by 0.5% at d=512).
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    x = x.detach().to("cpu", torch.float64)
    if x.dim() != 2:
        raise ValueError(f"expected (N, d) features, got shape {tuple(x.shape)}")
    return x


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of (N, d) features, float64 (torch-fidelity's `fid_features_to_statistics`)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    f = _f64(features)
    if len(f) < 2:
        raise ValueError("FID statistics need at least 2 samples")
    stats = fid_features_to_statistics(f)
    return stats["mu"], stats["sigma"]


def fid_from_stats(mu_r: ArrayLike, sigma_r: ArrayLike, fake_features: ArrayLike) -> float:
    """FID of fake features against cached reference statistics (mu_r, sigma_r).

    torch-fidelity's `fid_statistics_to_metric` takes the trace term from the eigenvalues of
    sigma_1 @ sigma_2 (a product of two PSD matrices has real non-negative eigenvalues; `eigvalsh` of it
    would be wrong as the product is not symmetric).
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    mu_f, sigma_f = feature_statistics(fake_features)
    mu_r = np.asarray(mu_r.detach().cpu() if isinstance(mu_r, Tensor) else mu_r, dtype=np.float64)
    sigma_r = np.asarray(sigma_r.detach().cpu() if isinstance(sigma_r, Tensor) else sigma_r, dtype=np.float64)
    if mu_r.shape != mu_f.shape:
        raise ValueError(f"feature dims differ: reference {mu_r.shape}, fake {mu_f.shape}")
    out = fid_statistics_to_metric({"mu": mu_r, "sigma": sigma_r}, {"mu": mu_f, "sigma": sigma_f}, verbose=False)
    return float(out[KEY_METRIC_FID])


def fid_from_features(real: ArrayLike, fake: ArrayLike) -> float:
    """Frechet distance between Gaussians fitted to real and fake (N, d) features (float64)."""
    mu_r, sigma_r = feature_statistics(real)
    return fid_from_stats(mu_r, sigma_r, fake)


def kid_from_features(
    real: ArrayLike, fake: ArrayLike, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID (mean, std over subsets): unbiased MMD^2, cubic polynomial kernel (torch-fidelity defaults).

    Subsets are drawn by torch-fidelity from `np.random.RandomState(seed)`, never the global RNG, so every
    call (and every DDP rank) gets the same number. The subset size shrinks to min(n_real, n_fake).
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    r, f = _f64(real), _f64(fake)
    size = min(int(subset_size), len(r), len(f))
    if size < 2:
        raise ValueError("KID needs at least 2 real and 2 fake samples")
    out = kid_features_to_metric(
        r, f, kid_subsets=int(subsets), kid_subset_size=size, rng_seed=int(seed), verbose=False
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def classifier_score(logits: ArrayLike) -> float:
    """exp(E_x KL(p(y|x) || p(y))) over all samples in one split.

    With Inception's unbiased logits this is the Inception score (torch-fidelity's `isc_features_to_metric`
    with splits=1, no shuffling: the split count changes the value, one split uses every sample).
    """
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    lg = _f64(logits)
    return float(isc_features_to_metric(lg, splits=1, shuffle=False)[KEY_METRIC_ISC_MEAN])


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3, batch_size: int = 2048) -> tuple[float, float]:
    """Improved precision / recall (Kynkaanniemi et al. 2019): k-NN balls around each set's points.

    Precision = share of fake samples inside the real manifold, recall = share of real samples inside the
    fake manifold. torch-fidelity's `prc_features_to_metric` on our features (its convention: first
    argument generated, second real); `save_cpu_ram=True` computes distances in row blocks of
    `batch_size`, so memory is O(batch_size * N) instead of O(N^2). Runs on the features' device.
    """
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    r = (torch.from_numpy(real) if isinstance(real, np.ndarray) else real).detach().float()
    f = (torch.from_numpy(fake) if isinstance(fake, np.ndarray) else fake).detach().float().to(r.device)
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    out = prc_features_to_metric(
        f, r, prc_neighborhood=int(k), prc_batch_size=int(batch_size), save_cpu_ram=True, verbose=False
    )
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])


def target_accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Share of samples whose argmax class is the class they were generated for."""
    lg = torch.as_tensor(logits).detach()
    y = torch.as_tensor(labels).detach().to(lg.device).long()
    if len(lg) != len(y):
        raise ValueError(f"{len(lg)} logits but {len(y)} labels")
    return float((lg.argmax(dim=1) == y).float().mean().item())


def cell_metrics(
    real_features: ArrayLike,
    fake_features: ArrayLike,
    fake_logits: ArrayLike,
    labels: ArrayLike | None,
    ref_stats: tuple[ArrayLike, ArrayLike] | None = None,
    *,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    k: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """All metrics of one (method, scale) cell: fid, kid, kid_std, score, precision, recall, accuracy.

    `ref_stats` = (mu, sigma) of the real features (e.g. cached with the reference features) saves
    recomputing a d x d covariance per cell. `labels` = the target classes the samples were generated
    for; None (unconditional sampling) gives accuracy = nan.
    """
    if ref_stats is not None:
        fid = fid_from_stats(ref_stats[0], ref_stats[1], fake_features)
    else:
        fid = fid_from_features(real_features, fake_features)
    kid, kid_std = kid_from_features(real_features, fake_features, kid_subset_size, kid_subsets, seed)
    precision, recall = precision_recall(real_features, fake_features, k=k)
    return {
        "fid": fid,
        "kid": kid,
        "kid_std": kid_std,
        "score": classifier_score(fake_logits),
        "precision": precision,
        "recall": recall,
        "accuracy": target_accuracy(fake_logits, labels) if labels is not None else math.nan,
    }


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def reference_cache_path(cache_dir: str | Path, key: str, extractor_id: str) -> Path:
    """`cache_dir/ref-<key>-<hash of extractor_id>.pt`: the extractor's identity (network and weights) is
    in the name, so new weights never silently reuse stale reference features."""
    digest = hashlib.sha1(extractor_id.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"ref-{_safe(key)}-{digest}.pt"


@torch.no_grad()
def reference_features(
    images: Tensor | Iterable,
    extractor: FeatureExtractor,
    cache_dir: str | Path,
    key: str,
    batch_size: int = 256,
) -> Tensor:
    """Features (N, d) float32 on CPU of the real split, computed once and cached on disk.

    `images`: a (N, C, H, W) tensor in [-1, 1], or an iterable of such batches (or of (x, y, ...) tuples,
    as a DataLoader yields). `key` must name the dataset, split and image size (e.g. "digits-train-8px");
    the extractor identity is added to the file name by this function.
    """
    path = reference_cache_path(cache_dir, key, extractor.extractor_id)
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("extractor_id") == extractor.extractor_id:
            return blob["features"]
        log.warning("Reference cache %s was written by another extractor: recomputing", path)
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    feats = []
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        feats.append(extractor.extract(x)[0].detach().to("cpu", torch.float32))
    if not feats:
        raise ValueError(f"no images given for reference features {key!r}")
    features = torch.cat(feats)
    atomic_torch_save({"features": features, "extractor_id": extractor.extractor_id, "key": key}, path)
    log.info("Reference features %s: %s from %s -> %s", key, tuple(features.shape), extractor.extractor_id, path)
    return features
