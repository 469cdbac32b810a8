"""APG, adaptive projected guidance (Sadat et al. 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..guidance import Guided, Predictions
from ..options import OptionError, check_finite
from .base import AroundConditional, effective


@dataclass(frozen=True)
class ProjectedOptions:
    """Options of `apg`.

    Args:
        eta: weight of the guidance part parallel to x̂0_c (paper: 0; 1 with no momentum or threshold is CFG).
        momentum: β in Δ ← Δ + β·Δ_prev (the paper recommends β < 0).
        threshold: norm threshold r on Δ (per sample, over all pixels); null = none.
    """

    eta: float = 0.0
    momentum: float = -0.5
    threshold: float | None = None

    def check(self, prefix: str = "") -> None:
        check_finite(prefix, eta=self.eta, momentum=self.momentum)
        if self.threshold is not None and not (math.isfinite(self.threshold) and self.threshold > 0):
            raise OptionError(f"{prefix}threshold", f"r = {self.threshold} is not a positive number",
                              "use null (no threshold) or a positive norm")


class AdaptiveProjected(AroundConditional):
    """APG (Sadat et al. 2024), in x̂0 space: Δ = D_c − D_u, momentum Δ ← Δ + β·Δ_prev, norm threshold
    Δ ← Δ·min(1, r/‖Δ‖), split into Δ∥ (along D_c) and Δ⊥, then D = D_c + (w − 1)(Δ⊥ + η·Δ∥).
    With η = 1, β = 0 and no threshold it is CFG at w; the paper's η = 0 drops the saturating parallel part.
    It acts on x̂0, so its result does not depend on whether the network predicts ε or v. γ = w (the CFG axis)."""

    name, label, color, marker = "apg", "APG", "tab:purple", "v"
    default_scales = (1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
    scale_axis = "APG scale s  (1 = conditional model)"
    cost_text = "2 (one batched forward of 2B)"
    Options = ProjectedOptions
    deprecated = {"apg_eta": "eta", "apg_momentum": "momentum", "apg_threshold": "threshold"}
    other = "uncond"

    def initial_memory(self, x: Tensor) -> dict[str, Tensor]:
        return {"momentum": torch.zeros_like(x)}

    def combine(self, p: Predictions, scale: Tensor, w: Tensor) -> Guided:
        if p.uncond is None:
            return Guided(p.cond)
        o = self.settings
        d_c, d_u = p.x0(p.cond), p.x0(p.uncond)
        delta = d_c - d_u + o.momentum * p.memory["momentum"]  # running average m_t = Δ_t + β·m_{t−1}
        memory = {"momentum": delta}
        dims = tuple(range(1, delta.ndim))
        if o.threshold is not None:
            norm = torch.linalg.vector_norm(delta, dim=dims, keepdim=True)
            delta = delta * torch.clamp(o.threshold / norm.clamp_min(1e-12), max=1.0)
        unit = d_c / torch.linalg.vector_norm(d_c, dim=dims, keepdim=True).clamp_min(1e-12)
        parallel = (delta * unit).sum(dim=dims, keepdim=True) * unit
        excess = (effective(scale, w) - 1).view(-1, 1, 1, 1)
        guided = d_c + excess * (delta - parallel + o.eta * parallel)
        # A row at w = 1 is ε_c itself (not its round trip through x̂0), as in a batch that evaluates only ε_c.
        return Guided(torch.where(excess == 0, p.cond, p.eps(guided)), memory=memory)
