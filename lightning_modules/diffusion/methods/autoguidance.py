"""Autoguidance: guide away from a bad version of the model, a trained weaker one or the same one degraded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..options import OptionError
from .base import BAD_VERSION, AroundConditional


class Autoguidance(AroundConditional):
    """Autoguidance (Karras et al. 2024): ε̂ = ε_g + w·(ε_c − ε_g), with ε_g the same label's prediction of a
    weaker conditional model (an earlier snapshot or a smaller model of the same data: `sweep.guide_ckpt`).
    w = 1 is the main model; γ = w (the CFG-like axis; the guide is not p(y|x))."""

    name, label, color, marker = "autoguidance", "autoguidance (trained guide)", "tab:pink", "h"
    default_scales = (1.0, 1.5, 2.0, 2.5, 3.0)
    scale_axis = "autoguidance scale w  (1 = main model alone)"
    gamma_text, cost_text = "autoguidance γ = w", "1 + guide network"
    other = "guide"
    uses_guide = True
    family = BAD_VERSION


@dataclass(frozen=True)
class DegradedGuideOptions:
    """Options of `autoguidance_degraded`.

    Args:
        degradation: how the same network is made worse for the guide pass: dropout (keyed dropout of rate
            `rate` on every residual block's hidden activations, in-situ autoguidance) or skip (a keyed random
            `rate` of the residual blocks keep only their skip connection, S²-guidance style).
        rate: the dropout rate, or the share of residual blocks skipped, in (0, 1).
    """

    degradation: Literal["dropout", "skip"] = "dropout"
    rate: float = 0.1

    def check(self, prefix: str = "") -> None:
        if self.degradation not in ("dropout", "skip"):
            raise OptionError(f"{prefix}degradation", f"unknown degradation {self.degradation!r}",
                              "use dropout or skip")
        if not (isinstance(self.rate, (int, float)) and 0.0 < self.rate < 1.0):
            raise OptionError(f"{prefix}rate", f"{self.rate!r} is outside (0, 1)", "use e.g. 0.1")


class DegradedAutoguidance(AroundConditional):
    """Autoguidance with the same network degraded after training as the guide (in-situ autoguidance, arXiv
    2510.17136; S²-guidance, arXiv 2508.12880): ε̂ = ε_bad + w·(ε_c − ε_bad), ε_bad the main network with keyed
    dropout or skipped residual blocks on the guide pass only. The masks are keyed on (sample, step), so a cell
    is paired with every other. Karras et al. 2024 report that such post-hoc degradation only recovers the base
    FID; this method lets a paired sweep check that claim beside the trained guide. w = 1 is the main model."""

    name, label, color, marker = "autoguidance_degraded", "autoguidance (degraded same network)", "gold", "H"
    default_scales = (1.0, 1.5, 2.0, 2.5, 3.0)
    scale_axis = "autoguidance scale w  (1 = main model alone)"
    gamma_text, cost_text = "degraded-guide autoguidance γ = w", "2 (main + its degraded pass)"
    Options = DegradedGuideOptions
    other = "perturbed"
    family = BAD_VERSION

    def perturbation(self, schedule):
        from lightning_modules.networks.perturbations import BlockSkip, KeyedDropout

        s = self.settings
        return KeyedDropout(s.rate) if s.degradation == "dropout" else BlockSkip(s.rate)
