"""Rules affine in the predictions: none, CFG, CG on either branch, CFG + CG, and ICG.

They are points of one general form and only map their native scale to (s_cfg, s_cg) in `split`, written so it
works on floats and on per-sample tensors alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..guidance import Guided, Predictions, StepMode
from ..options import check_finite
from .base import GuidanceRule, like


class LinearGuidance(GuidanceRule):
    """Points of the general form ε̂ = ε_o + s_cfg·(ε_c − ε_o), score = s_cg·∇log p(y|x_t), with ε_o the `other`
    branch (the null label; ICG: an independent random class).

    The guidance weight w modulates only what lies beyond the base branch (the conditional one, or the other one
    where s_cfg = 0), so outside an interval a sample is plain conditional (or plain other-branch) sampling.
    """

    other: ClassVar[str] = "uncond"
    reads_shared = ("interval", "sigma_interval", "scale_schedule", "cfg_rescale")

    def split(self, scale):  # float -> (float, float); Tensor -> (Tensor, Tensor)
        raise NotImplementedError

    def gamma(self, scale: float) -> float:
        s_cfg, s_cg = self.split(scale)
        return s_cfg + s_cg

    def needs_gradient(self, scale: float) -> bool:
        return self.split(scale)[1] != 0

    def plain(self, scale: float) -> str | None:
        s_cfg, s_cg = self.split(scale)
        if s_cg != 0:
            return None
        return "cond" if s_cfg == 1 else self.other if s_cfg == 0 else None

    def mode(self, scales: Sequence[float], w: float) -> StepMode:
        pairs = [self.split(s) for s in scales]
        values = {(1.0 + (c - 1.0) * w) if c != 0 else 0.0 for c, _ in pairs}
        branches = ("cond",) if values == {1.0} else (self.other,) if values == {0.0} else ("cond", self.other)
        return StepMode(branches, w != 0.0 and any(g != 0 for _, g in pairs))

    def combine(self, p: Predictions, scale: Tensor, w: Tensor) -> Guided:
        s_cfg, s_cg = self.split(scale)
        score = None if p.grad is None else _scaled(p.grad, s_cg * w)
        other = getattr(p, self.other)
        if other is None or p.cond is None:
            return Guided(p.cond if other is None else other, score)
        base = (s_cfg != 0).float()  # 1 = the conditional branch is the base, 0 = the other one
        s, base = (base + (s_cfg - base) * w).view(-1, 1, 1, 1), base.view(-1, 1, 1, 1)
        # Written around each row's own base branch, so a plain row (s = base) is that branch exactly, as in a
        # batch that evaluates only it: ε_base + (s − base)·(ε_c − ε_o).
        guided = torch.where(base > 0, p.cond, other) + (s - base) * (p.cond - other)
        if self.options.cfg_rescale > 0:
            # Lin et al. 2023: match the guided prediction's per-sample std to the conditional one's. Only rows
            # around the conditional branch: a row around ε_o (s_cfg = 0) is not CFG-guided, and a batch of
            # such rows evaluates only ε_o, so rescaling it would tie the row to its neighbours.
            dims = tuple(range(1, guided.ndim))
            ratio = p.cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-8)
            # g + φ·(r − 1)·g: a row with ratio 1 (s = 1: guided is ε_c) stays exactly ε_c.
            guided = guided + base * self.options.cfg_rescale * (ratio - 1) * guided
        return Guided(guided, score)


def _scaled(grad: Tensor, weight: Tensor) -> Tensor:
    """weight·grad per row, exactly 0 where the weight is 0: a row that takes no gradient by itself must not get
    a NaN or inf from a gradient taken for its neighbours."""
    weight = weight.view(-1, *([1] * (grad.ndim - 1)))
    return torch.where(weight != 0, weight * grad, torch.zeros_like(grad))


class NoGuidance(LinearGuidance):
    """The plain conditional model (the scale is ignored)."""

    name, label, color, marker = "none", "no guidance", "tab:gray", "x"
    default_scales = (1.0,)
    gamma_text, cost_text = "γ = 1", "1"
    reads_shared = ()  # no band or ramp changes the plain model

    def split(self, scale):
        return like(scale, 1.0), like(scale, 0.0)


class ClassifierFree(LinearGuidance):
    """CFG (Ho & Salimans 2022): ε̂ = ε_u + s·(ε_c − ε_u); γ = s."""

    name, label, color, marker = "cfg", "CFG", "tab:blue", "o"
    default_scales = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0)
    scale_axis = "CFG scale s  (0 = unconditional, 1 = conditional model)"
    gamma_text, cost_text = "CFG γ = s", "2 (one batched forward of 2B)"

    def split(self, scale):
        return scale, like(scale, 0.0)


class ClassifierOnConditional(LinearGuidance):
    """CG on the conditional branch (Dhariwal & Nichol 2021): ε_c guided by s·∇log p(y|x_t); γ = 1 + s."""

    name, label, color, marker = "cg_cond", "CG on the conditional branch", "tab:orange", "s"
    default_scales = (0.0, 0.5, 1.0, 2.0, 4.0)
    scale_axis = "CG scale s  (0 = conditional model)"
    gamma_text, cost_text = "CG on the conditional branch γ = 1 + s", "1 + classifier forward and backward"
    uses_gradient = True

    def split(self, scale):
        return like(scale, 1.0), scale


class ClassifierOnUnconditional(LinearGuidance):
    """CG on the null-label branch of the same network; γ = s."""

    name, label, color, marker = "cg_uncond", "CG on the unconditional branch", "tab:green", "^"
    default_scales = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
    scale_axis = "CG scale s  (0 = unconditional model)"
    gamma_text, cost_text = "CG on the unconditional branch γ = s", "1 + classifier forward and backward"
    uses_gradient = True

    def split(self, scale):
        return like(scale, 0.0), scale


@dataclass(frozen=True)
class CombinedOptions:
    """Options of `cfg+cg`.

    Args:
        cg_scale: the fixed classifier-guidance scale added to CFG at the swept scale.
    """

    cg_scale: float = 1.0

    def check(self, prefix: str = "") -> None:
        check_finite(prefix, cg_scale=self.cg_scale)


class ClassifierFreePlusClassifier(LinearGuidance):
    """CFG at the swept scale plus CG at the fixed `cfg_cg.cg_scale`; γ = s + that scale."""

    name, label, color, marker = "cfg+cg", "CFG + fixed CG", "tab:red", "D"
    default_scales = (1.0, 2.0, 3.0)
    scale_axis = "CFG scale s  (CG scale fixed)"
    gamma_text, cost_text = "CFG + fixed CG γ = s + its CG scale", "2 + classifier forward and backward"
    Options = CombinedOptions
    deprecated = {"combo_cg_scale": "cg_scale"}
    uses_gradient = True

    def split(self, scale):
        return scale, like(scale, self.settings.cg_scale)


class IndependentCondition(ClassifierFree):
    """ICG (Sadat et al., ICLR 2025): CFG whose "unconditional" branch is the same network at a random class ŷ
    drawn independently of the sample, D(ŷ) + w·(D(y) − D(ŷ)); ŷ is keyed on (sample, step), so it is the same
    in every cell (paired). It needs no null label, so it runs on a model trained without label dropout.
    w = 1 is the conditional model, w = 0 the random-class model; γ = w."""

    name, label, color, marker = "icg", "ICG (independent condition)", "tab:cyan", "<"
    default_scales = (1.0, 1.25, 1.5, 2.0, 3.0)
    scale_axis = "ICG scale w  (1 = conditional model)"
    gamma_text, cost_text = "ICG γ = w", "2 (one batched forward of 2B)"
    other = "random"

    def plain(self, scale: float) -> str | None:
        return "cond" if scale == 1 else None  # w = 0 is the random-class model: shared with no other method
