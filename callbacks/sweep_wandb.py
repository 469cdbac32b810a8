"""A sweep on W&B, organised the way the runs are compared.

History (one row per finished cell): each seed is its own series, `sweep/<method>/seed<k>/<metric>` against
the method's own axis `sweep/<method>/scale` (and `sweep/<method>/gamma`), with the cell's image grid under
`sweep/<method>/seed<k>/samples`. After the sweep: one chart per metric with every method against scale and
against γ, as mean and mean ± std over seeds (`sweep/<metric>_vs_<axis>`), the table behind them
(`sweep/curves`: method, metric, scale, gamma, mean, std, lower, upper, seeds), the table of every cell
(`sweep/table`) and the PNG plots (`sweep/plots/<name>`); `sweep.csv`, `sweep.json` and `report.md` as the
artifact `<sweep name>` of type "sweep-results" (`sweep_name`: `sweep-<run id>` for a run's own `<run>/sweep/`,
else the output directory's name), one version per run that changed them: `use_artifact("<name>:latest")`.

Summary: W&B shows a key's last logged value, which for a sweep is the last cell (largest scale, last seed),
not a result. So the summary is rewritten after the sweep to describe each method's *best* scale (lowest FID
mean over seeds): `sweep/<method>/best_fid` (mean), `best_fid_std`, `best_scale`, `best_gamma`,
`best_accuracy` (mean at that scale), `best_accuracy_std`, `best_seeds`; and every per-cell key
(`sweep/<method>/scale`, `.../gamma`, `.../seed<k>/<metric>`, `.../seed<k>/samples`) is overwritten with its
value at that best scale, so no last-logged value masquerades as a result.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from torch import Tensor

from callbacks.artifacts import artifact_name
from lightning_modules.evaluation.registry import METRICS
from lightning_modules.sweep import COLUMNS, SweepConfig, aggregate, summary
from lightning_modules.sweep.store import png_bytes

CURVE_COLUMNS = ["method", "metric", "scale", "gamma", "mean", "std", "lower", "upper", "seeds"]
RESULTS_TYPE = "sweep-results"
RESULT_FILES = ("sweep.csv", "sweep.json", "report.md")


def sweep_name(out_dir: Path) -> str:
    """A sweep's name on W&B (its run and its results artifact): `sweep-<run id>` for the default output directory
    `<run dir>/sweep`, else the output directory's own name."""
    out = Path(out_dir).resolve()
    return f"sweep-{out.parent.name}" if out.name == "sweep" else out.name


def log_results_artifact(run: Any, out_dir: Path, rows: list[dict]) -> None:
    """sweep.csv, sweep.json and report.md (those that exist) as a version of the artifact `sweep_name(out_dir)`,
    type "sweep-results"; W&B adds a version only when a file changed."""
    import wandb

    files = [Path(out_dir) / f for f in RESULT_FILES if (Path(out_dir) / f).is_file()]
    if not files:
        return
    artifact = wandb.Artifact(artifact_name(sweep_name(out_dir)), type=RESULTS_TYPE,
                              metadata={"cells": len(rows), "methods": sorted({r["method"] for r in rows}),
                                        "extractor": rows[0].get("extractor") if rows else None})
    for path in files:  # copied into W&B's staging area: a later sweep into this directory rewrites them
        artifact.add_file(str(path), name=path.name)
    run.log_artifact(artifact)


def cell_key(method: str, seed: int, name: str) -> str:
    """The history key of one seed's series: `sweep/<method>/seed<k>/<name>`."""
    return f"sweep/{method}/seed{int(seed)}/{name}"


def sweep_tags(config: SweepConfig, dataset: str | None = None) -> list[str]:
    """Tags that make sweeps filterable: the dataset, every method, the sampler."""
    return [t for t in (dataset, *config.methods, config.sampling.sampler) if t]


def add_tags(run: Any, tags: Iterable[str]) -> None:
    """Add tags to a live run, keeping the ones it has (and their order)."""
    old = tuple(run.tags or ())
    new = tuple(dict.fromkeys([*old, *tags]))
    if new != old:
        run.tags = new


def log_cell(run: Any, row: dict, grid: Tensor, columns: int = 10) -> None:
    """One finished cell: its metrics as the seed's own series against `sweep/<method>/scale`, + its grid
    (`columns` = the number of classes)."""
    import wandb

    method, seed = row["method"], row["seed"]
    axis = f"sweep/{method}/scale"
    run.define_metric(axis)
    run.define_metric(f"sweep/{method}/gamma", step_metric=axis)
    for name in (*METRICS, "samples"):
        run.define_metric(cell_key(method, seed, name), step_metric=axis)
    # The same picture as the cell's grid on disk: columns are classes, upscaled without blur. A cell shared
    # with an identical one (same_as) comes without a tensor: it logs no image of its own.
    images = None if grid is None else PILImage.open(io.BytesIO(png_bytes(grid, nrow=columns)))
    payload = {axis: row["scale"], f"sweep/{method}/gamma": row["gamma"],
               **{cell_key(method, seed, m): row[m] for m in METRICS}}
    if images is not None:
        payload[cell_key(method, seed, "samples")] = wandb.Image(images, caption=_caption(row))
    run.log(payload)


class WandbSweepLogger:
    """The sweep orchestration's W&B side (lightning_modules.sweep.orchestration.SweepLogger): each cell as it is
    stored, then the charts, tables, plots and the best-scale summary."""

    def __init__(self, run: Any, num_classes: int) -> None:
        self.run, self.num_classes = run, num_classes

    def cell(self, row: dict, grid: Tensor | None) -> None:
        log_cell(self.run, row, grid, self.num_classes)

    def sweep(self, rows: list[dict], figures: list[Path], out_dir: Path, verdicts: dict | None = None) -> None:
        log_sweep(self.run, rows, figures, grid_dir=out_dir)
        if verdicts is not None:
            log_verdicts(self.run, verdicts)
        log_results_artifact(self.run, out_dir, rows)


def log_verdicts(run: Any, verdicts: dict) -> None:
    """The paired comparisons as a table (`sweep/verdicts`) and as summary keys
    `verdict/<method>_vs_<ref>/<best_scale|matched>/<metric>` (Δ), `.../lo`, `.../hi`, `.../verdict`."""
    import wandb

    columns = ["method", "vs", "at", "metric", "delta", "lo", "hi", "verdict", "samples_to_separate",
               "holds_in_every_space"]
    run.log({"sweep/verdicts": wandb.Table(columns=columns, data=[[_json(c[k]) for k in columns]
                                                                     for c in verdicts["comparisons"]])})
    for c in verdicts["comparisons"]:
        key = f"verdict/{c['method']}_vs_{c['vs']}/{c['at'].replace(' ', '_')}/{c['metric']}"
        run.summary[key] = _json(c["delta"])
        run.summary[f"{key}/lo"], run.summary[f"{key}/hi"] = _json(c["lo"]), _json(c["hi"])
        run.summary[f"{key}/verdict"] = c["verdict"]
    run.summary["verdict/ranking"] = [" = ".join(g) for g in verdicts["ranking"]]


def log_sweep(run: Any, rows: list[dict], plot_paths: list[Path], grid_dir: Path | None = None) -> None:
    """The all-method charts with error bars, their table, the table of every cell, the PNGs; then the summary.

    `grid_dir` is the sweep's output directory (rows' `grid` paths are relative to it): with it, the summary's
    `.../samples` keys show the best scale's grids.
    """
    import wandb

    seeds = Counter((r["method"], r["scale"]) for r in rows)
    payload: dict[str, Any] = {"sweep/table": wandb.Table(columns=COLUMNS,
                                                          data=[[_json(r.get(c)) for c in COLUMNS] for r in rows])}
    curve_rows = []
    for metric in METRICS:
        curves = aggregate(rows, metric)
        for method, points in curves.items():
            curve_rows += [[method, metric, s, g, *map(_json, (mean, std, mean - std, mean + std)), seeds[(method, s)]]
                           for s, g, mean, std in points]
        for axis, index in (("scale", 0), ("gamma", 1)):
            payload[f"sweep/{metric}_vs_{axis}"] = _band_chart(curves, index, metric, axis)
    payload["sweep/curves"] = wandb.Table(columns=CURVE_COLUMNS, data=curve_rows)
    for path in plot_paths:
        payload[f"sweep/plots/{path.stem}"] = wandb.Image(str(path))
    run.log(payload)
    write_summary(run, rows, grid_dir)


def write_summary(run: Any, rows: list[dict], grid_dir: Path | None = None) -> None:
    """Per method, the best scale by FID mean over seeds (W&B sweeps rank runs by `sweep/<method>/best_fid`)."""
    import wandb

    for best in summary(rows):
        method, scale = best["method"], best["best_scale"]
        prefix = f"sweep/{method}"
        run.summary.update({f"{prefix}/best_fid": best["fid"], f"{prefix}/best_fid_std": best["fid_std"],
                            f"{prefix}/best_fid_lo": best["fid_lo"], f"{prefix}/best_fid_hi": best["fid_hi"],
                            f"{prefix}/best_scale": scale, f"{prefix}/best_gamma": best["gamma"],
                            f"{prefix}/best_accuracy": best["accuracy"],
                            f"{prefix}/best_accuracy_std": best["accuracy_std"], f"{prefix}/best_seeds": best["seeds"],
                            f"{prefix}/scale": scale, f"{prefix}/gamma": best["gamma"]})
        for row in rows:
            if row["method"] != method or not math.isclose(row["scale"], scale):
                continue
            run.summary.update({cell_key(method, row["seed"], m): row[m] for m in METRICS})
            grid = grid_dir / row["grid"] if grid_dir is not None and row.get("grid") else None
            if grid is not None and grid.is_file():
                run.summary[cell_key(method, row["seed"], "samples")] = wandb.Image(str(grid), caption=_caption(row))


def _band_chart(curves: dict[str, list[tuple[float, float, float, float]]], index: int, metric: str, axis: str):
    """Every method's mean over seeds, and mean ± std where a method has several seeds (line_series has no
    error bars; the same numbers are in `sweep/curves` for a custom chart)."""
    import wandb

    xs, ys, keys = [], [], []
    for method, points in curves.items():
        x = [p[index] for p in points]
        xs.append(x)
        ys.append([p[2] for p in points])
        keys.append(method)
        if any(p[3] > 0 for p in points):
            for sign, label in ((-1, "-1σ"), (1, "+1σ")):
                xs.append(x)
                ys.append([p[2] + sign * p[3] for p in points])
                keys.append(f"{method} {label}")
    return wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title=f"{metric} vs {axis} (mean ± std over seeds)",
                                  xname=axis)


def _json(value: Any) -> Any:
    """NaN (e.g. the std of one seed: no spread known) as null: table JSON has no NaN."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _caption(row: dict) -> str:
    return f"{row['method']} s={row['scale']:g} γ={row['gamma']:g} seed={row['seed']}"
