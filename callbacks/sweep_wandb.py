"""A sweep on W&B: per-cell scalars against each method's own scale axis, all-method charts, the table
of every cell, the PNG plots, and a summary holding the best FID per method (not the last one logged)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor
from torchvision.utils import make_grid

from lightning_modules.sweep import COLUMNS, aggregate
from lightning_modules.sweep.plots import METRICS


def log_cell(run, row: dict, grid: Tensor) -> None:
    """One finished cell: its metrics against `sweep/<method>/scale` (exact metric names, no globs) + grid."""
    import wandb

    method = row["method"]
    axis = f"sweep/{method}/scale"
    run.define_metric(axis)
    for name in (*METRICS, "gamma", "samples"):
        run.define_metric(f"sweep/{method}/{name}", step_metric=axis)
    images = make_grid((grid + 1) / 2, nrow=min(len(grid), 10), padding=1)
    run.log({axis: row["scale"], f"sweep/{method}/gamma": row["gamma"],
             **{f"sweep/{method}/{m}": row[m] for m in METRICS},
             f"sweep/{method}/samples": wandb.Image(images, caption=f"{method} s={row['scale']:g} seed={row['seed']}")})


def log_sweep(run, rows: list[dict], plot_paths: list[Path]) -> None:
    """All methods on one chart per metric (vs scale and vs γ), the table of every cell, the PNGs."""
    import wandb

    table = wandb.Table(columns=COLUMNS, data=[[r.get(c) for c in COLUMNS] for r in rows])
    payload = {"sweep/table": table}
    for metric in METRICS:
        curves = aggregate(rows, metric)
        methods = list(curves)
        for axis, index in (("scale", 0), ("gamma", 1)):
            payload[f"sweep/{metric}_vs_{axis}"] = wandb.plot.line_series(
                xs=[[p[index] for p in curves[m]] for m in methods], ys=[[p[2] for p in curves[m]] for m in methods],
                keys=methods, title=f"{metric} vs {axis}", xname=axis)
    for path in plot_paths:
        payload[f"sweep/plots/{path.stem}"] = wandb.Image(str(path))
    run.log(payload)
    # W&B sweeps rank runs by the summary: give them the best FID over scales (mean over seeds) per method.
    for method, points in aggregate(rows, "fid").items():
        best = min(points, key=lambda p: p[2])
        run.summary[f"sweep/{method}/best_fid"] = best[2]
        run.summary[f"sweep/{method}/best_scale"] = best[0]
