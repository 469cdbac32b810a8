"""report.md's section on "a bad version of itself": the guides that are the model made worse, side by side.

Karras et al. (2024) report that degrading a model after training (dropout) only recovers the base FID as an
autoguidance guide, while a less-trained snapshot helps; PAG, SEG and in-situ (dropout / block-skip) guides
report gains from exactly such post-hoc degradations. On paired noise the sweep can say which holds for this
model: the rules whose `family` is BAD_VERSION are compared with the trained-snapshot autoguidance at their
held-out best scale and at matched strength (the verdicts' paired differences).
"""

from __future__ import annotations

import math

from lightning_modules.diffusion import RULES
from lightning_modules.diffusion.methods import BAD_VERSION

FLIP = {"better": "worse", "worse": "better"}


def _against_trained(verdicts: dict | None, method: str, at: str) -> str:
    """ΔFID of `method` against the trained-guide autoguidance at `at`, with its verdict (either orientation)."""
    for c in (verdicts or {}).get("comparisons", []):
        if c["metric"] != "fid" or c["at"] != at or {c["method"], c["vs"]} != {method, "autoguidance"}:
            continue
        if c["verdict"] == "—":
            return "—"
        sign = 1 if c["method"] == method else -1
        lo, hi = sorted((sign * c["lo"], sign * c["hi"]))
        word = c["verdict"] if sign == 1 else FLIP.get(c["verdict"], c["verdict"])
        return f"{sign * c['delta']:+.3g} [{lo:+.3g}, {hi:+.3g}] {word}"
    return "—"


def bad_version_markdown(best: list[dict], verdicts: dict | None) -> list[str]:
    """The section (empty unless the trained-guide autoguidance and another family member were swept)."""
    family = [b for b in best if b["method"] in RULES and RULES[b["method"]].family == BAD_VERSION]
    if len(family) < 2 or "autoguidance" not in {b["method"] for b in family}:
        return []
    level = family[0].get("matched_accuracy", math.nan)
    header = ["method", "best scale", "FID at best ↓", f"scale at accuracy {level:.3g}", "FID there ↓",
              "ΔFID vs trained guide, best scale (held out)", "ΔFID vs trained guide, matched strength"]
    out = ["## A bad version of itself: trained guide, degraded network, perturbed attention", "",
           "The same conditional model guided away from a worse version of itself: an earlier snapshot of its "
           "training (autoguidance, Karras et al. 2024), the same network with keyed dropout on its residual blocks "
           "(in-situ autoguidance), with its middle self-attention map replaced by the identity (PAG) or with its "
           "attention queries smoothed (SEG). Karras et al. report that post-hoc degradation only recovers the base "
           "FID; the perturbation papers report gains. ΔFID is each against the trained guide on paired cells (joint "
           "intervals of the verdicts; better / worse = decided, tie = not separated at these sample counts).", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for b in family:
        cells = [f"{RULES[b['method']].label} (`{b['method']}`)", f"{b['best_scale']:g}",
                 _pm(b["fid"], b.get("fid_std", math.nan)), _g(b.get("matched_scale")),
                 _g(b.get("matched_fid")), "(reference)" if b["method"] == "autoguidance" else
                 _against_trained(verdicts, b["method"], "best scale"),
                 "(reference)" if b["method"] == "autoguidance" else
                 _against_trained(verdicts, b["method"], "matched strength")]
        out.append("| " + " | ".join(cells) + " |")
    return [*out, ""]


def _pm(mean: float, std: float) -> str:
    return "—" if not math.isfinite(mean) else f"{mean:.3g} ± {std:.1g}" if math.isfinite(std) else f"{mean:.3g}"


def _g(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"
