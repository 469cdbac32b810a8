"""Everything a sweep leaves for a reader: the figures and `report.md`, next to sweep.csv.

    paths = write_outputs(rows, out_dir, protocol={"dataset": "digits", "image_size": 8}, class_names=names)

`protocol` carries what the rows do not (all keys optional): dataset, dataset_id, image_size (also lets
grids written by an older version be read), diffusion / classifier (checkpoint paths), guidance (the shared
guidance options, a dict), precision. Pure torch/stdlib + matplotlib.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from lightning_modules.diffusion import RULES, OptionError
from lightning_modules.files import atomic_write as _atomic_write

from .bad_version import bad_version_markdown
from .fronts import cost_figure, front_figures
from .grids import progression_figures
from .plots import label_of, metrics_vs_gamma, metrics_vs_scale, protocol_title
from .tables import interval_mean, mean_std, passes, passes_text, summary
from .training_costs import training_cost_markdown
from .verdict_figure import verdict_figure, verdict_markdown

HEADINGS = {"best_fid_vs_cost": "Best FID against cost", "metrics_vs_scale": "Metrics against each method's scale",
            "metrics_vs_gamma": "Metrics against γ", "front_fid_vs_accuracy": "FID–accuracy front",
            "front_precision_vs_recall": "Precision–recall front"}
CAPTIONS = {
    "best_fid_vs_cost": "Each method's best FID (over its scales) against what a sample costs: network passes "
                        "(diffusion-model evaluations + classifier forward/backward passes) and wall seconds.",
    "metrics_vs_scale": "Every metric against each method's own guidance scale (one column per method; ★ = the "
                        "method's best-FID scale).",
    "metrics_vs_gamma": "The same metrics on the common axis γ (the exponent on p(y|x) a scale implies), with a zoom "
                        "on the range where the methods compete.",
    "front_fid_vs_accuracy": "Fidelity against class adherence: the best cells sit bottom right.",
    "front_precision_vs_recall": "Precision (samples look real) against recall (coverage of the data): top right is "
                                 "best; guidance usually trades recall for precision.",
}
METRIC_NOTES = [
    ("FID", "Fréchet distance between Gaussian fits to the features of the samples and of the reference data "
            "(lower is better). {fid_space} Small-sample FID is biased upwards: compare cells of one sweep (same "
            "number of samples), and use 50k samples for final numbers."),
    ("KID", "Kernel inception distance (polynomial-kernel MMD², subset average) in the same features (lower is "
            "better). It is an unbiased estimate, so it **can be slightly negative** when the two distributions "
            "are close: read a small negative value as zero."),
    ("score", "exp(E_x KL(p(y|x) ‖ p(y))) on the extractor's logits: the Inception score when the extractor is "
              "Inception, its analogue on the evaluator's classes otherwise (higher is better; at most the number "
              "of classes)."),
    ("precision / recall", "Share of samples inside the real data's k-NN manifold (k = 3) / share of real data "
                           "inside the samples' manifold (higher is better)."),
    ("accuracy", "Share of samples the extractor's classifier assigns to the class they were generated for "
                 "(higher is better)."),
    ("γ", "The exponent on p(y|x) a scale implies (for methods whose guide is not p(y|x), the CFG-like axis "
          "their scale is read on): "
     + "; ".join(dict.fromkeys(r.gamma_text for r in RULES.values() if r.name != "none"))
     + ". γ = 1 is the plain conditional model."),
    ("cost", "`nfe_per_sample` counts diffusion-network evaluations a cell needs by itself (a batched CFG "
             "forward of 2B counts 2), `classifier_grads_per_sample` classifier forward+backward passes (and "
             "`guide_evals_per_sample` guide-network evaluations); where the rows carry it, ≈ gives the total in "
             "diffusion-network evaluations with the other passes weighted by their FLOPs. Wall seconds are as "
             "recorded in the cell's rows."),
    ("± std", "Standard deviation over sampling seeds; **—** means one seed, so no spread was measured."),
    ("[lo, hi]", "95% interval over the generated samples with the reference data held fixed: the metric on "
                 "random halves of the samples, half of each class (the labels are fixed by design; no sample "
                 "twice, unlike a bootstrap resample, whose duplicates bias FID, KID and recall), their "
                 "percentiles about their mean placed around the full value; averaged over seeds. Every row of "
                 "`sweep.csv` has `<metric>_lo` / `<metric>_hi`."),
]


class OutputsIncomplete(OptionError):
    """Some figures could not be written (a full disk, permissions): raised after everything else was written,
    so the caller can still hand on what exists (`figures`) and then fail, instead of exiting 0."""

    def __init__(self, out_dir: Path, failed: list[str], figures: list[Path]) -> None:
        super().__init__("sweep.output_dir", f"{len(failed)} figure(s) could not be written in {out_dir}: "
                         f"{'; '.join(failed)}", "free space (or fix permissions) and run the same command again: "
                         "the finished cells are kept in sweep.csv, so only the outputs are redrawn")
        self.figures = figures


def write_outputs(rows: list[dict], out_dir: str | Path, protocol: dict | None = None,
                  class_names: list[str] | None = None, verdicts: dict | None = None) -> list[Path]:
    """Draw every figure and write report.md (atomically); returns the PNG paths (for W&B).

    Raises OutputsIncomplete (after writing report.md and every figure it could) when a figure could not be
    written; a figure that fails for another reason is reported as a warning and left out."""
    out_dir, protocol = Path(out_dir), dict(protocol or {})
    if not rows:
        return []
    title = protocol_title(rows, protocol)
    figures: list[Path] = []
    failed: list[str] = []
    drawers: list[tuple[str, Callable[[], list[Path]]]] = [
        ("best_fid_vs_cost", lambda: [cost_figure(rows, out_dir, title)]),
        ("metrics_vs_scale", lambda: [metrics_vs_scale(rows, out_dir, title)]),
        ("metrics_vs_gamma", lambda: [metrics_vs_gamma(rows, out_dir, title)]),
        ("fronts", lambda: front_figures(rows, out_dir, title)),
        ("grids", lambda: progression_figures(rows, out_dir, class_names, title, protocol.get("image_size"))),
        ("paired_delta_fid", lambda: [verdict_figure(verdicts, out_dir, title)] if verdicts else [])]
    for name, draw in drawers:
        try:  # a figure that cannot be drawn must not cost the report (the rows are safe in sweep.csv)
            figures += draw()
        except OSError as err:
            failed.append(f"{name} ({err.strerror or err})")
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"{out_dir}: a sweep figure could not be drawn ({type(err).__name__}: {err})", stacklevel=2)
    text = render(rows, out_dir, protocol, class_names, figures, verdicts)
    _atomic_write(out_dir / "report.md", text.encode())
    if failed:
        raise OutputsIncomplete(out_dir, failed, figures)
    return figures


def _g3(value: float) -> str:
    return "—" if value != value else f"{value:.3g}"  # NaN: not reached on the grid


def pm(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.{digits}g} ± {std:.1g}" if math.isfinite(std) else f"{mean:.{digits}g} ± —"


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    rule = "|" + "|".join("---:" if i else ":---" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def cells(rows: list[dict]) -> list[list[dict]]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["scale"]), []).append(r)
    return [groups[k] for k in sorted(groups)]


def _cost(r: dict) -> str:
    """'25 + 25' (model + classifier passes per sample), '+ n guide' and '≈ m eq.' where the rows carry them."""
    guide = r.get("guide_evals_per_sample") or 0.0
    eq = r.get("unet_equivalents_per_sample")
    return (f"{r['nfe_per_sample']:g} + {r['classifier_grads_per_sample']:g}" + (f" + {guide:g} guide" if guide else "")
            + (f" (≈ {eq:.3g})" if isinstance(eq, float) and math.isfinite(eq) else ""))


def _stat(cell: list[dict], key: str, digits: int = 3) -> str:
    return pm(*mean_std([r[key] for r in cell]), digits)


def _with_interval(cell: list[dict], key: str) -> str:
    """'mean ± std [lo, hi]': the spread over seeds and the 95% interval over samples (mean over seeds)."""
    lo, hi = interval_mean(cell, f"{key}_lo"), interval_mean(cell, f"{key}_hi")
    return _stat(cell, key) + (f" [{lo:.3g}, {hi:.3g}]" if math.isfinite(lo) and math.isfinite(hi) else "")


def render(rows: list[dict], out_dir: Path, protocol: dict, class_names: list[str] | None,
           figures: list[Path], verdicts: dict | None = None) -> str:
    first, seeds = rows[0], sorted({r["seed"] for r in rows})
    rel = {p.stem if p.parent == out_dir else f"grids/{p.stem}": p.relative_to(out_dir).as_posix() for p in figures}
    dataset = protocol.get("dataset", "?")
    out = [f"# Guidance sweep: {dataset}", "", f"_{protocol_title(rows, protocol)}_", "",
           f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from `sweep.csv` ({len(rows)} rows). "
           "Methods: " + ", ".join(f"**{label_of(m)}** (`{m}`)" for m in dict.fromkeys(r["method"] for r in rows))
           + ".", "", "## Best FID per method", ""]
    body, best = [], summary(rows)
    for b in best:
        cell = next(c for c in cells(rows) if c[0]["method"] == b["method"] and math.isclose(c[0]["scale"],
                                                                                              b["best_scale"]))
        body.append([f"{label_of(b['method'])} (`{b['method']}`)", f"{b['best_scale']:g}", f"{b['gamma']:g}",
                     _with_interval(cell, "fid"), _with_interval(cell, "accuracy"), _with_interval(cell, "precision"),
                     _with_interval(cell, "recall"), _cost(b),
                     pm(b["seconds_per_sample"], b["seconds_per_sample_std"]), str(b["seeds"])])
    out += markdown_table(["method", "scale s", "γ", "FID ↓", "accuracy ↑", "precision ↑", "recall ↑",
                           "passes / sample: model + classifier (≈ model evals)", "seconds / sample", "seeds"], body)
    level = best[0].get("matched_accuracy", math.nan) if best else math.nan
    if not math.isnan(level):
        out += ["", f"## At matched strength: target-class accuracy {level:.3g}", "",
                "Methods compared at equal effect, not equal nominal scale: along each method's grid (increasing γ), "
                "the first point where mean accuracy reaches this level, linearly interpolated between grid points "
                "(— = never reached on the grid).", ""]
        out += markdown_table(["method", "scale s", "γ", "FID ↓", "recall ↑"],
                              [[f"{label_of(b['method'])} (`{b['method']}`)"]
                               + [_g3(b[f"matched_{k}"]) for k in ("scale", "gamma", "fid", "recall")]
                               for b in best])
    top = min(best, key=lambda b: (math.isnan(b["fid"]), b["fid"]))
    out += ["", f"**At a glance**: the lowest FID is {label_of(top['method'])} at s = {top['best_scale']:g} "
            f"(FID {pm(top['fid'], top['fid_std'])}, accuracy {pm(top['accuracy'], top['accuracy_std'])}) for "
            f"{passes(top):g} network passes per sample ({passes_text(top)}).", "",
            "Mean ± std over seeds; — = one seed (no spread measured); [lo, hi] = 95% interval over the samples "
            "(random halves, averaged over seeds). FID is compared within this sweep only "
            f"({first['num_samples']} samples per cell).", ""]
    out += bad_version_markdown(best, verdicts)
    out += training_cost_markdown(rows)
    if verdicts:
        out += verdict_markdown(verdicts, rel.get("paired_delta_fid"))
    for stem in ("best_fid_vs_cost", "metrics_vs_scale", "metrics_vs_gamma", "front_fid_vs_accuracy",
                 "front_precision_vs_recall"):
        if stem in rel:
            out += [f"### {HEADINGS[stem]}", "", CAPTIONS[stem], "", f"![{stem}]({rel[stem]})", ""]
    grids = [p for p in figures if p.parent != out_dir]
    if grids:
        out += ["## Samples", "", "One figure per method and seed: rows are guidance scales, columns are classes "
                "(the first sample of each class in the cell), the same noise in every row. Each cell's full grid "
                "is in `grids/` (columns = classes).", ""]
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [p for p in grids if p.stem.rsplit("_seed", 1)[0] == method]
            if mine:
                others = ", ".join(f"[{p.stem}]({rel['grids/' + p.stem]})" for p in mine[1:])
                out += [f"**{label_of(method)}**" + (f" (other seeds: {others})" if others else ""), "",
                        f"![{mine[0].stem}]({rel['grids/' + mine[0].stem]})", ""]
    out += ["## All cells", ""]
    body = [[f"`{c[0]['method']}`", f"{c[0]['scale']:g}", f"{c[0]['gamma']:g}", _stat(c, "fid"), _stat(c, "kid", 2),
             _stat(c, "score"), _stat(c, "precision"), _stat(c, "recall"), _stat(c, "accuracy"),
             _cost(c[0]),
             _stat(c, "seconds_per_sample", 2), str(len(c))] for c in cells(rows)]
    out += markdown_table(["method", "s", "γ", "FID ↓", "KID ↓", "score ↑", "precision ↑", "recall ↑", "accuracy ↑",
                           "passes: model + clf (≈ model evals)", "s / sample", "seeds"], body)
    out += ["", "## Protocol", ""] + protocol_lines(rows, protocol, class_names)
    total_seconds = sum(r["seconds"] for r in rows)
    samples = sum(r["num_samples"] for r in rows)
    total_passes = sum(r["num_samples"] * passes(r) for r in rows)
    plural = "s" if len(seeds) != 1 else ""
    out += ["", "## Cost", "", f"- {len(rows)} cells ({len(cells(rows))} method × scale, {len(seeds)} seed{plural}), "
            f"{samples:,} samples, {total_passes:,.0f} network passes in all.",
            f"- {total_seconds:,.0f} s of sampling and scoring recorded ({total_seconds / 60:.1f} min).", ""]
    extractor = str(first["extractor"]).lower()
    space = ("Features are Inception-v3's pool features (the usual FID scale)." if "inception" in extractor else
             f"Features are a DINOv2 ViT's CLS token (`{first['extractor']}`): FID here is **FD_DINOv2** (Stein et "
             "al. 2023), on EDM2's scale for ViT-L/14 weights at 50k samples; DINOv2 has no classifier head, so "
             "score and accuracy are empty." if extractor.startswith("dinov2") else
             "Features are the framework's evaluator's 128-d embedding "
             f"(`{first['extractor']}`), so values are **not on Inception's scale** and not comparable with "
             "published FIDs.")
    out += ["## What the numbers mean", ""] + [f"- **{name}**: {text.replace('{fid_space}', space)}"
                                               for name, text in METRIC_NOTES]
    out += ["", "Details: `docs/conventions.md` in the guidelab repository.", ""]
    return "\n".join(out)


def protocol_lines(rows: list[dict], protocol: dict, class_names: list[str] | None) -> list[str]:
    r = rows[0]
    seeds = sorted({x["seed"] for x in rows})
    names = ", ".join(class_names) if class_names and len(class_names) <= 20 else None
    lines = [f"- **dataset**: {protocol.get('dataset', '?')}"
             + (f" (`{protocol['dataset_id']}`)" if protocol.get("dataset_id") else "")
             + (f", {protocol['image_size']} px" if protocol.get("image_size") else "")
             + (f", {len(class_names)} classes ({names})" if class_names and names else
                f", {len(class_names)} classes" if class_names else ""),
             f"- **diffusion model**: step {r['diffusion_step']}, weights sha `{r['diffusion_sha']}`"
             + (f" (`{protocol['diffusion']}`)" if protocol.get("diffusion") else "")]
    if r.get("classifier_sha"):
        lines.append(f"- **noisy classifier**: step {r['classifier_step']}, weights sha `{r['classifier_sha']}`"
                     + (f" (`{protocol['classifier']}`)" if protocol.get("classifier") else ""))
    else:
        lines.append("- **noisy classifier**: none")
    if r.get("guide_sha"):
        lines.append(f"- **guide network**: step {r.get('guide_step')}, weights sha `{r['guide_sha']}`")
    if r.get("clean_classifier_sha"):
        lines.append(f"- **clean classifier** (cg_clean): step {r.get('clean_classifier_step')}, weights sha "
                     f"`{r['clean_classifier_sha']}`")
    lines += [f"- **sampler**: {r['sampler']}, {r['steps']} steps, η = {r['eta']:g}"
              + (f", precision {protocol['precision']}" if protocol.get("precision") else "")]
    guidance = protocol.get("guidance")
    if guidance:
        text = ", ".join(f"{k} = {v}" for k, v in guidance.items()) if isinstance(guidance, dict) else str(guidance)
        lines.append(f"- **guidance options**: {text}")
    lines += [f"- **samples per cell**: {r['num_samples']} (labels cycle through the classes; paired noise across "
              "cells)", f"- **seeds**: {', '.join(map(str, seeds))}", f"- **feature extractor**: `{r['extractor']}`",
              f"- **signature**: `{r['signature']}`", "- **files**: [`sweep.csv`](sweep.csv), "
              "[`sweep.json`](sweep.json), per-cell grids in `grids/`"]
    return lines
