"""The paired verdicts as a figure and as a report.md section: each method's ΔFID against the reference
method with its joint interval, at the held-out best scale and at matched strength, zero drawn."""

from __future__ import annotations

import math
from pathlib import Path

from .plots import label_of, new_figure, save, style_of, wrap
from .verdicts import verdict_summary, verdict_table


def verdict_figure(verdicts: dict, directory: Path, title: str) -> Path:
    """`paired_delta_fid.png`: one panel per place (best scale, matched strength), one bar per method."""
    places = ("best scale", "matched strength")
    fig, axes = new_figure((10, 4.2), ncols=2, sharey=False)
    reference = verdicts["ranking"][0][0]
    for ax, place in zip(axes, places):
        comps = [c for c in verdicts["comparisons"]
                 if c["vs"] == reference and c["at"] == place and c["metric"] == "fid" and not math.isnan(c["delta"])]
        for y, c in enumerate(comps):
            color, marker = style_of(c["method"])
            ax.errorbar(c["delta"], y, xerr=[[c["delta"] - c["lo"]], [c["hi"] - c["delta"]]], fmt=marker,
                        color=color, capsize=4, ms=7)
            ax.annotate(c["verdict"], (c["hi"], y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
        ax.axvline(0.0, color="0.3", lw=1, ls="--")
        ax.set_yticks(range(len(comps)), [label_of(c["method"]) for c in comps])
        ax.set_ylim(-0.7, max(len(comps), 1) - 0.3)
        ax.set_xlabel(f"ΔFID vs {label_of(reference)} (lower is better)")
        ax.set_title(f"at {place}" + (" (held out)" if place == "best scale" else ""), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(wrap(f"Paired ΔFID, joint {verdicts['joint_level']:.0%} intervals ({verdicts['adjustment']}, "
                      f"{verdicts['comparisons_shown']} comparisons)\n{title}", 110), fontsize=10)
    return save(fig, directory / "paired_delta_fid.png")


def verdict_markdown(verdicts: dict, figure: str | None) -> list[str]:
    """report.md's section on which differences the sweep decides."""
    table = verdict_table(verdicts)
    header = list(dict.fromkeys(k for line in table for k in line))
    out = ["## Paired verdicts: which differences this sweep decides", "",
           "Every method against the best method and against CFG, as differences of paired cells (same noise, "
           "labels and random halves; pooled over seeds). At the best scale the scale is chosen on one half of each "
           "draw and measured on the other half. better / tie / worse is for the method against the one it is "
           "compared with.", ""]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(line.get(k, "")) for k in header) + " |" for line in table]
    out += ["", *[f"- {line}" for line in verdict_summary(verdicts)], ""]
    if figure:
        out += [f"![paired ΔFID]({figure})", ""]
    return out
