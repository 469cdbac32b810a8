"""Intervals over samples: the half-sample metrics equal the library's full-sample ones, and the intervals'
width matches the spread of each metric over independent sample sets (the thing an interval claims)."""

import math

import pytest
import torch

from lightning_modules.evaluation import feature_statistics, fid_from_stats, kid_from_features, precision_recall
from lightning_modules.evaluation.intervals import (
    METRICS,
    centred_interval,
    half_indices,
    kid_of_subsets,
    metric_intervals,
    precision_recall_of_subsets,
)
from lightning_modules.evaluation.metrics import cell_metrics, reference_moments

D = 16


def gaussian(n: int, gen: torch.Generator, mix: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, D, generator=gen) @ mix + shift


def test_subset_precision_recall_on_all_samples_is_torch_fidelitys():
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, D, generator=gen), 1.2 * torch.randn(250, D, generator=gen) + 0.1
    precision, recall = precision_recall_of_subsets(real, fake, torch.arange(250)[None])
    assert (precision.item(), recall.item()) == pytest.approx(precision_recall(real, fake), abs=1e-6)


def test_subset_kid_on_all_samples_is_kid_with_one_full_subset():
    gen = torch.Generator().manual_seed(1)
    real, fake = torch.randn(200, D, generator=gen), torch.randn(200, D, generator=gen) + 0.2
    kid, _ = kid_from_features(real, fake, subset_size=200, subsets=1)  # a subset of all = a permutation
    assert kid_of_subsets(real, fake, torch.arange(200)[None]).item() == pytest.approx(kid, rel=1e-9)


def test_halves_are_without_replacement_stratified_and_the_same_every_call():
    strata = torch.arange(101) % 4  # 26, 25, 25, 25 samples per class
    halves = half_indices(strata, 5)
    assert halves.shape == (5, 13 + 12 + 12 + 12) and all(len(set(h.tolist())) == 49 for h in halves)
    assert all(torch.bincount(strata[h]).tolist() == [13, 12, 12, 12] for h in halves)  # the cell's class balance
    assert torch.equal(halves, half_indices(strata, 5))
    assert half_indices(torch.arange(6), 3).shape == (3, 3)  # one sample per class: plain halves


def test_centred_interval_drops_the_half_samples_shift():
    lo, hi = centred_interval(torch.arange(100.0) + 1000.0, 5.0)  # halves biased by +1000: only the spread stays
    assert lo < 5.0 < hi and hi - lo == pytest.approx(0.95 * 99, rel=0.01)


def test_intervals_are_as_wide_as_the_spread_over_independent_sample_sets():
    """The sd over 40 independent sets of n fakes is what a 95% interval of one set must reflect:
    width / 3.92 within a factor 1.6 of it, for every metric, and the interval holds the set's own value."""
    gen = torch.Generator().manual_seed(2)
    mix = torch.randn(D, D, generator=gen) / math.sqrt(D)
    real, n, classes = gaussian(600, gen, mix), 300, 4
    stats = reference_moments(*feature_statistics(real))
    labels = torch.arange(n) % classes

    def cell(fake: torch.Tensor) -> tuple[dict, torch.Tensor]:
        logits = fake[:, :classes] * 2.0  # a classifier of the features: accuracy and score vary with the set
        return cell_metrics(real, fake, logits, labels, ref_stats=stats, kid_subset_size=n, kid_subsets=10), logits

    fakes = [gaussian(n, gen, mix, 0.05) for _ in range(40)]
    sets = [cell(fake) for fake in fakes]
    spread = {m: torch.tensor([s[m] for s, _ in sets]).std().item() for m in METRICS}
    point, logits = sets[0]
    # The half-sample spread itself, unclipped: this set's KID estimate is below 0, where the reported
    # interval is clipped (test_intervals_are_clipped_to_each_metrics_range).
    out = metric_intervals(point, real, stats, fakes[0], logits, labels, draws=100, clip=False)
    for m in METRICS:
        lo, hi = out[f"{m}_lo"], out[f"{m}_hi"]
        assert lo <= point[m] <= hi, m
        assert 1 / 1.6 < (hi - lo) / 3.92 / spread[m] < 1.6, (m, (hi - lo) / 3.92, spread[m])


def test_halves_keep_the_class_balance_fixed_like_the_sweep_does():
    """A sweep's labels are fixed (they cycle through the classes) and only the noise is random. With class-
    dependent features, halves that let the class mix vary measure the mix, not the noise: FID intervals far
    wider than the spread over independent sample sets. Stratified halves match that spread."""
    gen = torch.Generator().manual_seed(4)
    classes, n = 4, 400
    means = 3.0 * torch.randn(classes, D, generator=gen)
    labels = torch.arange(n) % classes

    def draw(m: int, y: torch.Tensor) -> torch.Tensor:
        return means[y] + torch.randn(m, D, generator=gen)

    real = draw(800, torch.arange(800) % classes)
    stats = reference_moments(*feature_statistics(real))
    fakes = [draw(n, labels) for _ in range(30)]
    spread = torch.tensor([fid_from_stats(*stats[:2], f) for f in fakes]).std().item()
    point = cell_metrics(real, fakes[0], fakes[0][:, :classes], labels, ref_stats=stats, kid_subset_size=n,
                         kid_subsets=10)

    def width(strata: torch.Tensor) -> float:
        out = metric_intervals(point, real, stats, fakes[0], fakes[0][:, :classes], labels, 60, strata=strata)
        return (out["fid_hi"] - out["fid_lo"]) / 3.92

    assert 1 / 1.6 < width(labels) / spread < 1.6
    assert width(torch.zeros(n)) / spread > 2  # one stratum: the class mix varies between halves


def test_no_draws_give_no_interval():
    gen = torch.Generator().manual_seed(3)
    real, fake = torch.randn(50, D, generator=gen), torch.randn(40, D, generator=gen)
    stats = reference_moments(*feature_statistics(real))
    point = cell_metrics(real, fake, fake[:, :3], None, ref_stats=stats, kid_subset_size=40)
    out = metric_intervals(point, real, stats, fake, fake[:, :3], None, draws=0)
    assert set(out) == {f"{m}_{e}" for m in METRICS for e in ("lo", "hi")}
    assert all(math.isnan(v) for v in out.values())
    assert fid_from_stats(*stats[:2], fake) == pytest.approx(point["fid"])


def test_intervals_are_clipped_to_each_metrics_range():
    """Fakes that are the reals: FID ≈ 0 and KID ≈ 0, so FID/KID minus the halves' spread is negative, and
    recall ≈ 1 plus the spread is above 1. The reported bounds stay inside each metric's range."""
    from lightning_modules.evaluation.intervals import METRIC_RANGES, clip_interval

    gen = torch.Generator().manual_seed(5)
    real = torch.randn(200, D, generator=gen)
    fake, labels = real.clone(), torch.arange(200) % 4
    logits = torch.randn(200, 4, generator=gen)
    stats = reference_moments(*feature_statistics(real))
    point = cell_metrics(real, fake, logits, labels, ref_stats=stats, kid_subset_size=200, kid_subsets=10)
    halves = half_indices(labels, 50)
    fid_halves = torch.tensor([fid_from_stats(*stats[:2], fake[h]) for h in halves], dtype=torch.float64)
    unclipped_lo, unclipped_hi = centred_interval(fid_halves, point["fid"])
    assert unclipped_lo < 0 < unclipped_hi  # the case this guards against
    out = metric_intervals(point, real, stats, fake, logits, labels, draws=50)
    assert out["fid_lo"] == 0.0 and out["fid_hi"] == pytest.approx(unclipped_hi)
    # KID's unbiased estimate is itself below 0 here: its interval reaches down to it and no further.
    assert point["kid"] < 0 and out["kid_lo"] == pytest.approx(min(0.0, point["kid"]))
    for m in METRICS:
        low, high = (1.0, 4.0) if m == "score" else METRIC_RANGES[m]
        low = min(low, point[m])
        assert low <= out[f"{m}_lo"] <= point[m] <= out[f"{m}_hi"] <= high, m
    assert clip_interval(-1.0, 2.0, 0.0, 1.0) == (0.0, 1.0)
    assert all(math.isnan(v) for v in clip_interval(math.nan, math.nan, 0.0, 1.0))  # undefined stays undefined


def test_each_half_and_its_complement_are_disjoint_and_equally_sized_per_class():
    from lightning_modules.evaluation.intervals import complements

    labels = torch.arange(256) % 10  # 26 or 25 per class: odd counts
    halves = half_indices(labels, 8)
    rest = complements(halves, labels)
    assert rest.shape == halves.shape
    for h, r in zip(halves, rest):
        assert not set(h.tolist()) & set(r.tolist())
        assert torch.equal(torch.bincount(labels[h], minlength=10), torch.bincount(labels[r], minlength=10))
