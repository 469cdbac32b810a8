"""What scores a cell: a feature extractor and the real data's reference features and statistics.

For the embedded grey datasets the extractor is the framework's clean-data evaluator (trained once and
cached); for natural images torch-fidelity's Inception-v3 from a local weights file. Both are cached by
the identity of the data (a fingerprint of its files) and of the extractor (its weights' hash).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lightning_modules.diffusion import OptionError
from lightning_modules.evaluation import (
    InceptionExtractor,
    InceptionWeightsError,
    cell_metrics,
    feature_statistics,
    load_or_train_evaluator,
    reference_features,
    verify_inception_weights,
)
from lightning_modules.evaluation.intervals import metric_intervals
from lightning_modules.evaluation.metrics import reference_moments

GREY_DATASETS = ("digits", "mnist", "fashion_mnist")


def resolve_extractor(kind: str, dataset: str) -> str:
    """'auto' → the evaluator for the grey datasets, Inception for natural images."""
    if kind == "auto":
        return "evaluator" if dataset in GREY_DATASETS else "inception"
    return kind


def check_extractor_available(kind: str, inception_weights: str | None) -> None:
    """Fail before any training or sampling when Inception weights are missing offline, or are corrupt,
    truncated or another file (verified once per process: calling it again is cheap)."""
    if kind != "inception":
        return
    try:
        verify_inception_weights(inception_weights)
    except FileNotFoundError as err:
        raise OptionError("sweep.inception_weights", str(err).splitlines()[0],
                          "pass --sweep.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth, "
                          "or use --sweep.extractor=evaluator (trained here on the clean data, fully offline)"
                          ) from err
    except InceptionWeightsError as err:
        raise OptionError("sweep.inception_weights", err.problem, err.fix) from err


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
        """Metrics of one cell, on the features' device (float64 matrix work), each with a 95% interval over the
        samples (`<metric>_lo`, `<metric>_hi`) from `bootstrap` random halves (see `evaluation.intervals`)."""
        target = labels if self.kind == "evaluator" else None
        metrics = cell_metrics(self.ref_feats, feats, logits, target, ref_stats=self.ref_stats,
                               kid_subset_size=min(1000, len(feats), len(self.ref_feats)))
        return {**metrics, **metric_intervals(metrics, self.ref_feats, self.ref_stats, feats, logits, target,
                                              bootstrap, strata=labels)}


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
