"""Classifier guidance with a classifier trained on clean images, applied to the predicted x̂0."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..guidance import GradFn, LogProbFn, Predictions, input_grad
from ..options import OptionError
from .linear import ClassifierOnConditional


@dataclass(frozen=True)
class CleanClassifierOptions:
    """Options of `cg_clean`.

    Args:
        temperature: τ of the clean classifier's softmax (calibration; 1 = as trained).
        exact: take the gradient through the UNet (the exact Jacobian of x̂0(x_t), one more network forward and
            backward per step) instead of the cheap ∇_{x̂0} / √ᾱ_t.
    """

    temperature: float = 1.0
    exact: bool = False

    def check(self, prefix: str = "") -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise OptionError(f"{prefix}temperature", f"τ = {self.temperature} is not positive",
                              "use a positive temperature (1 = the classifier as trained)")


class CleanClassifierGuidance(ClassifierOnConditional):
    """CG with a classifier trained on clean images, applied to the predicted x̂0 (Ma et al. 2023; Bansal et al.
    2023's forward guidance): ε_c guided by s·∇_{x_t} log p(y | x̂0(x_t)); γ = 1 + s. The gradient's Jacobian is
    cheap (∇_{x̂0}/√ᾱ_t) unless `exact`; `temperature` calibrates the softmax."""

    name, label, color, marker = "cg_clean", "CG with a clean classifier on x̂0", "tab:olive", "*"
    default_scales = (0.0, 0.5, 1.0, 2.0, 4.0)
    scale_axis = "clean-CG scale s  (0 = conditional model)"
    gamma_text = "CG with a clean classifier γ = 1 + s"
    cost_text = "1 + clean-classifier forward and backward (exact: + UNet forward and backward)"
    Options = CleanClassifierOptions
    deprecated = {"cg_clean_temperature": "temperature", "cg_clean_exact": "exact"}
    gradient_at = "x0"

    def gradient(self, p: Predictions, noisy: GradFn | None, clean: LogProbFn | None) -> Tensor:
        """∇_{x_t} log p(y | x̂0(x_t)): the cheap Jacobian ∇_{x̂0} / √ᾱ_t, or the exact one through the network."""
        assert clean is not None and p.cond is not None and p.y is not None
        y, tau = p.y, self.settings.temperature

        def log_prob(x0: Tensor) -> Tensor:
            return clean(x0, y, tau)

        if self.settings.exact:
            assert p.cond_fn is not None
            cond_fn = p.cond_fn
            return input_grad(lambda z: log_prob((z - p.sigma_t * cond_fn(z)) / p.a_t), p.x)
        return input_grad(log_prob, p.x0(p.cond)) / p.a_t

    def gradient_cost(self) -> tuple[str, float]:
        return "clean", 3.0 if self.settings.exact else 0.0
