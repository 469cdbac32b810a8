"""What a sweep needs before it samples anything: the guidance classifier (checked against the
diffusion model), the feature extractor, and the reference features of the real data."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lightning_modules import NoisyClassifier
from lightning_modules.evaluation import (
    InceptionExtractor,
    check_inception_weights,
    feature_statistics,
    load_or_train_evaluator,
    reference_features,
)
from lightning_modules.evaluation.metrics import reference_moments

GREY_DATASETS = ("digits", "mnist", "fashion_mnist")
COMPAT_KEYS = ("num_classes", "image_size", "channels", "schedule", "timesteps")


def check_compatible(diffusion_hparams: dict, classifier_hparams: dict, classifier_path: str) -> None:
    """Guidance is meaningful only if both models share classes, image shape and noise schedule."""
    bad = [f"{k}: diffusion={diffusion_hparams.get(k)!r} classifier={classifier_hparams.get(k)!r}"
           for k in COMPAT_KEYS if diffusion_hparams.get(k) != classifier_hparams.get(k)]
    if bad:
        raise ValueError(
            f"the noisy classifier {classifier_path} does not match the diffusion model ({'; '.join(bad)}). "
            "Train the classifier with the same data and the same --model.init_args.schedule/timesteps "
            "(configs/experiments/*_classifier.yaml mirror the diffusion recipes).")


def load_classifier(path: str | None, diffusion_hparams: dict, device: torch.device) -> NoisyClassifier | None:
    """The frozen noisy classifier, in eval mode, kept OUT of the diffusion module (and its checkpoint)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"classifier checkpoint {path!r} does not exist; train one with "
                                "`python -m experiments.train fit --config configs/experiments/"
                                "digits_classifier.yaml` and pass its checkpoints/last.ckpt as classifier_ckpt.")
    classifier = NoisyClassifier.load_from_checkpoint(path, map_location=device)
    check_compatible(dict(diffusion_hparams), dict(classifier.hparams), path)
    return classifier.eval().requires_grad_(False)


def resolve_extractor_kind(kind: str, dataset: str) -> str:
    if kind == "auto":
        return "evaluator" if dataset in GREY_DATASETS else "inception"
    if kind not in ("evaluator", "inception"):
        raise ValueError(f"extractor must be 'auto', 'evaluator' or 'inception', got {kind!r}")
    return kind


def check_extractor_available(kind: str, inception_weights: str | None) -> None:
    """Fail before any training or sampling when the Inception weights are missing offline."""
    if kind == "inception":
        check_inception_weights(inception_weights)


def build_extractor(kind: str, datamodule, cache_dir: Path, inception_weights: str | None,
                    device: torch.device):
    if kind == "inception":
        return InceptionExtractor(inception_weights, device=device)
    x_train, y_train = datamodule.split_tensors("train")
    x_val, y_val = datamodule.split_tensors("val")
    return load_or_train_evaluator(x_train, y_train, x_val, y_val, datamodule.num_classes, cache_dir,
                                   datamodule.dataset_id, device=device)


def build_reference(datamodule, extractor, cache_dir: Path, split: str,
                    device: torch.device) -> tuple[Tensor, tuple]:
    """Real-data features (cached on disk by dataset, split and extractor) and their (μ, Σ, Σ^½), on
    `device`, where every cell's metrics are then computed."""
    key = f"{datamodule.dataset_id}-{split}"
    feats = reference_features(datamodule.eval_dataloader(split), extractor, cache_dir, key)
    return feats.to(device), reference_moments(*feature_statistics(feats), device=device)


def cell_metrics_for(ref_feats: Tensor, ref_stats: tuple, feats: Tensor, logits: Tensor, labels: Tensor,
                     extractor_kind: str) -> dict[str, float]:
    """Metrics of one cell. Target-class accuracy needs a classifier over the *dataset's* classes,
    which the digits evaluator is and Inception (ImageNet classes) is not: accuracy is NaN there."""
    from lightning_modules.evaluation import cell_metrics

    return cell_metrics(ref_feats, feats, logits, labels if extractor_kind == "evaluator" else None,
                        ref_stats=ref_stats, kid_subset_size=min(1000, len(feats), len(ref_feats)))
