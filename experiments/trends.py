"""The published trends a guidance sweep should reproduce, checked on its rows (mean over seeds)."""

from __future__ import annotations

from lightning_modules.sweep import aggregate


def check_trends(rows: list[dict]) -> list[str]:
    """One 'ok' / 'NOT MET' line per (method, trend): accuracy rises with scale, FID is best at a
    moderate scale rather than the largest, recall falls at large scales."""
    lines = []
    acc, fid, rec = aggregate(rows, "accuracy"), aggregate(rows, "fid"), aggregate(rows, "recall")
    for method in acc:
        a, f, r = [p[2] for p in acc[method]], [p[2] for p in fid[method]], [p[2] for p in rec[method]]
        if len(a) < 3:
            continue
        checks = {
            "target-class accuracy rises with scale": a[-1] > a[0] and max(a) - a[-1] < 0.05,
            "FID best at a moderate scale, not the largest": min(range(len(f)), key=f.__getitem__) < len(f) - 1,
            "recall falls from its peak at the largest scale": r[-1] < max(r),
        }
        for name, ok in checks.items():
            lines.append(f"  {'ok     ' if ok else 'NOT MET'}  {method:10s} {name}")
    return lines
