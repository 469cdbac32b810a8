"""Guidance away from the same network under a perturbation of its attention or time input: PAG, SEG, TSG."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..guidance import Guided, Predictions, StepMode
from ..options import OptionError, check_finite
from .base import BAD_VERSION, AroundConditional, GuidanceRule, effective


@dataclass(frozen=True)
class AttentionOptions:
    """Options of `pag` and `seg`.

    Args:
        layers: which self-attention layers the perturbed pass changes: module-name prefixes of the UNet
            ("mid" = the middle block's, which every UNet here has; "all"; or e.g. "down.3").
        cfg_scale: CFG combined as in the paper, ε_u + w·(ε_c − ε_u) + s·(ε_c − ε_pert), at this fixed w
            (1 = no CFG part, no unconditional evaluation).
        sigma: SEG only: the width σ of the Gaussian blur of the queries, in feature-map pixels (>= 9999: every
            query replaced by the mean query, the σ → ∞ limit).
    """

    layers: tuple[str, ...] = ("mid",)
    cfg_scale: float = 1.0
    sigma: float = 9999.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))

    def check(self, prefix: str = "") -> None:
        check_finite(prefix, cfg_scale=self.cfg_scale)
        if not self.layers:
            raise OptionError(f"{prefix}layers", "no layer is named", "name at least one, e.g. [mid]")
        if not (isinstance(self.sigma, (int, float)) and self.sigma > 0):
            raise OptionError(f"{prefix}sigma", f"σ = {self.sigma!r} is not positive", "use e.g. 1, 4, 16 or 9999")


class PerturbedAttention(GuidanceRule):
    """PAG (Ahn et al., ECCV 2024): ε̂ = ε_c + s·(ε_c − ε_pert), ε_pert the same network with the chosen
    self-attention maps replaced by the identity (each token's output is its own value); with `cfg_scale` w ≠ 1,
    ε_u + w·(ε_c − ε_u) + s·(ε_c − ε_pert). s = 0 is the conditional model (or CFG at w); γ = 1 + s (+ w − 1).
    The perturbation acts through hooks on a parameter-sharing copy, so the clean pass is the network itself."""

    name, label, color, marker = "pag", "PAG (perturbed attention)", "tab:gray", "d"
    default_scales = (0.0, 0.5, 1.0, 2.0, 3.0)
    scale_axis = "PAG scale s  (0 = conditional model)"
    gamma_text, cost_text = "PAG and SEG γ = 1 + s", "2 (+1 with its CFG part)"
    Options = AttentionOptions
    family = BAD_VERSION

    def gamma(self, scale: float) -> float:
        return 1.0 + scale + (self.settings.cfg_scale - 1.0)

    def plain(self, scale: float) -> str | None:
        return "cond" if scale == 0 and self.settings.cfg_scale == 1 else None

    def mode(self, scales: Sequence[float], w: float) -> StepMode:
        cfg = effective(self.settings.cfg_scale, w) != 1.0
        perturbed = w != 0.0 and any(s != 0 for s in scales)
        return StepMode(("cond", *(("uncond",) if cfg else ()), *(("perturbed",) if perturbed else ())), False)

    def combine(self, p: Predictions, scale: Tensor, w: Tensor) -> Guided:
        guided = p.cond
        if p.uncond is not None:
            guided = guided + (effective(self.settings.cfg_scale, w) - 1) * (p.cond - p.uncond)
        if p.perturbed is not None:
            s = (scale * w).view(-1, 1, 1, 1)
            # A row at s = 0 keeps ε_c (or the CFG part) exactly: 0·(ε_c − ε_pert) adds exact zeros.
            guided = guided + torch.where(s != 0, s * (p.cond - p.perturbed), torch.zeros_like(guided))
        return Guided(guided)

    def perturbation(self, schedule):
        from lightning_modules.networks.perturbations import AttentionIdentity

        return AttentionIdentity(self.settings.layers)

    def signature(self) -> dict:
        out = super().signature()
        out["own"].pop("sigma")  # read by SEG only
        return out


class SmoothedEnergy(PerturbedAttention):
    """SEG (Hong, NeurIPS 2024): PAG's form with the perturbed pass blurring the attention queries with a Gaussian
    of width `sigma` (σ → ∞: every position attends with the mean query). s = 0 is the conditional model."""

    name, label, color, marker = "seg", "SEG (smoothed attention energy)", "k", "8"
    scale_axis = "SEG scale s  (0 = conditional model)"
    family = BAD_VERSION

    def perturbation(self, schedule):
        from lightning_modules.networks.perturbations import AttentionBlur

        return AttentionBlur(self.settings.sigma, self.settings.layers)

    def signature(self) -> dict:
        return GuidanceRule.signature(self)


@dataclass(frozen=True)
class TimeStepOptions:
    """Options of `tsg`.

    Args:
        strength: s in t̃_emb = t_emb + s·τ^α·std(t_emb)·n (the paper's DiT default for conditional models: 2).
        power: α of the power schedule τ^α, τ = t/(T−1) (1 = linear in t; 0 = the same strength at every t).
    """

    strength: float = 2.0
    power: float = 1.0

    def check(self, prefix: str = "") -> None:
        check_finite(prefix, strength=self.strength, power=self.power)
        if self.strength < 0 or self.power < 0:
            raise OptionError(prefix.rstrip("."), f"strength {self.strength} / power {self.power} is negative",
                              "use strength >= 0 and power >= 0")


class TimeStepGuidance(AroundConditional):
    """TSG (Sadat et al., ICLR 2025): ε̂ = ε_t̃ + w·(ε_c − ε_t̃), ε_t̃ the same network at the same label with its
    time embedding perturbed by keyed Gaussian noise (t̃_emb = t_emb + s·τ^α·std(t_emb)·n). w = 1 is the
    conditional model; γ = w."""

    name, label, color, marker = "tsg", "TSG (time-step guidance)", "teal", "1"
    default_scales = (1.0, 1.5, 2.0, 2.5, 3.0)
    scale_axis = "TSG scale w  (1 = conditional model)"
    gamma_text, cost_text = "TSG γ = w", "2 (conditional + perturbed time embedding)"
    Options = TimeStepOptions
    other = "perturbed"

    def perturbation(self, schedule):
        from lightning_modules.networks.perturbations import TimeEmbeddingNoise

        return TimeEmbeddingNoise(self.settings.strength, self.settings.power, schedule.timesteps)

