"""The published trends a guidance sweep should reproduce, checked on its rows (mean over seeds)."""

from __future__ import annotations

import math

from lightning_modules.sweep import aggregate

RISE = 0.02  # accuracy must rise by more than this from the smallest to the largest scale, or ...
ERROR_CUT = 1 / 3  # ... its error rate 1 − accuracy must fall by this fraction (a model already near 100% cannot
# rise by RISE, yet going from 2.6% to 1.2% errors is the trend), and ...
SAG = 0.05  # ... end within this of its peak
DROP = 0.02  # recall at the largest scale must sit this far below its peak


def check_trends(rows: list[dict]) -> list[str]:
    """One 'ok' / 'NOT MET' line per (method, trend), with the numbers behind it: accuracy rises with scale,
    FID is best at a moderate scale (neither the smallest nor the largest swept), recall falls from its peak
    at the largest scale. A method with fewer than 3 scales cannot show a trend and gets one 'skipped' line."""
    lines = []
    acc, fid, rec = aggregate(rows, "accuracy"), aggregate(rows, "fid"), aggregate(rows, "recall")
    for method in acc:
        scales = [p[0] for p in acc[method]]
        a, f, r = [p[2] for p in acc[method]], [p[2] for p in fid[method]], [p[2] for p in rec[method]]
        if len(a) < 3:
            lines.append(f"  skipped  {method:10s} needs at least 3 scales for a trend (has {len(a)})")
            continue
        best = min(range(len(f)), key=lambda k: (math.isnan(f[k]), f[k]))
        peak = max(range(len(r)), key=lambda k: r[k])
        where = "the smallest" if best == 0 else "the largest" if best == len(f) - 1 else "a moderate"
        checks = [
            ("target-class accuracy rises with scale",
             (a[-1] > a[0] + RISE or 1 - a[-1] < (1 - a[0]) * (1 - ERROR_CUT)) and max(a) - a[-1] < SAG,
             f"{a[0]:.3f} at s={scales[0]:g} -> {a[-1]:.3f} at s={scales[-1]:g} (peak {max(a):.3f})"),
            ("FID best at a moderate scale (not the smallest, not the largest)", 0 < best < len(f) - 1,
             f"best {f[best]:.4g} at s={scales[best]:g}: {where} of {scales[0]:g}..{scales[-1]:g}"),
            ("recall falls from its peak at the largest scale", r[-1] < r[peak] - DROP,
             f"peak {r[peak]:.3f} at s={scales[peak]:g}, {r[-1]:.3f} at s={scales[-1]:g}"),
        ]
        for name, ok, detail in checks:
            lines.append(f"  {'ok     ' if ok else 'NOT MET'}  {method:10s} {name}: {detail}")
    return lines
