"""Plots of a sweep: PNG files next to sweep.csv (the W&B charts show the same views).

metrics_vs_scale.png: one column per method on its own native scale axis (symlog where the grid spans
decades), rows are metrics. metrics_vs_gamma.png: all methods on the common γ axis, the full range (symlog)
above and a zoom on the range where the methods compete below. Every curve is the mean over seeds with a
±1 std band; a star marks each method's best-FID cell on every panel. Fronts and the cost figure are in
`fronts.py`, the sample grids in `grids.py`; `report.write_outputs` draws them all.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from lightning_modules.diffusion import RULES  # noqa: E402
from lightning_modules.evaluation.registry import REGISTRY  # noqa: E402
from lightning_modules.files import atomic_write as _atomic_write  # noqa: E402

from .tables import aggregate, best_index  # noqa: E402

METRIC_LABEL = {m.name: (m.label, m.direction) for m in REGISTRY}
# Label, colour and marker, and the scale axis of each method: the same in every figure, from its rule class.
METHOD_STYLE = {name: (rule.label, rule.color, rule.marker) for name, rule in RULES.items()}
SCALE_AXIS = {name: rule.scale_axis for name, rule in RULES.items()}
GAMMA_AXIS = "γ, the exponent on p(y|x) a scale implies (1 = conditional model)"
PANELS = (("fid",), ("accuracy",), ("precision", "recall"), ("score",), ("kid",))


def label_of(method: str) -> str:
    return METHOD_STYLE.get(method, (method,))[0]


def style_of(method: str) -> tuple[str, str]:
    """(colour, marker) of a method: the same in every figure."""
    _, colour, marker = METHOD_STYLE.get(method, (method, "tab:olive", "p"))
    return colour, marker


def ylabel(metrics: tuple[str, ...]) -> str:
    name = " / ".join(METRIC_LABEL[m][0] for m in metrics)
    return f"{name}\n({METRIC_LABEL[metrics[0]][1]})"


def finite(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def log_worthy(rows: list[dict], metric: str) -> bool:
    """A positive metric spanning more than a decade reads better on a log axis."""
    values = [r[metric] for r in rows if finite(r[metric])]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def log_axis(ax: Axes) -> None:
    """A log y axis with plain numbers at 1, 2, 5 × 10^k."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def new_figure(figsize: tuple[float, float], dpi: int = 110, **kw) -> tuple[Figure, Axes]:
    fig, axes = plt.subplots(figsize=figsize, dpi=dpi, layout="constrained", **kw)
    return fig, axes


def save(fig: Figure, path: Path) -> Path:
    """Write a figure atomically (a kill never leaves a half-written PNG)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, buffer.getvalue())
    return path


def protocol_title(rows: list[dict], protocol: dict | None = None) -> str:
    """One line: dataset · sampler, steps, η · samples per cell · seeds · feature space."""
    p, r = protocol or {}, rows[0] if rows else {}
    seeds = sorted({x["seed"] for x in rows})
    parts = [str(p.get("dataset", "dataset ?")),
             f"{str(r.get('sampler', '?')).upper()}, {r.get('steps', '?')} steps, η = {r.get('eta', float('nan')):g}",
             f"{r.get('num_samples', '?')} samples per cell",
             f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})"
             + ("" if len(seeds) > 1 else ": no spread shown"),
             f"{str(r.get('extractor', '?')).split('-')[0]} features"]  # the full id is in report.md
    return "  ·  ".join(parts)


def wrap(title: str, chars: int) -> str:
    """Break a protocol title at its '·' separators so no line is longer than `chars` (if it can)."""
    lines: list[str] = []
    for line in title.split("\n"):
        current = ""
        for part in line.split("  ·  "):
            joined = f"{current}  ·  {part}" if current else part
            if current and len(joined) > chars:
                lines.append(current)
                current = part
            else:
                current = joined
        lines.append(current)
    return "\n".join(lines)


def draw_curve(ax: Axes, xs: list[float], means: list[float], stds: list[float], method: str, best: int | None,
               dashed: bool = False) -> None:
    """Mean with a ±1 std band (where known) and a star at the best-FID cell."""
    colour, marker = style_of(method)
    ax.plot(xs, means, color=colour, marker=marker, markersize=4, lw=1.4, ls="--" if dashed else "-",
            mfc="white" if dashed else colour)
    lo = [m - s if finite(s) else m for m, s in zip(means, stds)]
    hi = [m + s if finite(s) else m for m, s in zip(means, stds)]
    if any(finite(s) for s in stds):
        ax.fill_between(xs, lo, hi, color=colour, alpha=0.18, lw=0)
    if best is not None and finite(means[best]):
        ax.plot([xs[best]], [means[best]], marker="*", markersize=13, color=colour, mec="black", mew=0.7, zorder=5)


def scale_axis(ax: Axes, values: list[float]) -> None:
    """Ticks at the swept values; symlog when they span decades (e.g. 0, 1, ..., 64)."""
    positive = sorted(v for v in values if v > 0)
    span = max(values) - min(values) or 1.0
    if positive and positive[-1] / positive[0] >= 10:
        ax.set_xscale("symlog", linthresh=positive[0], linscale=0.6)
        position = [math.copysign(math.log10(1 + abs(v) / positive[0]), v) for v in values]
        span = (max(position) - min(position)) or 1.0
    else:
        position = list(values)
    shown, last = [], -math.inf
    for v, pos in sorted(zip(values, position), key=lambda t: t[1]):
        if pos - last >= 0.06 * span:
            shown.append(v)
            last = pos
    ax.set_xticks(shown, [f"{v:g}" for v in shown], fontsize=7)
    ax.minorticks_off()


def metrics_vs_scale(rows: list[dict], directory: Path, title: str) -> Path:
    """Rows: metrics; columns: methods, each on its own native scale axis (y shared per metric)."""
    methods = list(aggregate(rows, "fid"))
    fid = aggregate(rows, "fid")
    fig, axes = new_figure((3.6 * len(methods) + 0.8, 2.3 * len(PANELS) + 0.9), sharey="row", squeeze=False,
                           nrows=len(PANELS), ncols=len(methods))
    for col, method in enumerate(methods):
        best = best_index([p[2] for p in fid[method]])
        offset = fid[method][0][1] - fid[method][0][0]
        gamma = "γ = s" if offset == 0 else f"γ = s {'+' if offset > 0 else '−'} {abs(offset):g}"
        axes[0, col].set_title(f"{label_of(method)}\n({gamma}; ★ = best FID, s = {fid[method][best][0]:g})",
                               fontsize=9, color=style_of(method)[0])
        for row, metrics in enumerate(PANELS):
            ax = axes[row, col]
            for k, metric in enumerate(metrics):
                pts = aggregate(rows, metric)[method]
                draw_curve(ax, [p[0] for p in pts], [p[2] for p in pts], [p[3] for p in pts], method, best, k > 0)
            scale_axis(ax, [p[0] for p in fid[method]])
            ax.grid(alpha=0.3)
            if col == 0:
                log = metrics == ("fid",) and log_worthy(rows, "fid")
                if log:
                    log_axis(ax)
                ax.set_ylabel(ylabel(metrics) + (", log axis" if log else ""), fontsize=8)
            if len(metrics) > 1 and col == len(methods) - 1:
                ax.plot([], [], "k-", label=metrics[0])
                ax.plot([], [], "k--", mfc="white", label=metrics[1])
                ax.legend(fontsize=7, loc="best")
        axes[-1, col].set_xlabel(SCALE_AXIS.get(method, "scale s"), fontsize=8)
    fig.suptitle(f"Metrics against each method's own guidance scale (mean ± 1 std over seeds)\n{title}", fontsize=10)
    return save(fig, directory / "metrics_vs_scale.png")


def zoom_range(rows: list[dict]) -> tuple[float, float]:
    """The γ range where the methods compete: from the median over methods of their smallest γ to the median of
    their largest, so neither the unconditional end (CFG s = 0, FID far above the rest) nor one method swept far
    out (CG on the unconditional branch, clean-classifier CG at s = 128) stretches the zoom back to the full
    range; those cells stay in the full-range panel."""
    fid = aggregate(rows, "fid")
    starts = sorted(min(p[1] for p in pts) for pts in fid.values())
    ends = sorted(max(p[1] for p in pts) for pts in fid.values())
    lo, hi = starts[len(starts) // 2], ends[(len(ends) - 1) // 2]  # upper / lower medians: with two methods,
    if hi <= lo:  # the span both share; if they share none, the whole range
        lo, hi = starts[0], ends[-1]
    pad = 0.05 * ((hi - lo) or 1.0)
    return lo - pad, hi + pad


def metrics_vs_gamma(rows: list[dict], directory: Path, title: str) -> Path:
    """All methods on the common γ axis: the full range (symlog) above, the competitive range below."""
    fid = aggregate(rows, "fid")
    gammas = [p[1] for pts in fid.values() for p in pts]
    lo, hi = zoom_range(rows)
    full_lo, full_hi = min(gammas), max(gammas)
    zoom = (hi - lo) < 0.6 * (full_hi - full_lo)
    nrows = 2 if zoom else 1
    fig, axes = new_figure((3.5 * len(PANELS), 3.0 * nrows + 1.2), squeeze=False, nrows=nrows, ncols=len(PANELS))
    for col, metrics in enumerate(PANELS):
        for row in range(nrows):
            ax = axes[row, col]
            visible = []
            for method, pts in fid.items():
                best = best_index([p[2] for p in pts])
                for k, metric in enumerate(metrics):
                    m = aggregate(rows, metric)[method]
                    draw_curve(ax, [p[1] for p in m], [p[2] for p in m], [p[3] for p in m], method, best, k > 0)
                    visible += [(p[2], p[3]) for p in m if row == 0 or lo <= p[1] <= hi]
            ax.grid(alpha=0.3)
            if row == 0 and full_hi >= 10:
                ax.set_xscale("symlog", linthresh=1.0, linscale=0.8)
                ticks = [t for t in (0, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256) if full_lo <= t <= full_hi]
                ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
                ax.minorticks_off()
            if row == 0 and metrics == ("fid",) and log_worthy(rows, "fid"):
                log_axis(ax)
            if row == 0 and zoom:
                ax.axvspan(lo, hi, color="0.5", alpha=0.1, lw=0)
            if row == 1:
                ax.set_xlim(lo, hi)
                ys = [v for m, s in visible for v in (m - (s if finite(s) else 0), m + (s if finite(s) else 0))
                      if finite(v)]
                if ys:
                    pad = 0.08 * ((max(ys) - min(ys)) or abs(max(ys)) or 1.0)
                    ax.set_ylim(min(ys) - pad, max(ys) + pad)
            ax.set_ylabel(" / ".join(METRIC_LABEL[m][0] for m in metrics), fontsize=8)
            if len(metrics) > 1 and row == 0:
                ax.plot([], [], "k-", label=metrics[0])
                ax.plot([], [], "k--", mfc="white", label=metrics[1])
                ax.legend(fontsize=7, loc="best")
            ax.set_title(ylabel(metrics).replace("\n", " ") if row == 0 else f"zoom: γ ∈ [{lo:.2g}, {hi:.2g}]",
                         fontsize=9)
            if row == nrows - 1:
                ax.set_xlabel(GAMMA_AXIS if col == len(PANELS) // 2 else "γ", fontsize=8)
    handles = [plt.Line2D([], [], color=style_of(m)[0], marker=style_of(m)[1], label=label_of(m)) for m in fid]
    handles.append(plt.Line2D([], [], ls="", marker="*", markersize=12, color="0.6", mec="black", label="best FID"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    what = f"top: full range (symlog), bottom: γ ∈ [{lo:.2g}, {hi:.2g}] (shaded above)" if zoom else "full range"
    fig.suptitle(f"Metrics against the common γ axis ({what}; mean ± 1 std over seeds)\n{title}", fontsize=10)
    return save(fig, directory / "metrics_vs_gamma.png")
