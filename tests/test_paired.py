"""Paired comparisons of sweep cells: calibrated on Fréchet distances with a known reference, the held-out best
scale unbiased where the in-sample one is not, pooling over seeds, refusals and the small helpers."""

import math

import pytest
import torch

from lightning_modules.evaluation.intervals import complements, half_indices
from lightning_modules.evaluation.metrics import fid_from_stats, reference_moments
from lightning_modules.evaluation.paired import (
    BestScale,
    CellDraws,
    Difference,
    bonferroni_z,
    held_out_best,
    held_out_difference,
    matched_draws,
    paired_difference,
    pooled,
    rank_groups,
    samples_to_separate,
    unpaired_se,
    verdict,
)
from lightning_modules.sweep.tables import matched_strength

DIM, N, DRAWS = 8, 256, 50
HALVES = half_indices(torch.zeros(N), DRAWS, seed=0)
RESTS = complements(HALVES, torch.zeros(N))
# The reference N(0, I): its exact moments, as a sweep passes `reference_moments` of the real features.
MU_R, SIGMA_R, ROOT_R = reference_moments(torch.zeros(DIM), torch.eye(DIM))
F64 = torch.float64


def frechet(x: torch.Tensor) -> torch.Tensor:
    """`fid_from_stats` against (MU_R, SIGMA_R) for a batch (..., m, d) of sample sets (checked equal below):
    thousands of 8×8 eigendecompositions at once keep the calibration to seconds."""
    mu = x.mean(-2)
    xc = x - mu.unsqueeze(-2)
    cov = xc.transpose(-1, -2) @ xc / (x.shape[-2] - 1)
    inner = ROOT_R @ cov @ ROOT_R
    tr_covmean = torch.linalg.eigvalsh((inner + inner.transpose(-1, -2)) / 2).clamp_min(0).sqrt().sum(-1)
    diff = MU_R - mu
    return (diff * diff).sum(-1) + SIGMA_R.trace() + cov.diagonal(dim1=-2, dim2=-1).sum(-1) - 2 * tr_covmean


def fid_cells(x: torch.Tensor) -> list[CellDraws]:
    """One CellDraws per repetition of x (R, N, d): FID on all samples, on each half and on each complement."""
    full, half, rest = frechet(x), frechet(x[:, HALVES]), frechet(x[:, RESTS])
    return [CellDraws(float(f), h, r) for f, h, r in zip(full, half, rest)]


def mean_cell(values: torch.Tensor) -> CellDraws:
    """A mean-like metric: the mean of per-sample values (N,) on all samples, each half, each complement."""
    return CellDraws(float(values.mean()), values[HALVES].mean(1), values[RESTS].mean(1))


def test_batched_frechet_is_fid_from_stats():
    x = torch.randn(3, N, DIM, generator=torch.Generator().manual_seed(0), dtype=F64) * 1.1 + 0.2
    for xi, value in zip(x, frechet(x)):
        assert float(value) == pytest.approx(fid_from_stats(MU_R, SIGMA_R, xi, sqrt_sigma_r=ROOT_R), rel=1e-10)
    assert float(frechet(x[0, HALVES[3]])) == pytest.approx(fid_from_stats(MU_R, SIGMA_R, x[0, HALVES[3]]), rel=1e-10)


# Two cells from the same per-sample noise z: A = z·σ_A + μ_A, B = z·σ_B + μ_B (per-dimension scalings).
SCALE_A = torch.linspace(0.9, 1.1, DIM, dtype=F64)
SCALE_B, SHIFT_A, SHIFT_B = 1.1 * SCALE_A, torch.full((DIM,), 0.3, dtype=F64), torch.full((DIM,), 0.4, dtype=F64)
REPS, TRUTH_REPS, CHUNK = 400, 4000, 100
# Coverage band: with 400 repetitions a 95% coverage is read to ±0.011 (binomial sd), so ±3 sd is
# [0.917, 0.983]; a se from 50 draws (≈ t with 49 df) under-covers by ~0.005, and for a nonlinear statistic
# like FID the half-sample spread is slightly conservative. [0.90, 0.99] allows both without hiding a
# miscalibration that matters (a se off by 20% gives 0.90 or 0.98 already at the edges).
BAND = (0.90, 0.99)


def calibration(shared: bool, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)

    def pair(reps: int) -> tuple[torch.Tensor, torch.Tensor]:
        z_a = torch.randn(reps, N, DIM, generator=gen, dtype=F64)
        z_b = z_a if shared else torch.randn(reps, N, DIM, generator=gen, dtype=F64)
        return z_a * SCALE_A + SHIFT_A, z_b * SCALE_B + SHIFT_B

    # The true finite-n difference E[FID_A − FID_B] (each FID biased at n alike), by Monte Carlo over
    # independent repetitions, separate from the ones whose intervals are scored.
    truth = torch.cat([frechet(a) - frechet(b) for a, b in (pair(CHUNK * 5) for _ in range(TRUTH_REPS // 500))])
    target = float(truth.mean())
    covered, paired_se, unpaired, estimates = 0, [], [], []
    for _ in range(REPS // CHUNK):
        a, b = pair(CHUNK)
        for cell_a, cell_b in zip(fid_cells(a), fid_cells(b)):
            d = paired_difference([cell_a], [cell_b])
            lo, hi = d.interval()
            covered += lo <= target <= hi
            paired_se.append(d.se)
            unpaired.append(unpaired_se([cell_a], [cell_b]))
            estimates.append(d.estimate)
    return {"coverage": covered / REPS, "se_ratio": sum(paired_se) / sum(unpaired),
            "se_vs_sd": sum(paired_se) / len(paired_se) / float(torch.tensor(estimates).std())}


def test_paired_interval_is_calibrated_and_narrow_with_shared_noise():
    out = calibration(shared=True, seed=1)
    assert BAND[0] <= out["coverage"] <= BAND[1], f"paired coverage (shared noise) {out}"
    assert out["se_ratio"] < 0.5, f"pairing should narrow the se when noise is shared: {out}"
    assert 0.8 < out["se_vs_sd"] < 1.25, f"mean paired se vs sd of the estimate over repetitions: {out}"


def test_paired_interval_is_not_falsely_narrow_with_independent_noise():
    out = calibration(shared=False, seed=2)
    assert BAND[0] <= out["coverage"] <= BAND[1], f"paired coverage (independent noise) {out}"
    assert out["se_ratio"] >= 0.8, f"with independent noise pairing must not narrow the se: {out}"


def test_held_out_best_is_unbiased_where_in_sample_is_not():
    # 8 scales with nearly equal true means (a step of 0.002 against a half's se of 1/√128 ≈ 0.09): which
    # scale wins is noise. The metric is a mean of per-sample values, so a half and its complement are
    # independent given the truth: the held-out value is unbiased for the chosen scale's true mean.
    gen = torch.Generator().manual_seed(3)
    truth = 1.0 + 0.002 * torch.arange(8, dtype=F64)
    scales = [0.5 * k for k in range(8)]
    reps = 400
    values = truth[None, :, None] + torch.randn(reps, 8, N, generator=gen, dtype=F64)
    half, rest = values[:, :, HALVES].mean(-1), values[:, :, RESTS].mean(-1)  # (reps, 8, D)
    held_bias, in_bias, effects = [], [], []
    for r in range(reps):
        grid = {s: CellDraws(float(values[r, k].mean()), half[r, k], rest[r, k]) for k, s in enumerate(scales)}
        best = held_out_best(grid, lower_is_better=True)
        held_bias.append(float((best.held_out - truth[best.chosen]).mean()))
        in_bias.append(float((best.in_sample - truth.min()).mean()))
        effects.append(best.selection_effect)
    held, inside, effect = (torch.tensor(v) for v in (held_bias, in_bias, effects))

    def se(v: torch.Tensor) -> float:
        return float(v.std() / math.sqrt(len(v)))

    msg = (f"held-out − true at chosen: {float(held.mean()):.4f} ± {se(held):.4f}; "
           f"in-sample − true best: {float(inside.mean()):.4f} ± {se(inside):.4f}; "
           f"selection effect {float(effect.mean()):.4f} ± {se(effect):.4f}")
    assert abs(float(held.mean())) < 4 * se(held), msg
    assert float(inside.mean()) < -10 * se(inside), msg
    assert float(effect.mean()) < -10 * se(effect), msg


def test_held_out_best_picks_per_draw_and_breaks_ties_to_the_smaller_scale():
    grid = {2.0: CellDraws(0.0, [1.0, 5.0, 3.0, math.nan], [10.0, 50.0, 30.0, 0.0]),
            1.0: CellDraws(0.0, [2.0, 4.0, 3.0, math.nan], [20.0, 40.0, 31.0, 0.0])}
    best = held_out_best(grid, lower_is_better=True)  # sorted scales: [1.0, 2.0]
    assert best.chosen.tolist() == [1, 0, 0, -1]  # draw 2 ties: the first (smaller) scale
    assert best.held_out[:3].tolist() == [10.0, 40.0, 31.0] and best.in_sample[:3].tolist() == [1.0, 4.0, 3.0]
    assert best.held_out[3].isnan() and best.scale == 1.0  # chosen twice (indices 0) against once
    higher = held_out_best(grid, lower_is_better=False)
    assert higher.chosen.tolist() == [0, 1, 0, -1] and higher.scale == 1.0
    assert isinstance(best, BestScale)
    diff = held_out_difference(higher, best)
    assert diff.draws[:3].tolist() == [10.0, 10.0, 0.0]


def test_pooled_over_seeds_is_the_mean_of_per_seed_differences_and_narrows_as_root_seeds():
    gen = torch.Generator().manual_seed(4)

    def seed_pair() -> tuple[CellDraws, CellDraws]:
        z = torch.randn(N, generator=gen, dtype=F64)  # shared within a seed, independent across seeds
        return mean_cell(z + 0.1 * torch.randn(N, generator=gen, dtype=F64)), mean_cell(1.2 * z + 0.05)

    seeds = [seed_pair() for _ in range(4)]
    a, b = [p[0] for p in seeds], [p[1] for p in seeds]
    together = paired_difference(a, b)
    each = [paired_difference([x], [y]) for x, y in zip(a, b)]
    assert together.estimate == float(torch.tensor([d.estimate for d in each], dtype=F64).mean())
    assert torch.equal(together.draws, torch.stack([d.draws for d in each]).mean(0))
    assert together.se == float(together.draws.std())
    assert pooled(a).full == float(torch.tensor([c.full for c in a], dtype=F64).mean())
    assert torch.equal(pooled(a).rest, torch.stack([c.rest for c in a]).mean(0))

    one, four = [], []
    for _ in range(20):  # mean se over repetitions: one se from 50 draws is itself ±10%
        pairs = [seed_pair() for _ in range(4)]
        one.append(paired_difference([pairs[0][0]], [pairs[0][1]]).se)
        four.append(paired_difference([p[0] for p in pairs], [p[1] for p in pairs]).se)
    ratio = sum(one) / sum(four)
    assert 1.5 <= ratio <= 2.7, f"se(1 seed) / se(4 seeds) = {ratio:.3f}, expected ≈ 2"


def test_refusals_name_the_problem():
    c50, c40 = CellDraws(1.0, torch.zeros(50), torch.zeros(50)), CellDraws(1.0, torch.zeros(40), torch.zeros(40))
    with pytest.raises(ValueError, match="seed counts differ"):
        paired_difference([c50, c50], [c50])
    with pytest.raises(ValueError, match="numbers of draws D differ"):
        paired_difference([c50], [c40])
    with pytest.raises(ValueError, match="numbers of draws D differ"):
        pooled([c50, c40])
    with pytest.raises(ValueError, match="seed counts differ"):
        unpaired_se([c50], [c50, c50])
    with pytest.raises(ValueError, match="no seeds"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="numbers of draws D differ"):
        held_out_best({1.0: c50, 2.0: c40}, lower_is_better=True)
    best50, best40 = held_out_best({1.0: c50}, True), held_out_best({1.0: c40}, True)
    with pytest.raises(ValueError, match="numbers of draws D differ"):
        held_out_difference(best50, best40)
    with pytest.raises(ValueError, match="half has 50 draws but rest has 40"):
        CellDraws(1.0, torch.zeros(50), torch.zeros(40))
    with pytest.raises(ValueError, match="gammas"):
        matched_draws([0.0, 1.0], [c50], [c50, c50], 0.9)


def test_bonferroni_verdict_samples_and_groups():
    assert bonferroni_z(1) == pytest.approx(1.959964, abs=1e-5)
    assert bonferroni_z(10) == pytest.approx(2.807034, abs=1e-5)
    with pytest.raises(ValueError):
        bonferroni_z(0)

    lower = Difference(estimate=-3.0, se=1.0, draws=torch.zeros(2))  # interval [-5, -1] at z = 2
    assert lower.interval(2.0) == (-5.0, -1.0) and lower.decided(2.0)
    assert verdict(lower, 2.0, lower_is_better=True) == "better"
    assert verdict(lower, 2.0, lower_is_better=False) == "worse"
    assert verdict(lower, 4.0, lower_is_better=True) == "tie"
    assert samples_to_separate(lower, 100, 2.0) is None  # already separated
    close = Difference(estimate=1.0, se=1.0, draws=torch.zeros(2))  # [-1, 3]: half-width 2 must fall to 1
    assert samples_to_separate(close, 100, 2.0) == 400
    assert samples_to_separate(Difference(1.0, 1.0, torch.zeros(2)), 10, 1.5) == 23  # 10·2.25 → 23
    assert samples_to_separate(Difference(0.0, 1.0, torch.zeros(2)), 100, 2.0) is None
    nan = Difference(math.nan, 1.0, torch.zeros(2))
    assert samples_to_separate(nan, 100, 2.0) is None and not nan.decided(2.0) and verdict(nan, 2.0, True) == "tie"
    assert all(math.isnan(v) for v in nan.interval())

    apart = {frozenset(p) for p in [("a", "c"), ("a", "d"), ("c", "e")]}  # b ties a; d ties c; e ties d only

    def separated(x: str, y: str) -> bool:
        return frozenset((x, y)) in apart

    assert rank_groups(["a", "b", "c", "d", "e"], separated) == [["a", "b"], ["c", "d"], ["e"]]
    assert rank_groups([], separated) == []


@pytest.mark.parametrize("accuracy", [
    [0.5, 0.8, 0.95, 0.99],  # crosses between the 2nd and 3rd point
    [0.92, 0.95, 0.97, 0.99],  # already above the level at the first point: that point
    [0.5, 0.6, 0.7, 0.8],  # never reaches it: NaN
    [0.5, math.nan, 0.95, 0.99],  # a NaN point before the crossing: NaN, as the tables
    [0.5, 0.9, 0.9, 0.95],  # reaches the level exactly at a point
])
def test_matched_draws_full_is_the_tables_matched_strength(accuracy):
    level, gammas = 0.9, [1.0, 2.0, 4.0, 8.0]
    fid = [20.0, 12.0, 9.0, 15.0]
    rows = [{"method": "m", "scale": g / 2, "gamma": g, "accuracy": acc + dev, "fid": f + 10 * dev,
             "recall": 0.5} for g, acc, f in zip(gammas, accuracy, fid) for dev in (-0.01, 0.01)]
    expected = matched_strength(rows, level)["m"]["matched_fid"]
    order = [2, 0, 3, 1]  # matched_draws sorts by γ itself
    acc_cells = [pooled([CellDraws(r["accuracy"], [r["accuracy"]], [r["accuracy"]]) for r in rows
                         if r["gamma"] == gammas[i]]) for i in order]
    fid_cells_ = [pooled([CellDraws(r["fid"], [r["fid"]], [r["fid"]]) for r in rows if r["gamma"] == gammas[i]])
                  for i in order]
    got = matched_draws([gammas[i] for i in order], acc_cells, fid_cells_, level).full
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, rel=1e-12)


def test_matched_draws_interpolates_half_with_half_and_rest_with_rest():
    gammas = [0.0, 1.0, 2.0]
    acc = [CellDraws(0.5, [0.5, 0.95], [0.8, 0.5]), CellDraws(0.7, [0.7, 0.97], [1.0, 0.6]),
           CellDraws(1.0, [1.0, 0.99], [1.0, 0.7])]
    fid = [CellDraws(30.0, [30.0, 31.0], [29.0, 33.0]), CellDraws(20.0, [20.0, 21.0], [19.0, 23.0]),
           CellDraws(10.0, [10.0, 11.0], [9.0, 13.0])]
    got = matched_draws(gammas, acc, fid, level=0.9)
    assert got.full == pytest.approx(20 - 10 * (0.9 - 0.7) / (1.0 - 0.7))  # between γ = 1 and 2
    assert got.half[0].item() == pytest.approx(20 - 10 * (0.2 / 0.3))  # same path as full
    assert got.half[1].item() == 31.0  # already above at the first point
    assert got.rest[0].item() == pytest.approx(29 - 10 * (0.1 / 0.2))  # crosses between γ = 0 and 1
    assert got.rest[1].isnan()  # never reaches 0.9
