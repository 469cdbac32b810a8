"""What scores a cell: a feature extractor and the real data's reference features and statistics.

For the embedded grey datasets the extractor is the framework's clean-data evaluator (trained once and
cached); for natural images torch-fidelity's Inception-v3 from a local weights file. Both are cached by
the identity of the data (a fingerprint of its files) and of the extractor (its weights' hash).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lightning_modules.diffusion import OptionError
from lightning_modules.evaluation import (
    InceptionExtractor,
    cell_metrics,
    check_inception_weights,
    classifier_score,
    feature_statistics,
    fid_from_stats,
    load_or_train_evaluator,
    reference_features,
    target_accuracy,
)
from lightning_modules.evaluation.metrics import reference_moments

GREY_DATASETS = ("digits", "mnist", "fashion_mnist")


def resolve_extractor(kind: str, dataset: str) -> str:
    """'auto' → the evaluator for the grey datasets, Inception for natural images."""
    if kind == "auto":
        return "evaluator" if dataset in GREY_DATASETS else "inception"
    return kind


def check_extractor_available(kind: str, inception_weights: str | None) -> None:
    """Fail before any training or sampling when Inception weights are missing offline."""
    if kind != "inception":
        return
    try:
        check_inception_weights(inception_weights)
    except FileNotFoundError as err:
        raise OptionError("sweep.inception_weights", str(err).splitlines()[0],
                          "pass --sweep.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth, "
                          "or use --sweep.extractor=evaluator (trained here on the clean data, fully offline)"
                          ) from err


@dataclass
class Evaluation:
    """A feature extractor with the reference features and (μ, Σ, Σ^½) of the real split, on one device."""

    extractor: object  # lightning_modules.evaluation.FeatureExtractor
    kind: str  # "evaluator" (gives target-class accuracy) or "inception" (ImageNet classes: no accuracy)
    ref_feats: Tensor
    ref_stats: tuple
    reference_id: str  # the data split's identity (dataset fingerprint + split)

    @property
    def extractor_id(self) -> str:
        return self.extractor.extractor_id

    def logit_width(self, shape: tuple[int, ...], device: torch.device) -> int:
        """The extractor's logit count (dataset classes, or Inception's 1008), asked once."""
        return self.extractor.extract(torch.zeros(1, *shape, device=device))[1].shape[1]

    def score(self, feats: Tensor, logits: Tensor, labels: Tensor, bootstrap: int = 0) -> dict[str, float]:
        """Metrics of one cell, on the features' device (float64 matrix work), with percentile-bootstrap 95%
        intervals over samples (`<metric>_lo`, `<metric>_hi`) of FID, score and accuracy from `bootstrap`
        resamples (a fixed generator: the same draws for every cell). Precision/recall are not bootstrapped
        (a resample's duplicates shrink k-NN radii to 0) and KID carries its own subset std."""
        metrics = cell_metrics(self.ref_feats, feats, logits, labels if self.kind == "evaluator" else None,
                               ref_stats=self.ref_stats, kid_subset_size=min(1000, len(feats), len(self.ref_feats)))
        draws: dict[str, list[float]] = {"fid": [], "score": [], "accuracy": []}
        gen = torch.Generator().manual_seed(0)
        for _ in range(bootstrap):
            i = torch.randint(len(feats), (len(feats),), generator=gen).to(feats.device)
            draws["fid"].append(fid_from_stats(*self.ref_stats[:2], feats[i], sqrt_sigma_r=self.ref_stats[2]))
            draws["score"].append(classifier_score(logits[i]))
            draws["accuracy"].append(target_accuracy(logits[i], labels.to(logits.device)[i])
                                     if self.kind == "evaluator" else math.nan)
        for name, values in draws.items():
            lo, hi = _percentiles(values) if values else (math.nan, math.nan)
            metrics[f"{name}_lo"], metrics[f"{name}_hi"] = lo, hi
        return metrics


def _percentiles(values: list[float]) -> tuple[float, float]:
    v = torch.tensor(values, dtype=torch.float64)
    if torch.isnan(v).any():
        return math.nan, math.nan
    q = torch.quantile(v, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(q[0]), float(q[1])


def build_evaluation(kind: str, datamodule, cache_dir: str | Path, inception_weights: str | None, split: str,
                     device: torch.device) -> Evaluation:
    """The extractor (trained or loaded) and the split's reference features (cached), on `device`."""
    kind = resolve_extractor(kind, getattr(datamodule, "name", ""))
    check_extractor_available(kind, inception_weights)
    if kind == "inception":
        extractor = InceptionExtractor(inception_weights, device=device)
    else:
        x_train, y_train = datamodule.split_tensors("train")
        x_val, y_val = datamodule.split_tensors("val")
        extractor = load_or_train_evaluator(x_train, y_train, x_val, y_val, datamodule.num_classes, cache_dir,
                                            datamodule.dataset_id, device=device)
    key = f"{datamodule.dataset_id}-{split}"
    feats = reference_features(datamodule.eval_dataloader(split), extractor, cache_dir, key)
    return Evaluation(extractor, kind, feats.to(device), reference_moments(*feature_statistics(feats), device=device),
                      key)
