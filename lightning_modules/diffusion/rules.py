"""The guidance methods, one small class each, on the hook of `guidance.py`.

Linear rules (cfg, cg_cond, cg_uncond, cfg+cg, none) are points of one general form and only map their
native scale to (s_cfg, s_cg). Rules that are not affine in the prediction state the space they act in:
APG acts on x̂0 (so its result does not depend on whether the network predicts ε or v; the denoiser
converts both to ε first). CFG++ changes what the sampler renoises with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from .guidance import GuidanceRule, Guided, Predictions, StepMode, guidance_weight
from .options import GuidanceOptions, OptionError
from .schedule import NoiseSchedule, respaced_timesteps


class LinearGuidance(GuidanceRule):
    """Points of the general form ε̂ = ε_u + s_cfg·(ε_c − ε_u), score = s_cg·∇log p(y|x_t).

    A subclass only maps its native scale to (s_cfg, s_cg) in `split`, written so it works on floats and on
    per-sample tensors alike. The guidance weight w modulates only what lies beyond the base branch (the
    conditional one, or the unconditional one where s_cfg = 0), so outside an interval a sample is plain
    conditional (or plain unconditional) sampling.
    """

    def split(self, scale):  # float -> (float, float); Tensor -> (Tensor, Tensor)
        raise NotImplementedError

    def gamma(self, scale: float) -> float:
        s_cfg, s_cg = self.split(scale)
        return s_cfg + s_cg

    def needs_gradient(self, scale: float) -> bool:
        return self.split(scale)[1] != 0

    def plain(self, scale: float) -> str | None:
        s_cfg, s_cg = self.split(scale)
        return None if s_cg != 0 else "cond" if s_cfg == 1 else "uncond" if s_cfg == 0 else None

    def mode(self, scales: Sequence[float], w: float) -> StepMode:
        pairs = [self.split(s) for s in scales]
        effective = {(1.0 + (c - 1.0) * w) if c != 0 else 0.0 for c, _ in pairs}
        branches = ("cond",) if effective == {1.0} else ("uncond",) if effective == {0.0} else ("cond", "uncond")
        return StepMode(branches, w != 0.0 and any(g != 0 for _, g in pairs))

    def combine(self, p: Predictions, scale: Tensor, w: Tensor) -> Guided:
        s_cfg, s_cg = self.split(scale)
        score = None if p.grad is None else _scaled(p.grad, s_cg * w)
        if p.uncond is None or p.cond is None:
            return Guided(p.cond if p.uncond is None else p.uncond, score)
        base = (s_cfg != 0).float()  # 1 = the conditional branch is the base, 0 = the unconditional one
        s, base = (base + (s_cfg - base) * w).view(-1, 1, 1, 1), base.view(-1, 1, 1, 1)
        # Written around each row's own base branch, so a plain row (s = base) is that branch exactly, as in a
        # batch that evaluates only it: ε_base + (s − base)·(ε_c − ε_u).
        guided = torch.where(base > 0, p.cond, p.uncond) + (s - base) * (p.cond - p.uncond)
        if self.options.cfg_rescale > 0:
            # Lin et al. 2023: match the guided prediction's per-sample std to the conditional one's. Only rows
            # around the conditional branch: a row around ε_u (s_cfg = 0) is not CFG-guided, and a batch of
            # such rows evaluates only ε_u, so rescaling it would tie the row to its neighbours.
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


def _like(scale, value: float):
    return scale * 0 + value  # a constant shaped like `scale` (float or tensor)


class NoGuidance(LinearGuidance):
    """The plain conditional model (the scale is ignored)."""

    name = "none"

    def split(self, scale):
        return _like(scale, 1.0), _like(scale, 0.0)


class ClassifierFree(LinearGuidance):
    """CFG (Ho & Salimans 2022): ε̂ = ε_u + s·(ε_c − ε_u); γ = s."""

    name = "cfg"

    def split(self, scale):
        return scale, _like(scale, 0.0)


class ClassifierOnConditional(LinearGuidance):
    """CG on the conditional branch (Dhariwal & Nichol 2021): ε_c guided by s·∇log p(y|x_t); γ = 1 + s."""

    name = "cg_cond"
    uses_gradient = True

    def split(self, scale):
        return _like(scale, 1.0), scale


class CleanClassifierGuidance(ClassifierOnConditional):
    """CG with a classifier trained on clean images, applied to the predicted x̂0 (Ma et al. 2023; Bansal et al.
    2023's forward guidance): ε_c guided by s·∇_{x_t} log p(y | x̂0(x_t)); γ = 1 + s. The gradient's Jacobian is
    cheap (∇_{x̂0}/√ᾱ_t) unless `cg_clean_exact`; `cg_clean_temperature` calibrates the softmax."""

    name = "cg_clean"
    gradient_at = "x0"


class ClassifierOnUnconditional(LinearGuidance):
    """CG on the null-label branch of the same network; γ = s."""

    name = "cg_uncond"
    uses_gradient = True

    def split(self, scale):
        return _like(scale, 0.0), scale


class ClassifierFreePlusClassifier(LinearGuidance):
    """CFG at the swept scale plus CG at the fixed `combo_cg_scale`; γ = s + combo."""

    name = "cfg+cg"
    uses_gradient = True

    def split(self, scale):
        return scale, _like(scale, self.options.combo_cg_scale)


def _effective(scale, w):
    """A scale around the conditional model (1 = conditional) with guidance weight w applied to its excess."""
    return 1 + (scale - 1) * w


class AroundConditional(GuidanceRule):
    """A method with a scale w around the conditional model (w = 1 is the conditional model, γ = w) that needs
    the conditional prediction and one `other` branch whenever some sample is guided."""

    other: ClassVar[str]

    def gamma(self, scale: float) -> float:
        return scale

    def plain(self, scale: float) -> str | None:
        return "cond" if scale == 1 else None

    def mode(self, scales: Sequence[float], w: float) -> StepMode:
        effective = {_effective(s, w) for s in scales}
        return StepMode(("cond",) if effective == {1.0} else ("cond", self.other), False)


class AdaptiveProjected(AroundConditional):
    """APG (Sadat et al. 2024), in x̂0 space: Δ = D_c − D_u, momentum Δ ← Δ + β·Δ_prev, norm threshold
    Δ ← Δ·min(1, r/‖Δ‖), split into Δ∥ (along D_c) and Δ⊥, then D = D_c + (w − 1)(Δ⊥ + η·Δ∥).
    With η = 1, β = 0 and no threshold it is CFG at w; the paper's η = 0 drops the saturating parallel part.
    γ = w (the CFG axis)."""

    name = "apg"
    other = "uncond"

    def combine(self, p: Predictions, scale: Tensor, w: Tensor) -> Guided:
        if p.uncond is None:
            return Guided(p.cond)
        o = self.options
        d_c, d_u = p.x0(p.cond), p.x0(p.uncond)
        delta = d_c - d_u + o.apg_momentum * p.memory  # running average m_t = Δ_t + β·m_{t−1}
        memory = delta
        dims = tuple(range(1, delta.ndim))
        if o.apg_threshold is not None:
            norm = torch.linalg.vector_norm(delta, dim=dims, keepdim=True)
            delta = delta * torch.clamp(o.apg_threshold / norm.clamp_min(1e-12), max=1.0)
        unit = d_c / torch.linalg.vector_norm(d_c, dim=dims, keepdim=True).clamp_min(1e-12)
        parallel = (delta * unit).sum(dim=dims, keepdim=True) * unit
        excess = (_effective(scale, w) - 1).view(-1, 1, 1, 1)
        guided = d_c + excess * (delta - parallel + o.apg_eta * parallel)
        # A row at w = 1 is ε_c itself (not its round trip through x̂0), as in a batch that evaluates only ε_c.
        return Guided(torch.where(excess == 0, p.cond, p.eps(guided)), memory=memory)


class ClassifierFreePlusPlus(GuidanceRule):
    """CFG++ (Chung et al. 2024): x̂0 from ε_λ = ε_u + λ(ε_c − ε_u), λ ∈ [0, 1], renoised with ε_u instead of
    ε_λ (as given, not recomputed from a clipped x̂0). DDIM: x_s = √ᾱ_s·x̂0 + σ_s·ε_u; the ancestral and
    DPM-Solver++ updates start from the point √ᾱ_t·x̂0 + σ_t·ε_u (see `samplers._renoise_point`). At λ = 0 it
    is the unconditional model (exactly so without clipping); at λ = 1 it is NOT the conditional model (the
    renoising still uses ε_u). Where the guidance weight is 0 (outside an interval) a step is plain conditional
    sampling. γ = λ (the combination's exponent; compare CFG++ with CFG at matched strength)."""

    name = "cfgpp"
    scale_range = (0.0, 1.0)

    def gamma(self, scale: float) -> float:
        return scale

    def mode(self, scales: Sequence[float], w: float) -> StepMode:
        if w == 0.0:
            return StepMode(("cond",), False)
        effective = {_effective(s, w) for s in scales}
        return StepMode(("uncond",) if effective == {0.0} else ("cond", "uncond"), False)

    def combine(self, p: Predictions, scale: Tensor, w: Tensor) -> Guided:
        if p.uncond is None:  # plain conditional (guidance weight 0)
            return Guided(p.cond)
        if p.cond is None:  # λ = 0 everywhere: x̂0 and renoising both from ε_u
            return Guided(p.uncond, eps_renoise=p.uncond)
        lam = _effective(scale, w).view(-1, 1, 1, 1)
        return Guided(p.uncond + lam * (p.cond - p.uncond), eps_renoise=p.uncond)


class Autoguidance(AroundConditional):
    """Autoguidance (Karras et al. 2024): ε̂ = ε_g + w·(ε_c − ε_g), with ε_g the same label's prediction of a
    weaker conditional model (an earlier snapshot or a smaller model of the same data). w = 1 is the main
    model; γ = w (the CFG-like axis; the guide is not p(y|x))."""

    name = "autoguidance"
    other = "guide"
    uses_guide = True

    def combine(self, p: Predictions, scale: Tensor, w: Tensor) -> Guided:
        if p.guide is None:
            return Guided(p.cond)
        s = _effective(scale, w).view(-1, 1, 1, 1)
        # EDM2's D_g.lerp(D_main, w) in ε, written around ε_c so a row at w = 1 is ε_c exactly, as in a batch
        # that evaluates only the main network.
        return Guided(p.cond + (s - 1) * (p.cond - p.guide))


RULES: dict[str, type[GuidanceRule]] = {
    r.name: r for r in (NoGuidance, ClassifierFree, ClassifierOnConditional, ClassifierOnUnconditional,
                        ClassifierFreePlusClassifier, AdaptiveProjected, ClassifierFreePlusPlus, Autoguidance,
                        CleanClassifierGuidance)}
METHODS = tuple(RULES)


def make_rule(method: str, options: GuidanceOptions | None = None) -> GuidanceRule:
    """The rule object for a method name."""
    if method not in RULES:
        raise OptionError("methods", f"unknown guidance method {method!r}", f"choose from {list(METHODS)}")
    return RULES[method](options)


def cell_cost(rule: GuidanceRule, scale: float, schedule: NoiseSchedule, steps: int) -> tuple[float, float, float]:
    """(main-network evaluations, classifier passes, guide-network evaluations) per sample of one cell sampled
    on its own: a pure function of the plan. (A batched pass may evaluate both CFG branches for s = 0 or 1
    when its chunk also holds other scales; the cost a cell is reported with is what it needs by itself.)"""
    nfe = passes = guides = 0
    for t in respaced_timesteps(schedule.timesteps, steps):
        mode = rule.mode([scale], guidance_weight(t, schedule, rule.options))
        nfe += mode.network_evaluations
        passes += int(mode.gradient)
        guides += mode.guide_evaluations
    return float(nfe), float(passes), float(guides)
