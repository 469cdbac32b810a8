"""What each diffusion model of a sweep cost to train, beside what a sample of each of its methods costs.

Guidance at sampling time (CFG, CG, autoguidance, ...) pays per sample; guidance trained in (MG, GFT) pays at
training and samples with one evaluation per step. The rows carry both: `unet_equivalents_per_sample` and the
`training_*` columns of the network a cell sampled (its steps, FLOPs and wall seconds, a fine-tune's start
included). These tables put them side by side, so "CFG on a model trained N steps", "MG trained N steps" and a
CFG model trained for the same FLOPs can be read off one table.
"""

from __future__ import annotations

import math

from lightning_modules.diffusion import RULES

from .plots import label_of
from .tables import summary


def flops_text(flops: float) -> str:
    """2.1e15 → '2.1 PFLOP'; '—' when not recorded."""
    if not math.isfinite(flops):
        return "—"
    for unit, size in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= size:
            return f"{flops / size:.3g} {unit}"
    return f"{flops:.3g} FLOP"


def diffusion_models(rows: list[dict]) -> list[dict]:
    """One entry per diffusion network the rows sampled (by weights hash), the sweep's own model first (the one
    most cells sampled): its objective, training steps, FLOPs and seconds, and the methods that sampled it."""
    models: dict[str, dict] = {}
    for r in rows:
        entry = models.setdefault(r["diffusion_sha"], {
            "sha": r["diffusion_sha"], "objective": r.get("training_objective") or "none", "cells": 0, "methods": [],
            **{k: float(r.get(f"training_{k}", math.nan)) for k in ("steps", "flops", "seconds")}})
        entry["cells"] += 1
        if r["method"] not in entry["methods"]:
            entry["methods"].append(r["method"])
    own = [m for m in models.values() if any(RULES[x].trained_with is None for x in m["methods"] if x in RULES)]
    return sorted(models.values(), key=lambda m: (m not in own, -m["cells"]))


def cost_rows(rows: list[dict]) -> list[dict]:
    """Per method: its best FID, what a sample costs (main-network evaluations) and what its diffusion model cost
    to train (FLOPs, and as a multiple of the sweep's own model's)."""
    models = diffusion_models(rows)
    base = models[0]["flops"] if models else math.nan
    by_method = {m: model for model in models for m in model["methods"]}
    out = []
    for b in summary(rows):
        model = by_method[b["method"]]
        out.append({"method": b["method"], "best_scale": b["best_scale"], "fid": b["fid"], "fid_std": b["fid_std"],
                    "sampling_evals": b["unet_equivalents_per_sample"], "trained_with": model["objective"],
                    "training_steps": model["steps"], "training_flops": model["flops"],
                    "training_vs_main": model["flops"] / base if base and math.isfinite(base) else math.nan})
    return out


def training_cost_markdown(rows: list[dict]) -> list[str]:
    """The report's section: one line per diffusion model, then best FID with sampling and training cost per method
    (nothing when the sweep sampled one model whose cost was not recorded)."""
    models = diffusion_models(rows)
    if len(models) < 2 and not any(math.isfinite(m["flops"]) for m in models):
        return []
    out = ["## Training cost beside sampling cost", "",
           "Each diffusion model the sweep sampled, with what it cost to train (torch.utils.flop_counter on one "
           "optimiser step, guiding forwards included, × steps; a fine-tune includes the fit it started from; the "
           "classifiers' training is not counted):", ""]
    for m in models:
        out.append(f"- `{m['sha']}`: trained with **{m['objective']}**, "
                   + (f"{m['steps']:.0f} steps, {flops_text(m['flops'])}, {m['seconds'] / 60:.1f} min of wall time"
                      if math.isfinite(m["flops"]) else "training cost not recorded")
                   + f"; sampled by {', '.join(f'`{x}`' for x in m['methods'])}")
    body = [[f"{label_of(c['method'])} (`{c['method']}`)", f"{c['best_scale']:g}",
             f"{c['fid']:.3g}" + (f" ± {c['fid_std']:.2g}" if math.isfinite(c["fid_std"]) else ""),
             f"{c['sampling_evals']:.3g}", c["trained_with"], flops_text(c["training_flops"]),
             "—" if not math.isfinite(c["training_vs_main"]) else f"{c['training_vs_main']:.2f}×"]
            for c in cost_rows(rows)]
    from .report import markdown_table  # (report imports this module)

    out += ["", *markdown_table(["method", "best s", "FID ↓", "sampling: model evals / sample", "model trained with",
                                 "training FLOPs", "× the sweep's model"], body), ""]
    return out
