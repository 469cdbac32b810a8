"""Guidance trained into the network (diffusion/guidance_training.py): sampled with one evaluation per step.

* `mg`: a model-guidance-trained network sampled conditionally. Its guidance was fixed at training, so the swept
  scale is the w it was trained with (`mg_scale`, one value), not a knob: every scale samples the same conditional
  model, and the scale only places the cell on the common axis, γ = 1/(1 − w) (the fixed point of its target).
* `gft`: a guidance-free-trained network at β = 1/s, which is CFG at scale s (s = 1 is the conditional model at
  β = 1, the same evaluation as plain conditional sampling). The β reaches the network through `network`, the
  rule's hook the denoiser wraps its network with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..guidance_training import beta_for_scale, mg_gamma
from .linear import NoGuidance


class ModelGuided(NoGuidance):
    """A model-guidance-trained network sampled conditionally; its scale is its trained w (γ = 1/(1 − w))."""

    name, label, color, marker = "mg", "MG (model guidance, trained)", "tab:olive", "h"
    default_scales = (0.45,)
    scale_axis = "MG w the model was trained with (mg_scale; sampled conditionally)"
    gamma_text, cost_text = "MG γ = 1/(1 − w), w its training mg_scale", "1"
    scale_range = (-math.inf, math.nextafter(1.0, 0.0))
    trained_with = "mg"

    def gamma(self, scale: float) -> float:
        return mg_gamma(scale)


class BetaNetwork(nn.Module):
    """`net` fed a per-sample β with every call: the denoiser's (x, t, y) → net(x, t, y, beta). A batched forward of
    several branches (k·B rows) repeats the B samples' β in the same order."""

    def __init__(self, net: nn.Module, beta: Tensor) -> None:
        super().__init__()
        self.net, self.beta = net, beta

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        beta = self.beta.to(x.device).repeat(len(x) // len(self.beta))
        return self.net(x, t, y, beta=beta)


class GuidanceFree(NoGuidance):
    """A guidance-free-trained network at β = 1/s: CFG at scale s in one evaluation (s = 1: conditional)."""

    name, label, color, marker = "gft", "GFT (guidance-free training)", "tab:brown", "H"
    default_scales = (1.0, 1.25, 1.5, 2.0, 3.0)
    scale_axis = "GFT scale s = 1/β  (1 = conditional model)"
    gamma_text, cost_text = "GFT γ = s = 1/β", "1"
    scale_range = (1.0, math.inf)  # β in (0, 1]: the trained range (β > 1 was never drawn)
    trained_with = "gft"

    def gamma(self, scale: float) -> float:
        return scale

    def plain(self, scale: float) -> str | None:
        return "cond" if scale == 1 else None

    def network(self, net: nn.Module, scales: float | Sequence[float] | Tensor, n: int) -> BetaNetwork:
        """`net` taking β = 1/s of each of the n samples (scales: one per sample, or one for all); refused, before
        any sampling, for a network without a β input (not trained with guidance_training gft)."""
        if getattr(net, "beta_embed", None) is None:
            raise ValueError("method 'gft' needs a network trained with --model.init_args.guidance_training gft (its "
                             "β input); this one has none, so every scale would be the conditional model")
        scale = torch.as_tensor(scales, dtype=torch.float32).flatten()
        if (scale < 1).any():
            raise ValueError(f"method 'gft' takes scales s >= 1 (β = 1/s in (0, 1], the trained range), got "
                             f"{sorted(set(scale.tolist()))}")
        return BetaNetwork(net, beta_for_scale(scale.expand(n) if scale.numel() == 1 else scale))
