"""Sample-quality evaluation: feature extractors (Inception, digits evaluator) and per-cell metrics."""

from .evaluator import (
    EVALUATOR_ARCHS,
    EvaluatorExtractor,
    EvaluatorMLP,
    EvaluatorNet,
    load_or_train_evaluator,
    train_evaluator,
)
from .features import (
    INCEPTION_WEIGHTS_FILENAME,
    FeatureExtractor,
    InceptionExtractor,
    InceptionWeightsError,
    check_inception_weights,
    default_inception_weights_path,
    verify_inception_weights,
)
from .metrics import (
    CELL_METRIC_KEYS,
    cell_metrics,
    classifier_score,
    feature_statistics,
    fid_from_features,
    fid_from_stats,
    kid_from_features,
    precision_recall,
    reference_cache_path,
    reference_features,
    target_accuracy,
)

__all__ = [
    "CELL_METRIC_KEYS",
    "EVALUATOR_ARCHS",
    "INCEPTION_WEIGHTS_FILENAME",
    "EvaluatorExtractor",
    "EvaluatorMLP",
    "EvaluatorNet",
    "FeatureExtractor",
    "InceptionExtractor",
    "InceptionWeightsError",
    "cell_metrics",
    "check_inception_weights",
    "classifier_score",
    "default_inception_weights_path",
    "feature_statistics",
    "fid_from_features",
    "fid_from_stats",
    "kid_from_features",
    "load_or_train_evaluator",
    "precision_recall",
    "reference_cache_path",
    "reference_features",
    "target_accuracy",
    "train_evaluator",
    "verify_inception_weights",
]
