"""The one list of a sweep's metrics: name, label, direction and range. Everything else derives from it: the
intervals (`intervals.METRICS`, `METRIC_RANGES`), the store's columns, the figures' labels, the verdicts'
directions and the W&B keys. A new metric is one entry here plus its computation in `metrics.cell_metrics`
and `intervals.subset_values`."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    lower_is_better: bool
    low: float  # the metric's range (the score's upper end is the number of classes: set per call)
    high: float

    @property
    def direction(self) -> str:
        return "lower is better" if self.lower_is_better else "higher is better"


REGISTRY: tuple[Metric, ...] = (
    Metric("fid", "FID", True, 0.0, math.inf),  # a squared distance
    # The population MMD² is ≥ 0, but KID's unbiased estimator (the point value) can itself be slightly
    # negative: the point value is reported as computed, and its interval reaches down to it, no further.
    Metric("kid", "KID", True, 0.0, math.inf),
    Metric("score", "classifier score (IS-like)", False, 1.0, math.inf),  # exp(mean KL) ≥ 1, ≤ the class count
    Metric("precision", "precision", False, 0.0, 1.0),
    Metric("recall", "recall", False, 0.0, 1.0),
    Metric("accuracy", "target-class accuracy", False, 0.0, 1.0),
)
METRICS: tuple[str, ...] = tuple(m.name for m in REGISTRY)
BY_NAME: dict[str, Metric] = {m.name: m for m in REGISTRY}
LOWER_IS_BETTER: dict[str, bool] = {m.name: m.lower_is_better for m in REGISTRY}
RANGES: dict[str, tuple[float, float]] = {m.name: (m.low, m.high) for m in REGISTRY}
INTERVAL_COLUMNS: tuple[str, ...] = tuple(f"{m}_{end}" for m in METRICS for end in ("lo", "hi"))
