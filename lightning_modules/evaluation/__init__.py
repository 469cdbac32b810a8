"""Sample-quality evaluation: feature extractors (Inception, digits evaluator) and per-cell metrics."""

from .evaluator import EvaluatorExtractor, EvaluatorNet, load_or_train_evaluator, train_evaluator
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
    "INCEPTION_WEIGHTS_FILENAME",
    "EvaluatorExtractor",
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
