"""Comparing sweep cells: paired differences over shared half-sample draws, pooled over seeds.

- Paired design. Every cell of a sweep starts from the same noise and labels per sample index, and draw d of
  `intervals.half_indices` (one fixed generator) selects the same sample indices H_d in every cell. So the
  per-draw difference A(H_d) − B(H_d) cancels the noise the two cells share, and its sd over draws is the
  standard error of the full-sample difference A − B (for mean-like statistics a half's value has the full
  sample's spread: σ²/m·(1 − m/n) = σ²/n at m = n/2). Two per-cell intervals that overlap say little: with
  shared noise the cells move together, and `unpaired_se` (what independent noise would imply) is far wider.
- Pooling over seeds. Seeds are independent repetitions with the same halves: the estimate is the mean over
  seeds of the full-sample differences, and draw d is the mean over seeds of the draw-d differences, so the
  se narrows as 1/√seeds with nothing assumed about how the seeds differ.
- Held-out best scale. The best scale of a grid chosen and scored on the same samples looks better than it
  is (the minimum of noisy values is biased low). Per draw, `held_out_best` selects on the half H_d and scores
  the chosen scale on its complement, a disjoint sample: for a mean-like metric that score is unbiased for
  the chosen scale's true value; the in-sample value is kept to show the selection effect.
- Normal intervals, Bonferroni. Intervals are estimate ± z·se. With D ≈ 50 draws the percentiles beyond
  2.5/97.5% cannot be read off (at 10 comparisons, α/2k = 0.25% is below one draw in 50), so the Bonferroni
  tails of a joint 95% over the k comparisons shown use the normal quantile z = Φ⁻¹(1 − 0.05/2k) instead.
- Samples needed. `samples_to_separate` assumes the half-width shrinks as 1/√n (true for mean-like
  statistics, approximately for FID and the others at the sizes a sweep uses): an extrapolation, not a promise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import Tensor

Z95 = 1.959964  # two-sided 95% normal quantile


def _vector(x: Tensor | list[float], name: str) -> Tensor:
    v = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    if v.dim() != 1:
        raise ValueError(f"{name} must be one value per draw (shape (D,)), got shape {tuple(v.shape)}")
    return v


def _sd(v: Tensor) -> float:
    # Unbiased sd over draws; NaN (not 0) when fewer than two draws say nothing about the spread.
    return float(v.std(correction=1)) if len(v) > 1 else math.nan


@dataclass(frozen=True)
class CellDraws:
    """One cell, one metric, one seed: the metric on all samples, on each half H_d and on its complement."""

    full: float
    half: Tensor  # (D,) float64
    rest: Tensor  # (D,) float64

    def __post_init__(self) -> None:
        object.__setattr__(self, "full", float(self.full))
        object.__setattr__(self, "half", _vector(self.half, "half"))
        object.__setattr__(self, "rest", _vector(self.rest, "rest"))
        if len(self.half) != len(self.rest):
            raise ValueError(f"half has {len(self.half)} draws but rest has {len(self.rest)}")

    @property
    def draws(self) -> int:
        return len(self.half)


@dataclass(frozen=True)
class Difference:
    """A − B: the point estimate, its standard error and the per-draw differences it comes from."""

    estimate: float
    se: float
    draws: Tensor  # (D,)

    def interval(self, z: float = Z95) -> tuple[float, float]:
        """estimate ± z·se; (NaN, NaN) when either is NaN (an unknown interval is not made a real one)."""
        if math.isnan(self.estimate) or math.isnan(self.se):
            return math.nan, math.nan
        return self.estimate - z * self.se, self.estimate + z * self.se

    def decided(self, z: float) -> bool:
        """0 lies outside the interval (an undefined interval decides nothing)."""
        lo, hi = self.interval(z)
        return lo > 0 or hi < 0  # False for NaN


def _check_seeds(a: list[CellDraws], b: list[CellDraws] | None = None) -> int:
    """The common number of draws D; refuses empty lists, unequal seed counts and unequal D."""
    if not a or (b is not None and not b):
        raise ValueError("no seeds given: each side needs at least one CellDraws")
    if b is not None and len(a) != len(b):
        raise ValueError(f"seed counts differ: A has {len(a)} seeds, B has {len(b)} (pair them seed by seed)")
    counts = sorted({c.draws for c in [*a, *(b or [])]})
    if len(counts) > 1:
        raise ValueError(f"numbers of draws D differ across seeds/cells: {counts} (draw d must mean the same half)")
    return counts[0]


def pooled(draws_per_seed: list[CellDraws]) -> CellDraws:
    """The mean over seeds of full, of half[d] and of rest[d] (draw d averaged over seeds)."""
    _check_seeds(draws_per_seed)
    return CellDraws(full=float(torch.tensor([c.full for c in draws_per_seed], dtype=torch.float64).mean()),
                     half=torch.stack([c.half for c in draws_per_seed]).mean(0),
                     rest=torch.stack([c.rest for c in draws_per_seed]).mean(0))


def paired_difference(a: list[CellDraws], b: list[CellDraws]) -> Difference:
    """A − B with a[i], b[i] from the same seed: the mean over seeds of the full-sample differences; draw d is
    the mean over seeds of the draw-d differences, and the se their sd over draws."""
    _check_seeds(a, b)
    estimate = float(torch.tensor([x.full - y.full for x, y in zip(a, b)], dtype=torch.float64).mean())
    draws = torch.stack([x.half - y.half for x, y in zip(a, b)]).mean(0)
    return Difference(estimate=estimate, se=_sd(draws), draws=draws)


def unpaired_se(a: list[CellDraws], b: list[CellDraws]) -> float:
    """√(se_A² + se_B²) from each cell's own sd over draws (pooled over seeds): the se the per-cell intervals
    imply if the cells' noise were independent (the comparison that shows what pairing gains)."""
    _check_seeds(a, b)
    return math.hypot(_sd(pooled(a).half), _sd(pooled(b).half))


@dataclass(frozen=True)
class BestScale:
    """The best scale of a grid, chosen on each half H_d and scored on its complement."""

    scale: float  # the scale chosen most often across draws (ties: the smaller)
    chosen: Tensor  # (D,) index into the sorted scales chosen at each draw (−1: every value NaN)
    held_out: Tensor  # (D,) the metric on rest_d at the scale chosen on half_d
    in_sample: Tensor  # (D,) the metric on half_d at that scale (the optimistic value)

    @property
    def selection_effect(self) -> float:
        """mean(in_sample − held_out): negative for a lower-is-better metric (the in-sample best flatters)."""
        return float((self.in_sample - self.held_out).mean())


def held_out_best(grid: dict[float, CellDraws], lower_is_better: bool) -> BestScale:
    """Per draw d: the scale best on grid[s].half[d], scored by grid[s*].rest[d] (pass pooled CellDraws, one
    per scale). Selection and scoring use disjoint samples. NaN is never best (as `tables.best_index`)."""
    if not grid:
        raise ValueError("empty grid: no scales to choose from")
    scales = sorted(grid)
    _check_seeds([grid[s] for s in scales])
    half = torch.stack([grid[s].half for s in scales])  # (S, D)
    rest = torch.stack([grid[s].rest for s in scales])
    worst = math.inf if lower_is_better else -math.inf
    ranked = torch.where(half.isnan(), torch.full_like(half, worst), half)
    chosen = ranked.argmin(0) if lower_is_better else ranked.argmax(0)  # first of equals: the smaller scale
    picked = chosen[None]
    held_out, in_sample = rest.gather(0, picked)[0], half.gather(0, picked)[0]
    undefined = half.isnan().all(0)
    chosen = torch.where(undefined, torch.full_like(chosen, -1), chosen)
    held_out, in_sample = held_out.masked_fill(undefined, math.nan), in_sample.masked_fill(undefined, math.nan)
    counts = torch.bincount(chosen[chosen >= 0], minlength=len(scales))
    scale = scales[int(counts.argmax())] if int(counts.sum()) else math.nan  # argmax: first max, the smaller
    return BestScale(scale=scale, chosen=chosen, held_out=held_out, in_sample=in_sample)


def held_out_difference(a: BestScale, b: BestScale) -> Difference:
    """A − B of the held-out values of each method's own best scale, draw by draw (the same halves)."""
    if len(a.held_out) != len(b.held_out):
        raise ValueError(f"numbers of draws D differ: A has {len(a.held_out)}, B has {len(b.held_out)}")
    draws = a.held_out - b.held_out
    return Difference(estimate=float(draws.mean()) if len(draws) else math.nan, se=_sd(draws), draws=draws)


def _matched(effect: list[float], value: list[float], level: float) -> float:
    """`tables.matched_strength`'s rule for one curve (already sorted by γ): the first point where `effect`
    reaches `level`, interpolated from the point before; at/above the level at the first point: that point."""
    prev = None
    for eff, val in zip(effect, value):
        if not math.isnan(eff) and eff >= level:
            if prev is None or prev[0] >= level:
                return val + 0.0 * (val - val)  # its _lerp with f = 0 (NaN/inf behave alike)
            f = (level - prev[0]) / (eff - prev[0])
            return prev[1] + f * (val - prev[1])
        prev = (eff, val)
    return math.nan


def matched_draws(gammas: list[float], accuracy: list[CellDraws], metric: list[CellDraws], level: float) -> CellDraws:
    """The metric where accuracy first reaches `level` along increasing γ (linear interpolation, as
    `tables.matched_strength`), for full, each half and each rest separately (half with half, rest with
    rest); NaN where never reached. Pass pooled CellDraws, one per γ (the tables average over seeds first)."""
    if not len(gammas) == len(accuracy) == len(metric):
        raise ValueError(f"{len(gammas)} gammas but {len(accuracy)} accuracy and {len(metric)} metric cells")
    if not gammas:
        raise ValueError("no grid points given")
    order = sorted(range(len(gammas)), key=lambda i: gammas[i])  # stable, like the tables' sort by γ
    acc, met = [accuracy[i] for i in order], [metric[i] for i in order]
    _check_seeds(acc, met)

    def along(part: str) -> Tensor:
        a, m = torch.stack([getattr(c, part) for c in acc]), torch.stack([getattr(c, part) for c in met])
        return torch.tensor([_matched(a[:, d].tolist(), m[:, d].tolist(), level) for d in range(a.shape[1])],
                            dtype=torch.float64)

    full = _matched([c.full for c in acc], [c.full for c in met], level)
    return CellDraws(full=full, half=along("half"), rest=along("rest"))


def bonferroni_z(comparisons: int, level: float = 0.95) -> float:
    """The two-sided normal quantile at α/comparisons: joint `level` coverage over that many intervals."""
    if comparisons < 1:
        raise ValueError(f"comparisons must be at least 1, got {comparisons}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    return NormalDist().inv_cdf(1 - (1 - level) / (2 * comparisons))


def verdict(d: Difference, z: float, lower_is_better: bool) -> str:
    """'better' / 'tie' / 'worse' for A against B: 'tie' unless the interval excludes 0."""
    if not d.decided(z):
        return "tie"
    return "better" if (d.estimate < 0) == lower_is_better else "worse"


def samples_to_separate(d: Difference, n: int, z: float) -> int | None:
    """Samples per cell at which the interval would exclude 0 if the difference stayed at its estimate and
    the half-width shrank as 1/√n: n·(z·se/|estimate|)², rounded up. None if already separated, or the
    estimate is 0/NaN (or the se unknown)."""
    if d.decided(z) or math.isnan(d.estimate) or d.estimate == 0 or math.isnan(d.se):
        return None
    # round() first: float noise in an exact product must not add a sample
    return math.ceil(round(n * (z * d.se / abs(d.estimate)) ** 2, 9))


def rank_groups(order: list[str], separated: Callable[[str, str], bool]) -> list[list[str]]:
    """Groups of methods in `order` (best first): a method joins the current group while it is not separated
    from that group's first (best) member, i.e. 'tied with the leader of its group'; else it starts one."""
    groups: list[list[str]] = []
    for method in order:
        if groups and not separated(groups[-1][0], method):
            groups[-1].append(method)
        else:
            groups.append([method])
    return groups
