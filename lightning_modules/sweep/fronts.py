"""Trade-off figures: the FID–accuracy and precision–recall fronts, and best FID against cost per sample.

Fronts: when the good corner is a clump, the main panel is a zoom on it (the non-dominated cells and each
method's best-FID cell) and a small panel beside it shows the full range with the zoom outlined. Labels are
the native scales, placed where they collide with no other label or marker (a label that cannot be placed
is left out: the best-FID and non-dominated cells are placed first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .plots import METRIC_LABEL, finite, label_of, new_figure, save, style_of, wrap
from .tables import aggregate, best_index, passes, passes_text, summary

OFFSETS = ((5, 4, "left", "bottom"), (5, -4, "left", "top"), (-5, 4, "right", "bottom"),
           (-5, -4, "right", "top"), (0, 8, "center", "bottom"), (0, -8, "center", "top"),
           (9, 0, "left", "center"), (-9, 0, "right", "center"), (12, 12, "left", "bottom"),
           (-12, -12, "right", "top"), (12, -12, "left", "top"), (-12, 12, "right", "bottom"),
           (0, 18, "center", "bottom"), (0, -18, "center", "top"), (20, 0, "left", "center"),
           (-20, 0, "right", "center"))
BOUNDED = {"accuracy", "precision", "recall"}  # shares: an axis never needs to reach past 1


@dataclass
class Point:
    method: str
    scale: float
    x: float
    y: float
    xerr: float
    yerr: float
    best: bool = False
    key: bool = False  # non-dominated or best: labelled first, and inside the zoom


def place_labels(fig: Figure, ax: Axes, items: list[tuple[float, float, str, str, bool]],
                 markers: list[tuple[float, float]], fontsize: float = 7, big: float = 10) -> int:
    """Annotate (x, y, text, colour, bold) in order, each at the first offset whose box overlaps no placed
    label, no marker and stays inside the axes; returns how many were placed. A bold item marks a big marker
    (a best-FID star): its label keeps `big` points further out and its marker is a larger obstacle."""
    fig.canvas.draw()
    fig.set_layout_engine("none")  # freeze the layout: labels are placed in screen coordinates
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    to_screen = ax.transData.transform
    px = fig.dpi / 72  # pixels per point
    bigs = {(x, y) for x, y, *_, bold in items if bold}
    own: dict[tuple[float, float], tuple[float, float, float, float]] = {}
    for mx, my in markers:
        if min(xlim) <= mx <= max(xlim) and min(ylim) <= my <= max(ylim):
            sx, sy = to_screen((mx, my))
            r = (big / 2 + 1 if (mx, my) in bigs else 3) * px
            own[(mx, my)] = (sx - r, sy - r, sx + r, sy + r)
    boxes = list(own.values())
    placed = 0
    for x, y, text, colour, bold in items:
        if not (min(xlim) <= x <= max(xlim) and min(ylim) <= y <= max(ylim)):
            continue
        extra = big / 2 if bold else 0.0
        for dx, dy, ha, va in OFFSETS:
            shift = (dx + math.copysign(extra, dx) if dx else 0.0, dy + math.copysign(extra, dy) if dy else 0.0)
            leader = {"arrowprops": {"arrowstyle": "-", "lw": 0.5, "color": colour, "shrinkA": 0,
                                     "shrinkB": big / 2 if bold else 3}} if max(abs(dx), abs(dy)) >= 12 else {}
            ann = ax.annotate(text, (x, y), xytext=shift, textcoords="offset points", ha=ha, va=va,
                              fontsize=fontsize, color=colour, fontweight="bold" if bold else "normal", **leader)
            e = ann.get_window_extent(renderer)
            box = (e.x0 - 1, e.y0 - 1, e.x1 + 1, e.y1 + 1)
            inside = frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] and box[3] <= frame.y1
            clear = not any(_overlap(box, b) for b in boxes)
            if inside and clear:
                boxes.append(box)
                placed += 1
                break
            ann.remove()
    return placed


def _overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def front_points(rows: list[dict], mx: str, my: str, x_high: bool, y_high: bool) -> list[Point]:
    xs, ys, fid = aggregate(rows, mx), aggregate(rows, my), aggregate(rows, "fid")
    points = []
    for method in xs:
        best = best_index([p[2] for p in fid[method]])
        for i, (px, py) in enumerate(zip(xs[method], ys[method])):
            points.append(Point(method, px[0], px[2], py[2], px[3], py[3], best=i == best))
    sx, sy = (1 if x_high else -1), (1 if y_high else -1)
    for p in points:
        dominated = any(sx * q.x >= sx * p.x and sy * q.y >= sy * p.y and (q.x != p.x or q.y != p.y)
                        for q in points)
        p.key = p.best or not dominated
    return points


def _bounds(points: list[Point], errors: bool = True) -> tuple[float, float, float, float]:
    def e(v: float) -> float:
        return v if errors and finite(v) else 0.0
    return (min(p.x - e(p.xerr) for p in points), max(p.x + e(p.xerr) for p in points),
            min(p.y - e(p.yerr) for p in points), max(p.y + e(p.yerr) for p in points))


def _draw(ax: Axes, points: list[Point], small: bool = False) -> None:
    for method in dict.fromkeys(p.method for p in points):
        colour, marker = style_of(method)
        pts = sorted((p for p in points if p.method == method), key=lambda p: p.scale)
        ax.errorbar([p.x for p in pts], [p.y for p in pts], xerr=[p.xerr if finite(p.xerr) else 0 for p in pts],
                    yerr=[p.yerr if finite(p.yerr) else 0 for p in pts], color=colour, marker=marker,
                    markersize=3 if small else 5, lw=1, elinewidth=0.8, capsize=0 if small else 2, alpha=0.9)
        for p in pts:
            if p.best:
                ax.plot([p.x], [p.y], marker="*", markersize=8 if small else 14, color=colour, mec="black",
                        mew=0.7, zorder=5)
    ax.grid(alpha=0.3)


def front_figure(rows: list[dict], directory: Path, title: str, mx: str, my: str, x_high: bool, y_high: bool,
                 name: str, focus_factor: float | None) -> Path:
    points = front_points(rows, mx, my, x_high, y_high)
    key = [p for p in points if p.key]
    if focus_factor is not None:  # leave out non-dominated cells far worse than every method's best
        limit = focus_factor * max(p.y for p in points if p.best)
        key = [p for p in key if p.best or p.y <= limit]
    fx0, fx1, fy0, fy1 = _bounds(points)
    zx0, zx1, zy0, zy1 = _bounds(key, errors=False)
    padx, pady = max(0.1 * (zx1 - zx0), 0.02 * (fx1 - fx0)), max(0.1 * (zy1 - zy0), 0.02 * (fy1 - fy0))
    zx0, zx1, zy0, zy1 = zx0 - padx, zx1 + padx, zy0 - pady, zy1 + pady
    zoom = (zx1 - zx0) < 0.5 * (fx1 - fx0) or (zy1 - zy0) < 0.5 * (fy1 - fy0)
    zx1, fx1 = (min(v, 1.005) if mx in BOUNDED else v for v in (zx1, fx1))
    zy1, fy1 = (min(v, 1.005) if my in BOUNDED else v for v in (zy1, fy1))
    xlabel = f"{METRIC_LABEL[mx][0]} ({METRIC_LABEL[mx][1]} {'→' if x_high else '←'})"
    ylabel = f"{METRIC_LABEL[my][0]} ({METRIC_LABEL[my][1]} {'↑' if y_high else '↓'})"
    if zoom:
        fig, (overview, ax) = new_figure((11, 5.6), ncols=2, width_ratios=[1, 1.9])
        _draw(overview, points, small=True)
        if mx in BOUNDED:
            overview.set_xlim(right=max(fx1, zx1) + 0.02 * (fx1 - fx0))
        if my in BOUNDED:
            overview.set_ylim(top=max(fy1, zy1) + 0.02 * (fy1 - fy0))
        overview.add_patch(Rectangle((zx0, zy0), zx1 - zx0, zy1 - zy0, fill=False, ec="black", lw=1, ls="--"))
        overview.set_title("full range (dashed box: zoom)", fontsize=9)
        overview.set_xlabel(xlabel, fontsize=8)
        overview.set_ylabel(ylabel, fontsize=8)
        ax.set_title("zoom on the best cells (non-dominated, and each method's best FID)", fontsize=9)
    else:
        fig, ax = new_figure((7.5, 5.6))
    _draw(ax, points)
    if zoom:
        ax.set_xlim(zx0, zx1)
        ax.set_ylim(zy0, zy1)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    handles = [ax.plot([], [], color=style_of(m)[0], marker=style_of(m)[1], label=label_of(m))[0]
               for m in dict.fromkeys(p.method for p in points)]
    handles.append(ax.plot([], [], ls="", marker="*", markersize=12, color="0.6", mec="black", label="best FID")[0])
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(wrap(f"{METRIC_LABEL[my][0]} against {METRIC_LABEL[mx][0]} (mean ± 1 std over seeds; labels: "
                      f"native scale s)\n{title}", int(fig.get_figwidth() * 13)), fontsize=10)
    order = sorted(points, key=lambda p: (not p.best, not p.key))
    place_labels(fig, ax, [(p.x, p.y, f"{p.scale:g}", style_of(p.method)[0], p.best) for p in order],
                 [(p.x, p.y) for p in points])
    return save(fig, directory / f"{name}.png")


def front_figures(rows: list[dict], directory: Path, title: str) -> list[Path]:
    return [front_figure(rows, directory, title, "accuracy", "fid", True, False, "front_fid_vs_accuracy", 3.0),
            front_figure(rows, directory, title, "recall", "precision", True, True, "front_precision_vs_recall",
                         None)]


def cost_figure(rows: list[dict], directory: Path, title: str) -> Path:
    """best_fid_vs_cost.png: each method's best FID (± std) against its network passes and wall seconds per sample,
    and (where the rows record it) against the training FLOPs of the diffusion model it sampled."""
    best = summary(rows)
    trained = [b for b in best if finite(b["training_flops"])]
    reference = [r["fid"] for r in rows if (r["method"], r["scale"]) in (("cfg", 1.0), ("cg_cond", 0.0))]
    weighted = all(finite(b["unet_equivalents_per_sample"]) for b in best)  # rows that carry FLOP-weighted cost
    panels = (("passes", "cost per sample in diffusion-network evaluations (classifier / guide passes weighted by "
               "their FLOPs)" if weighted else "network passes per sample: diffusion-model evaluations + classifier "
               "forward/backward passes", lambda b: (b["unet_equivalents_per_sample"] if weighted else passes(b),
                                                     math.nan)),
              ("seconds", "wall seconds per sample (as recorded for the cell)",
               lambda b: (b["seconds_per_sample"], b["seconds_per_sample_std"])))
    if len(trained) == len(best):  # guidance trained in (MG, GFT) pays here instead
        panels += (("training", "training PFLOPs of the diffusion model it samples (a fine-tune's start included)",
                    lambda b: (b["training_flops"] / 1e15, math.nan)),)
    fig, axes = new_figure((5.5 * len(panels), 4.8), ncols=len(panels))
    labels: list[list[tuple[float, float, str, str, bool]]] = []
    for ax, (what, xlabel, cost) in zip(axes, panels):
        items = []
        for b in best:
            colour, marker = style_of(b["method"])
            x, xerr = cost(b)
            ax.errorbar([x], [b["fid"]], xerr=[xerr if finite(xerr) else 0], yerr=[b["fid_std"] if finite(
                b["fid_std"]) else 0], color=colour, marker=marker, markersize=8, capsize=3, lw=0, elinewidth=1.2,
                label=label_of(b["method"]))
            detail = (passes_text(b) + (f"\n≈ {x:.3g} model evaluations" if weighted else "")
                      if what == "passes" else f"{x:.3g} s" if what == "seconds" else f"{x:.3g} PFLOP")
            items.append((x, b["fid"], f"{label_of(b['method'])}, s = {b['best_scale']:g}\n{detail}", colour, False))
        if reference:  # named in the legend: a text on the line would collide with the methods' labels
            ax.axhline(sum(reference) / len(reference), color="0.4", ls=":", lw=1,
                       label="conditional model, no guidance")
        xs = [cost(b)[0] for b in best]
        ax.set_xlim(0, max(xs) * 1.45 if xs and max(xs) > 0 else 1)
        ys = [b["fid"] + (b["fid_std"] if finite(b["fid_std"]) else 0) for b in best] + reference
        ax.set_ylim(0, max(ys) * 1.3 if ys else 1)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("best FID over scales (lower is better ↓)", fontsize=8)
        ax.grid(alpha=0.3)
        labels.append(items)
    axes[0].legend(fontsize=8, loc="best")
    also = " and its model's training cost" if len(panels) == 3 else ""
    fig.suptitle(f"Best FID per method against its cost per sample{also} (mean ± 1 std over seeds)\n{title}",
                 fontsize=10)
    for ax, items in zip(axes, labels):
        place_labels(fig, ax, items, [(x, y) for x, y, *_ in items], fontsize=7.5)
    return save(fig, directory / "best_fid_vs_cost.png")
