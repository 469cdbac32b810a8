"""What scores a cell: a feature extractor and the real data's reference features and statistics.

For the embedded grey datasets the extractor is the framework's clean-data evaluator (trained once and
cached); for natural images torch-fidelity's Inception-v3 from a local weights file. Both are cached by
the identity of the data (a fingerprint of its files) and of the extractor (its weights' hash).

What is computed against what: FID against the reference's (μ, Σ), the split's own or, with
`sweep.reference_stats`, a statistics file's (in the extractor's space: Inception-v3 pool features, 2048-d, for
the usual files); KID and precision/recall always against the reference features (without them, as for a
statistics file alone in `python -m experiments.evaluate`, they are not computed); the classifier score and
accuracy from the samples' logits alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
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
from lightning_modules.evaluation.sample_files import Statistics, read_statistics

GREY_DATASETS = ("digits", "mnist", "fashion_mnist")


def resolve_extractor(kind: str, dataset: str) -> str:
    """'auto' → the evaluator for the grey datasets, Inception for natural images."""
    if kind == "auto":
        return "evaluator" if dataset in GREY_DATASETS else "inception"
    return kind


def check_extractor_available(kind: str, inception_weights: str | None, dinov2_dir: str | None = None,
                              extras: list[str] = ()) -> None:
    """Fail before any training or sampling when Inception weights are missing offline, or are corrupt,
    truncated or another file (verified once per process: calling it again is cheap), or when the DINOv2
    directory the main or an extra space needs is missing or broken (config and safetensors headers)."""
    if "dinov2" in (kind, *extras):
        from lightning_modules.evaluation.dinov2 import check_dinov2_dir

        check_dinov2_dir(dinov2_dir)
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
    # "evaluator" (gives target-class accuracy), "inception" (ImageNet classes: no accuracy) or "dinov2" (no
    # classifier head: neither score nor accuracy)
    kind: str
    # The reference's features: KID and precision/recall need them; None = statistics only (FID, and the score and
    # accuracy, which need no reference). ref_stats = (μ, Σ, Σ^½) that FID is computed against: the features'
    # own, or a statistics file's (`with_reference_stats`).
    ref_feats: Tensor | None
    ref_stats: tuple
    reference_id: str  # the reference's identity (dataset fingerprint + split; + a statistics file's SHA-256)
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

    def score_with_draws(self, feats: Tensor, logits: Tensor, labels: Tensor | None, bootstrap: int = 0
                         ) -> tuple[dict[str, float], dict]:
        """(`score`'s row values, the cell's draws record): every metric on the full sample, on each random half
        and on each half's complement, with what identifies the draws (sample count, labels, the halves
        themselves, extractor and reference), so two cells can be compared draw by draw later (see
        lightning_modules.sweep.verdicts). `labels` = the classes the samples were generated for (None: unknown,
        so no accuracy and unstratified halves)."""
        target = labels if self.kind == "evaluator" else None
        n_ref = len(feats) if self.ref_feats is None else len(self.ref_feats)
        metrics = cell_metrics(self.ref_feats, feats, logits, target, ref_stats=self.ref_stats,
                               kid_subset_size=min(1000, len(feats), n_ref))
        halves, half, rest = metric_draws(self.ref_feats, self.ref_stats, feats, logits, target, bootstrap,
                                          strata=labels)
        intervals = metric_intervals(metrics, self.ref_feats, self.ref_stats, feats, logits, target, bootstrap,
                                     strata=labels, values=half)
        record = {"n": len(feats), "draws": bootstrap, "labels_sha": "" if labels is None else _sha(labels),
                  "halves_sha": _sha(halves),
                  "extractor": self.extractor_id, "reference": self.reference_id,
                  "full": {m: float(metrics[m]) for m in half}, "half": {m: v.tolist() for m, v in half.items()},
                  "rest": {m: v.tolist() for m, v in rest.items()}}
        return {**metrics, **intervals}, record


def _sha(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def build_evaluation(kind: str, datamodule, cache_dir: str | Path, inception_weights: str | None, split: str,
                     device: torch.device, extras: list[str] = (), dinov2_dir: str | None = None,
                     reference_stats: str | None = None, stats_option: str = "sweep.reference_stats") -> Evaluation:
    """The extractor (trained or loaded) and the split's reference features (cached), on `device`; `extras`:
    names of EXTRA_EXTRACTORS every cell is also scored in (`Evaluation.extras`); `dinov2_dir`: the local
    DINOv2 model of kind (or extra) "dinov2"; `reference_stats`: an .npz of (mu, sigma) FID is computed against
    instead of the split's own statistics (`with_reference_stats`; the extra spaces keep the split's), named
    `stats_option` in errors."""
    kind = resolve_extractor(kind, getattr(datamodule, "name", ""))
    check_extractor_available(kind, inception_weights, dinov2_dir, list(extras))
    extractor = build_extractor(kind, datamodule, cache_dir, inception_weights, device, dinov2_dir)
    # Read and checked against the extractor before the reference features are computed (minutes for Inception).
    stats = None if reference_stats is None else check_statistics(reference_stats, extractor, stats_option)
    key = f"{datamodule.dataset_id}-{split}"
    feats = reference_features(datamodule.eval_dataloader(split), extractor, cache_dir, key)
    evaluation = Evaluation(extractor, kind, feats.to(device),
                            reference_moments(*feature_statistics(feats), device=device), key,
                            build_extra_evaluations(list(extras), datamodule, cache_dir, split, device, dinov2_dir))
    return evaluation if stats is None else with_reference_stats(evaluation, stats)


def check_statistics(path: str | Path, extractor, option: str) -> Statistics:
    """A statistics file (`sample_files.read_statistics`) whose dimension is the extractor's feature width."""
    stats = read_statistics(path, option)
    if stats.dim != extractor.num_features:
        raise OptionError(option, f"{path} holds {stats.dim}-d statistics, but the extractor "
                          f"{extractor.extractor_id} gives {extractor.num_features}-d features",
                          "pass statistics of the same feature space (Inception-v3 pool features are 2048-d: "
                          "--sweep.extractor inception), or omit the file to use the reference split's own")
    return stats


def with_reference_stats(evaluation: Evaluation, stats: Statistics) -> Evaluation:
    """`evaluation` with FID against a statistics file's (μ, Σ) (see `check_statistics`); the file's SHA-256 joins
    the reference's identity, and with it every cell's signature. KID and precision/recall stay against the
    reference features (None: not computed), the score and accuracy need no reference."""
    device = evaluation.ref_stats[0].device
    return replace(evaluation, ref_stats=reference_moments(stats.mu, stats.sigma, device=device),
                   reference_id=f"{evaluation.reference_id}+stats-{stats.sha256[:16]}")


def build_extractor(kind: str, datamodule, cache_dir: str | Path, inception_weights: str | None,
                    device: torch.device, dinov2_dir: str | None = None):
    """The main extractor of a resolved `kind`: Inception or DINOv2 from local files, or the evaluator trained
    (once, then cached) on the datamodule's clean training split."""
    if kind == "inception":
        extractor = InceptionExtractor(inception_weights, device=device)
    elif kind == "dinov2":
        from lightning_modules.evaluation.dinov2 import DINOv2Extractor

        extractor = DINOv2Extractor(dinov2_dir, device=device)
    else:
        x_train, y_train = datamodule.split_tensors("train")
        x_val, y_val = datamodule.split_tensors("val")
        extractor = load_or_train_evaluator(x_train, y_train, x_val, y_val, datamodule.num_classes, cache_dir,
                                            datamodule.dataset_id, device=device)
    return extractor


EXTRA_EXTRACTORS: dict[str, tuple[str, int]] = {
    "evaluator-mlp": ("mlp", 1),
    "evaluator-cnn-seed1": ("cnn", 1),
    "dinov2": ("dinov2", 0),
}
"""Names accepted by `sweep.extra_extractors` → (evaluator arch, seed) of `load_or_train_evaluator`, or ("dinov2", 0):
- evaluator-mlp: MLP on the flattened image (GELU/LayerNorm, 64-d features), seed 1: another architecture and init.
- evaluator-cnn-seed1: the main evaluator's CNN retrained with seed 1: tells init noise apart from architecture.
- dinov2: FD_DINOv2 and the rest in a pretrained DINOv2's CLS features (`sweep.dinov2_dir`; nothing trained, no
  logits: its matched-strength verdicts read the main space's accuracy, see lightning_modules.sweep.verdicts).
Each is trained once on the clean training split and cached like the main evaluator, on any labelled dataset; on
natural images Inception stays the main space and these are a check in a space built from the data itself."""


def build_extra_evaluations(names: list[str], datamodule, cache_dir: str | Path, split: str,
                            device: torch.device, dinov2_dir: str | None = None) -> dict[str, Evaluation]:
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
    check_extractor_available("", None, dinov2_dir, names)  # a broken DINOv2 directory before anything is trained
    x_train, y_train = datamodule.split_tensors("train")
    x_val, y_val = datamodule.split_tensors("val")
    key = f"{datamodule.dataset_id}-{split}"
    out = {}
    for name in names:
        arch, seed = EXTRA_EXTRACTORS[name]
        if arch == "dinov2":
            from lightning_modules.evaluation.dinov2 import DINOv2Extractor

            extractor = DINOv2Extractor(dinov2_dir, device=device)
        else:
            extractor = load_or_train_evaluator(x_train, y_train, x_val, y_val, datamodule.num_classes, cache_dir,
                                                datamodule.dataset_id, seed=seed, device=device, arch=arch)
        feats = reference_features(datamodule.eval_dataloader(split), extractor, cache_dir, key)
        out[name] = Evaluation(extractor, "dinov2" if arch == "dinov2" else "evaluator", feats.to(device),
                               reference_moments(*feature_statistics(feats), device=device), key)
    return out
