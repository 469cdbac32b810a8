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
                    "accuracy": acc[method][i][2], "accuracy_std": acc[method][i][3],
                    "nfe_per_sample": cell[0]["nfe_per_sample"],
                    "classifier_grads_per_sample": cell[0]["classifier_grads_per_sample"],
                    "guide_evals_per_sample": _get(cell[0], "guide_evals_per_sample", 0.0),
                    "unet_equivalents_per_sample": _get(cell[0], "unet_equivalents_per_sample", math.nan),
                    "seconds_per_sample": seconds, "seconds_per_sample_std": seconds_std, "seeds": len(cell)})
    return out


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
