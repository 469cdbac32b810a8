"""Plots of a sweep: PNG files next to sweep.csv (the W&B charts show the same views)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from .tables import aggregate  # noqa: E402

METRICS = ("fid", "kid", "score", "precision", "recall", "accuracy")


def save_plots(rows: list[dict], directory: Path) -> list[Path]:
    """metric vs scale and vs γ (mean ± std over seeds, all methods per chart), and the two fronts."""
    paths = []
    for axis, index in (("scale", 0), ("gamma", 1)):
        fig, axes = plt.subplots(2, 3, figsize=(13, 7))
        for ax, metric in zip(axes.flat, METRICS):
            for method, points in aggregate(rows, metric).items():
                xs = [p[index] for p in points]
                ax.errorbar(xs, [p[2] for p in points], yerr=[p[3] for p in points], marker="o", capsize=3,
                            label=method)
            ax.set_xlabel("guidance scale (native)" if axis == "scale" else "γ (exponent on p(y|x))")
            ax.set_title(metric)
            ax.grid(alpha=0.3)
        axes.flat[0].legend()
        fig.tight_layout()
        paths.append(_save(fig, directory / f"metrics_vs_{axis}.png"))
    for (mx, my), name in ((("accuracy", "fid"), "front_fid_vs_accuracy"),
                           (("recall", "precision"), "front_precision_vs_recall")):
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        xs_all, ys_all = aggregate(rows, mx), aggregate(rows, my)
        for method in xs_all:
            xs, ys = xs_all[method], ys_all[method]
            ax.errorbar([p[2] for p in xs], [p[2] for p in ys], xerr=[p[3] for p in xs],
                        yerr=[p[3] for p in ys], marker="o", capsize=3, label=method)
            for px, py in zip(xs, ys):
                ax.annotate(f"{px[0]:g}", (px[2], py[2]), fontsize=7, alpha=0.7)
        ax.set_xlabel(mx)
        ax.set_ylabel(my)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(_save(fig, directory / f"{name}.png"))
    return paths


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
