"""95% intervals over the generated samples for every metric of a cell (the reference set is held fixed).

Half-sampling: the metric on random halves of the samples, drawn without replacement and stratified by the
class each sample was generated for; the interval is the halves' 2.5–97.5% percentiles about their mean,
placed around the full-sample value.

- Why halves: for a mean-like statistic the spread of half-sample values equals the full sample's, because the
  finite-population variance σ²/m·(1 − m/n) is σ²/n at m = n/2 (the delete-d jackknife with d = n/2).
- Why not the bootstrap (n of n with replacement): a resample holds duplicates at distance 0 from each other, so
  k-NN radii shrink (recall falls by ~0.1), KID counts samples against themselves, and FID and the score move by
  far more than their spread (FID's small-sample bias grows as distinct samples fall to 63%): bootstrap
  percentiles need not even contain the full-sample value.
- Why stratified: a cell's labels are fixed by design; only its noise is random (see `half_indices`).
- Why centred: half-samples carry the metrics' small-sample bias too (FID's grows as n shrinks); centring keeps
  their spread and drops their shift.

Checked against the spread over independent sample sets in `tests/test_intervals.py`. All draws come from one
fixed generator, so every cell of a sweep uses the same halves (paired across cells).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .metrics import classifier_score, fid_from_stats, target_accuracy
from .registry import METRICS, RANGES

METRIC_RANGES = RANGES  # each metric's possible values; a centred interval can leave them (FID < 0 near 0)


def clip_interval(lo: float, hi: float, low: float, high: float) -> tuple[float, float]:
    """[lo, hi] clipped to [low, high]; NaN stays NaN (an undefined interval is not made a real one)."""
    def clip(v: float) -> float:
        return v if math.isnan(v) else min(max(v, low), high)

    return clip(lo), clip(hi)


def half_indices(strata: Tensor, draws: int, seed: int = 0) -> Tensor:
    """(draws, m) indices of random halves without replacement, stratified: half of each stratum's samples
    (⌊count/2⌋), so every half has the cell's class balance. A cell's labels are fixed by design (they cycle
    through the classes) and only its noise is random; a resample that let the class mix vary would measure
    mostly that (FID moves with the mean feature, which the class mix sets) and give intervals many times the
    spread over seeds. With a class of a single sample (a tiny cell) the halves are not stratified."""
    gen = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(strata.cpu() == c).flatten() for c in torch.unique(strata.cpu())]
    if min(len(m) for m in members) < 2:  # a class with one sample has no half: plain halves of everything
        members = [torch.arange(len(strata))]

    def half() -> Tensor:
        return torch.cat([m[torch.randperm(len(m), generator=gen)[: len(m) // 2]] for m in members])

    size = sum(len(m) // 2 for m in members)
    return torch.stack([half() for _ in range(draws)]) if draws else torch.zeros(0, size, dtype=torch.long)


def percentile_interval(values: Tensor) -> tuple[float, float]:
    """The 2.5% and 97.5% percentiles (NaN, NaN for no values or any NaN)."""
    v = values.double().flatten()
    if not len(v) or torch.isnan(v).any():
        return math.nan, math.nan
    q = torch.quantile(v, torch.tensor([0.025, 0.975], dtype=torch.float64, device=v.device))
    return float(q[0]), float(q[1])


def centred_interval(values: Tensor, full: float) -> tuple[float, float]:
    """Percentiles of the half-sample values about their mean, placed around the full-sample value."""
    v = values.double().flatten().cpu()
    lo, hi = percentile_interval(v - v.mean()) if len(v) else (math.nan, math.nan)
    return full + lo, full + hi


def precision_recall_of_subsets(real: Tensor, fake: Tensor, subsets: Tensor, k: int = 3) -> tuple[Tensor, Tensor]:
    """Improved precision / recall (Kynkäänniemi et al. 2019) of each subset of the fakes (rows of `subsets`)
    against all of `real`: torch-fidelity's definition (k-NN radius = distance to the k-th neighbour, a point
    is inside a ball when its distance ≤ the radius). The distance matrices are computed once (memory
    O(n_fake · (n_real + n_fake))); a subset is then only indexing."""
    r, f = real.float(), fake.float().to(real.device)
    subsets = subsets.to(r.device)
    radius_r = torch.cdist(r, r).kthvalue(k + 1, dim=1).values  # itself, at 0, is the 0th neighbour
    real_fake, fake_fake = torch.cdist(r, f), torch.cdist(f, f)
    precision = (real_fake <= radius_r[:, None]).any(dim=0).float()[subsets].mean(dim=1)
    if subsets.shape[1] <= k:  # too few samples for a k-NN radius within a subset
        return precision, torch.full((len(subsets),), math.nan, device=r.device)
    recall = [(real_fake[:, s] <= fake_fake[s][:, s].kthvalue(k + 1, dim=1).values).any(dim=1).float().mean()
              for s in subsets]
    return precision, torch.stack(recall) if recall else torch.zeros(0, device=r.device)


def kid_of_subsets(real: Tensor, fake: Tensor, subsets: Tensor, real_term: bool = True) -> Tensor:
    """Unbiased MMD² with KID's cubic kernel (x·y/d + 1)³ of each fake subset against all reals (float64).

    Kernel sums are computed once: K_ff over the fakes, and each fake's mean kernel value against the reals.
    `real_term=False` leaves out the reals' own term, the same constant for every subset (an N×N kernel: for
    a centred interval it is wasted work)."""
    r, f = real.double(), fake.double().to(real.device)
    d, n_r = r.shape[1], len(r)
    term_rr = torch.zeros((), dtype=torch.float64, device=r.device)
    if real_term:
        k_rr = (r @ r.T / d + 1) ** 3
        term_rr = (k_rr.sum() - k_rr.diagonal().sum()) / (n_r * (n_r - 1))
    k_ff = (f @ f.T / d + 1) ** 3
    fake_real_mean = ((f @ r.T / d + 1) ** 3).mean(dim=1)
    out = []
    for s in subsets.to(r.device):
        m = len(s)
        block = k_ff[s][:, s]
        out.append(term_rr + (block.sum() - block.diagonal().sum()) / (m * (m - 1)) - 2 * fake_real_mean[s].mean())
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def complements(halves: Tensor, strata: Tensor) -> Tensor:
    """(draws, m) indices of a disjoint other half for each half: per stratum, the samples not in the half, cut
    to the half's own count (a class with an odd count leaves its last unused sample out). Equal sizes matter:
    a held-out value on more samples than its in-sample twin would look better by FID's small-sample bias
    alone."""
    strata = strata.to(halves.device)
    out = []
    for half in halves:
        taken = torch.zeros(len(strata), dtype=torch.bool, device=halves.device)
        taken[half] = True
        parts = []
        for c in torch.unique(strata):
            members = torch.nonzero(strata == c).flatten()
            parts.append(members[~taken[members]][: int(taken[members].sum())])
        out.append(torch.cat(parts))
    return torch.stack(out) if out else halves


def subset_values(ref_feats: Tensor | None, ref_stats: tuple, feats: Tensor, logits: Tensor, labels: Tensor | None,
                  subsets: Tensor, k: int = 3) -> dict[str, Tensor]:
    """Every metric of METRICS on each subset of the samples (rows of `subsets`), float64 on the CPU. KID leaves
    out the reals' own kernel term, a constant of the reference set (the N×N kernel is not worth computing per
    cell): its values are exact up to that constant, so their differences and spread are exact. `ref_feats` None
    (statistics only): KID and precision/recall are NaN."""
    if ref_feats is None:
        precision = recall = kid = torch.full((len(subsets),), math.nan, dtype=torch.float64)
    else:
        precision, recall = precision_recall_of_subsets(ref_feats, feats, subsets, k)
        kid = kid_of_subsets(ref_feats, feats, subsets, real_term=False)
    y = None if labels is None else labels.to(logits.device)
    values = {"fid": [fid_from_stats(*ref_stats[:2], feats[h], sqrt_sigma_r=ref_stats[2]) for h in subsets],
              "kid": kid,
              "score": [classifier_score(logits[h]) for h in subsets],
              "precision": precision, "recall": recall,
              "accuracy": [math.nan if y is None else target_accuracy(logits[h], y[h]) for h in subsets]}
    return {m: torch.as_tensor(values[m], dtype=torch.float64).flatten().cpu() for m in METRICS}


def metric_draws(ref_feats: Tensor | None, ref_stats: tuple, feats: Tensor, logits: Tensor, labels: Tensor | None,
                 draws: int, k: int = 3, strata: Tensor | None = None) -> tuple[Tensor, dict, dict]:
    """(halves, values on each half, values on each half's complement): what a cell persists so that any two
    cells of a sweep can be compared draw by draw (same halves in every cell: one fixed generator)."""
    strata = labels if strata is None else strata
    halves = half_indices(torch.zeros(len(feats)) if strata is None else strata, draws).to(feats.device)
    half = subset_values(ref_feats, ref_stats, feats, logits, labels, halves, k)
    stratum = torch.zeros(len(feats), dtype=torch.long) if strata is None else strata
    if len(stratum) and int(torch.unique(stratum.cpu(), return_counts=True)[1].min()) < 2:
        stratum = torch.zeros(len(feats), dtype=torch.long)  # as half_indices: unstratified halves
    rest = subset_values(ref_feats, ref_stats, feats, logits, labels, complements(halves, stratum), k)
    return halves, half, rest


def metric_intervals(point: dict[str, float], ref_feats: Tensor | None, ref_stats: tuple, feats: Tensor, logits: Tensor,
                     labels: Tensor | None, draws: int, k: int = 3, strata: Tensor | None = None,
                     clip: bool = True, values: dict[str, Tensor] | None = None) -> dict[str, float]:
    """`<metric>_lo` / `<metric>_hi` for every metric in METRICS from `draws` random halves (NaN when draws = 0
    or the metric is; accuracy needs `labels`); `point` holds the full-sample values the intervals are placed
    around. `strata` = the classes the samples were generated for (default: `labels`; none = one stratum).
    `values`: the halves' values if already computed (`metric_draws`). Every interval is clipped to its
    metric's range (`METRIC_RANGES`): FID's lower bound never goes below 0; `clip=False` gives the raw centred
    intervals (to check their calibration)."""
    if values is None:
        strata = labels if strata is None else strata
        halves = half_indices(torch.zeros(len(feats)) if strata is None else strata, draws).to(feats.device)
        values = subset_values(ref_feats, ref_stats, feats, logits, labels, halves, k)
    ranges = {**METRIC_RANGES, "score": (1.0, float(logits.shape[1]))}  # IS ≤ K: p(y) uniform, each p(y|x) one-hot
    out: dict[str, float] = {}
    for name in METRICS:
        lo, hi = centred_interval(values[name], point[name])
        # Widened to hold the point value itself: KID's unbiased estimate can lie below 0, its interval then
        # reaches down to it (and no further), so lo <= value <= hi always holds.
        low, high = ranges[name]
        p = float(point[name])
        bounds = (min(low, p), max(high, p)) if math.isfinite(p) else (low, high)
        out[f"{name}_lo"], out[f"{name}_hi"] = clip_interval(lo, hi, *bounds) if clip else (lo, hi)
    return out
