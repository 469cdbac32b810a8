"""Reading a sweep's rows: mean ± std over seeds per cell, the best scale per method, terminal tables."""

from __future__ import annotations

import math
from collections import defaultdict


def aggregate(rows: list[dict], metric: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """Per method: sorted (scale, gamma, mean, std over seeds) of `metric`; std is NaN for one seed."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["scale"])].append(r)
    out: dict[str, list] = defaultdict(list)
    for (method, scale), cell in sorted(groups.items()):
        mean, std = mean_std([c[metric] for c in cell])
        out[method].append((scale, cell[0]["gamma"], mean, std))
    return dict(out)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation; the std is NaN for one value (no spread is known, not zero)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
    return mean, std


def best_index(values: list[float]) -> int:
    """Index of the smallest value, NaNs last (a failed cell is never 'best')."""
    return min(range(len(values)), key=lambda k: (math.isnan(values[k]), values[k]))


def interval_mean(cell: list[dict], key: str) -> float:
    """A cell's interval end (`<metric>_lo` / `_hi`, over samples) averaged over its seeds; NaN if not recorded."""
    return sum(_get(r, key, math.nan) for r in cell) / len(cell)


def _get(row: dict, key: str, default: float) -> float:
    value = row.get(key, default)
    return default if value is None or (isinstance(value, float) and math.isnan(value)) else value


def passes(row: dict) -> float:
    """Network passes per sample, unweighted: diffusion evaluations + classifier fwd/bwd + guide evaluations."""
    return row["nfe_per_sample"] + row["classifier_grads_per_sample"] + _get(row, "guide_evals_per_sample", 0.0)


def passes_text(row: dict) -> str:
    """'50 model + 0 classifier' (+ guide evaluations where a cell has them)."""
    guide = _get(row, "guide_evals_per_sample", 0.0)
    return (f"{row['nfe_per_sample']:g} model + {row['classifier_grads_per_sample']:g} classifier"
            + (f" + {guide:g} guide" if guide else ""))


SUMMARY_TITLE = "Best FID per method (mean, std over seeds, 95% interval over samples [lo, hi]; cost per sample)"
# The summary's columns on a terminal (experiments.compare and experiments.sweep print the same table).
SUMMARY_COLUMNS = ["method", "best_scale", "gamma", "fid", "fid_std", "fid_lo", "fid_hi", "accuracy", "accuracy_std",
                   "nfe_per_sample", "classifier_grads_per_sample", "guide_evals_per_sample",
                   "unet_equivalents_per_sample", "seconds_per_sample", "training_flops", "seeds"]


def summary(rows: list[dict]) -> list[dict]:
    """Best FID per method (mean over seeds), with the accuracy and the cost of that cell (its own rows)."""
    fid = aggregate(rows, "fid")
    acc = aggregate(rows, "accuracy")
    out = []
    for method, points in fid.items():
        i = best_index([p[2] for p in points])
        scale, gamma, mean, std = points[i]
        cell = [r for r in rows if r["method"] == method and math.isclose(r["scale"], scale)]
        seconds, seconds_std = mean_std([r["seconds_per_sample"] for r in cell])
        out.append({"method": method, "best_scale": scale, "gamma": gamma, "fid": mean, "fid_std": std,
                    "fid_lo": interval_mean(cell, "fid_lo"), "fid_hi": interval_mean(cell, "fid_hi"),
                    "accuracy": acc[method][i][2], "accuracy_std": acc[method][i][3],
                    "nfe_per_sample": cell[0]["nfe_per_sample"],
                    "classifier_grads_per_sample": cell[0]["classifier_grads_per_sample"],
                    "guide_evals_per_sample": _get(cell[0], "guide_evals_per_sample", 0.0),
                    "unet_equivalents_per_sample": _get(cell[0], "unet_equivalents_per_sample", math.nan),
                    "seconds_per_sample": seconds, "seconds_per_sample_std": seconds_std, "seeds": len(cell),
                    "training_flops": _get(cell[0], "training_flops", math.nan)})
    level = matched_level(rows)
    for entry in out:
        entry.update({"matched_accuracy": level, **matched_strength(rows, level).get(entry["method"], {})})
    return out


MATCHED_ACCURACY = 0.99  # high enough that a good conditional model needs guidance to reach it


def matched_level(rows: list[dict], metric: str = "accuracy", target: float = MATCHED_ACCURACY) -> float:
    """The level methods are compared at: `target` (NaN when the rows have no such metric, e.g. Inception's
    ImageNet logits give no target-class accuracy). A method that never reaches it gets NaN there."""
    values = [p[2] for points in aggregate(rows, metric).values() for p in points]
    return target if any(not math.isnan(v) for v in values) else math.nan


def matched_strength(rows: list[dict], level: float, metric: str = "accuracy") -> dict[str, dict]:
    """Per method, the first point along increasing γ where mean `metric` reaches `level`, linearly
    interpolated between grid points, with FID and recall there: methods compared at equal effect rather
    than at equal nominal scale (more CFG alone matches many methods at equal scale)."""
    out = {}
    curves = {m: sorted(zip(*(aggregate(rows, k)[m] for k in (metric, "fid", "recall"))), key=lambda p: p[0][1])
              for m in aggregate(rows, metric)}
    for method, points in curves.items():
        prev = None
        for eff, fid, recall in points:
            if not math.isnan(eff[2]) and eff[2] >= level:
                if prev is None or prev[0][2] >= level:
                    f = 0.0
                    prev = (eff, fid, recall)
                else:
                    f = (level - prev[0][2]) / (eff[2] - prev[0][2])
                out[method] = {"matched_scale": _lerp(prev[0][0], eff[0], f),
                               "matched_gamma": _lerp(prev[0][1], eff[1], f),
                               "matched_fid": _lerp(prev[1][2], fid[2], f),
                               "matched_recall": _lerp(prev[2][2], recall[2], f)}
                break
            prev = (eff, fid, recall)
        else:
            out[method] = {k: math.nan for k in ("matched_scale", "matched_gamma", "matched_fid", "matched_recall")}
    return out


def _lerp(a: float, b: float, f: float) -> float:
    return a + f * (b - a)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table for the terminal."""
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "—" if math.isnan(v) else f"{v:.4g}"  # NaN: not measured (e.g. the std of one seed)
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
