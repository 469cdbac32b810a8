"""CFG++ (Chung et al. 2024): CFG's x̂0, renoised with the unconditional ε."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..guidance import Guided, Predictions, StepMode
from .base import GuidanceRule, effective


class ClassifierFreePlusPlus(GuidanceRule):
    """CFG++ (Chung et al. 2024): x̂0 from ε_λ = ε_u + λ(ε_c − ε_u), λ ∈ [0, 1], renoised with ε_u instead of
    ε_λ (as given, not recomputed from a clipped x̂0). DDIM: x_s = √ᾱ_s·x̂0 + σ_s·ε_u; the ancestral and
    DPM-Solver++ updates start from the point √ᾱ_t·x̂0 + σ_t·ε_u (see `samplers._renoise_point`). At λ = 0 it
    is the unconditional model (exactly so without clipping); at λ = 1 it is NOT the conditional model (the
    renoising still uses ε_u). Where the guidance weight is 0 (outside an interval) a step is plain conditional
    sampling. γ = λ (the combination's exponent; compare CFG++ with CFG at matched strength)."""

    name, label, color, marker = "cfgpp", "CFG++", "tab:brown", "P"
    default_scales = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    scale_axis = "CFG++ λ  (0 = unconditional model)"
    gamma_text, cost_text = "CFG++ γ = λ", "2 (one batched forward of 2B)"
    scale_range = (0.0, 1.0)

    def gamma(self, scale: float) -> float:
        return scale

    def mode(self, scales: Sequence[float], w: float) -> StepMode:
        if w == 0.0:
            return StepMode(("cond",), False)
        values = {effective(s, w) for s in scales}
        return StepMode(("uncond",) if values == {0.0} else ("cond", "uncond"), False)

    def combine(self, p: Predictions, scale: Tensor, w: Tensor) -> Guided:
        if p.uncond is None:  # plain conditional (guidance weight 0)
            return Guided(p.cond)
        if p.cond is None:  # λ = 0 everywhere: x̂0 and renoising both from ε_u
            return Guided(p.uncond, eps_renoise=p.uncond)
        lam = effective(scale, w).view(-1, 1, 1, 1)
        return Guided(p.uncond + lam * (p.cond - p.uncond), eps_renoise=p.uncond)
