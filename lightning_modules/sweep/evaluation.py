"""What scores a cell: a feature extractor and the real data's reference features and statistics.

For the embedded grey datasets the extractor is the framework's clean-data evaluator (trained once and
cached); for natural images torch-fidelity's Inception-v3 from a local weights file. Both are cached by
the identity of the data (a fingerprint of its files) and of the extractor (its weights' hash).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
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
from lightning_modules.evaluation.intervals import metric_draws, metric_intervals
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
    # Further feature spaces every cell is also scored in (sweep.extra_extractors), by extractor id: a verdict
    # read off one space can be an artefact of it (see lightning_modules.sweep.verdicts).
    extras: dict[str, Evaluation] = field(default_factory=dict)

    @property
    def extractor_id(self) -> str:
        return self.extractor.extractor_id

    def logit_width(self, shape: tuple[int, ...], device: torch.device) -> int:
        """The extractor's logit count (dataset classes, or Inception's 1008), asked once."""
        return self.extractor.extract(torch.zeros(1, *shape, device=device))[1].shape[1]

    def score(self, feats: Tensor, logits: Tensor, labels: Tensor, bootstrap: int = 0) -> dict[str, float]:
        """Metrics of one cell, on the features' device (float64 matrix work), each with a 95% interval over the
        samples (`<metric>_lo`, `<metric>_hi`) from `bootstrap` random halves (see `evaluation.intervals`)."""
        return self.score_with_draws(feats, logits, labels, bootstrap)[0]

    def score_with_draws(self, feats: Tensor, logits: Tensor, labels: Tensor, bootstrap: int = 0
                         ) -> tuple[dict[str, float], dict]:
        """(`score`'s row values, the cell's draws record): every metric on the full sample, on each random half
        and on each half's complement, with what identifies the draws (sample count, labels, the halves
        themselves, extractor and reference), so two cells can be compared draw by draw later (see
        lightning_modules.sweep.verdicts)."""
        target = labels if self.kind == "evaluator" else None
        metrics = cell_metrics(self.ref_feats, feats, logits, target, ref_stats=self.ref_stats,
                               kid_subset_size=min(1000, len(feats), len(self.ref_feats)))
        halves, half, rest = metric_draws(self.ref_feats, self.ref_stats, feats, logits, target, bootstrap,
                                          strata=labels)
        intervals = metric_intervals(metrics, self.ref_feats, self.ref_stats, feats, logits, target, bootstrap,
                                     strata=labels, values=half)
        record = {"n": len(feats), "draws": bootstrap, "labels_sha": _sha(labels), "halves_sha": _sha(halves),
                  "extractor": self.extractor_id, "reference": self.reference_id,
                  "full": {m: float(metrics[m]) for m in half}, "half": {m: v.tolist() for m, v in half.items()},
                  "rest": {m: v.tolist() for m, v in rest.items()}}
        return {**metrics, **intervals}, record


def _sha(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def build_evaluation(kind: str, datamodule, cache_dir: str | Path, inception_weights: str | None, split: str,
                     device: torch.device, extras: list[str] = ()) -> Evaluation:
    """The extractor (trained or loaded) and the split's reference features (cached), on `device`; `extras`:
    names of EXTRA_EXTRACTORS every cell is also scored in (`Evaluation.extras`)."""
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
                      key, build_extra_evaluations(list(extras), datamodule, cache_dir, split, device))


EXTRA_EXTRACTORS: dict[str, tuple[str, int]] = {
    "evaluator-mlp": ("mlp", 1),
    "evaluator-cnn-seed1": ("cnn", 1),
}
"""Names accepted by `sweep.extra_extractors` → (evaluator arch, seed) of `load_or_train_evaluator`:
- evaluator-mlp: MLP on the flattened image (GELU/LayerNorm, 64-d features), seed 1: another architecture and init.
- evaluator-cnn-seed1: the main evaluator's CNN retrained with seed 1: tells init noise apart from architecture.
Each is trained once on the clean training split and cached like the main evaluator, on any labelled dataset; on
natural images Inception stays the main space and these are a check in a space built from the data itself."""


def build_extra_evaluations(names: list[str], datamodule, cache_dir: str | Path, split: str,
                            device: torch.device) -> dict[str, Evaluation]:
    """name → Evaluation in that extra evaluator's space (see EXTRA_EXTRACTORS): the network trained or loaded
    from `cache_dir`, and the split's reference features cached under its own extractor id, so `score` works
    as in the main space. Unknown names raise OptionError before anything is trained."""
    names = list(dict.fromkeys(names))
    for name in names:
        if name not in EXTRA_EXTRACTORS:
            raise OptionError("sweep.extra_extractors", f"unknown extra extractor {name!r}",
                              f"use any of {', '.join(EXTRA_EXTRACTORS)}, or none")
    if not names:
        return {}
    x_train, y_train = datamodule.split_tensors("train")
    x_val, y_val = datamodule.split_tensors("val")
    key = f"{datamodule.dataset_id}-{split}"
    out = {}
    for name in names:
        arch, seed = EXTRA_EXTRACTORS[name]
        extractor = load_or_train_evaluator(x_train, y_train, x_val, y_val, datamodule.num_classes, cache_dir,
                                            datamodule.dataset_id, seed=seed, device=device, arch=arch)
        feats = reference_features(datamodule.eval_dataloader(split), extractor, cache_dir, key)
        out[name] = Evaluation(extractor, "evaluator", feats.to(device),
                               reference_moments(*feature_statistics(feats), device=device), key)
    return out
