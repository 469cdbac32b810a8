"""Reading a sweep's rows: mean ± std over seeds per cell, the best scale per method, terminal tables."""

from __future__ import annotations

import math
from collections import defaultdict


def aggregate(rows: list[dict], metric: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """Per method: sorted (scale, gamma, mean, std over seeds) of `metric`."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["scale"])].append(r)
    out: dict[str, list] = defaultdict(list)
    for (method, scale), cell in sorted(groups.items()):
        values = [c[metric] for c in cell]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        out[method].append((scale, cell[0]["gamma"], mean, std))
    return dict(out)


def summary(rows: list[dict]) -> list[dict]:
    """Best FID per method (mean over seeds), with the accuracy and cost at that scale."""
    fid = aggregate(rows, "fid")
    acc = aggregate(rows, "accuracy")
    out = []
    for method, points in fid.items():
        i = min(range(len(points)), key=lambda k: points[k][2])
        scale, gamma, mean, std = points[i]
        cell = next(r for r in rows if r["method"] == method and math.isclose(r["scale"], scale))
        out.append({"method": method, "best_scale": scale, "gamma": gamma, "fid": mean, "fid_std": std,
                    "accuracy": acc[method][i][2], "accuracy_std": acc[method][i][3],
                    "nfe_per_sample": cell["nfe_per_sample"],
                    "classifier_grads_per_sample": cell["classifier_grads_per_sample"],
                    "seconds_per_sample": cell["seconds_per_sample"],
                    "seeds": sum(1 for r in rows if r["method"] == method and math.isclose(r["scale"], scale))})
    return out


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table for the terminal."""
    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
