"""Guidance rules: one small class per method, seen by the sampler through one hook.

A rule says, per step, which predictions it needs (`mode`: conditional and/or unconditional branch, a
classifier gradient) and how it combines them (`combine`) into a guided ε plus an optional extra score
term s·∇log p(y|x_t). Rules see predictions, never networks or classifiers; samplers see `Guided`, never
method names. The score term is applied by the sampler in the form its update needs, by the two functions
that sit side by side here (guided-diffusion's condition_score / condition_mean):
    ε-form (DDIM):      ε̂ = ε − σ_t·score,        σ_t = √(1−ᾱ_t)
    mean-form (DDPM):   μ̂ = μ + Σ_t·score
Scales follow docs/conventions.md: CFG ε̂ = ε_u + s·(ε_c − ε_u) (s = 1 conditional, s = 0 unconditional; no
value of s switches guidance off); CG s = 0 is unguided. Every scale is per sample, so all scales of a sweep
run as one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .options import GuidanceOptions, OptionError
from .schedule import respaced_timesteps

GradFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t, y) -> ∇_x log p(y | x_t)


@dataclass(frozen=True)
class StepMode:
    """What one step evaluates, decided on the host before it runs (a compiled step specialises on it).

    `branches`: the network predictions needed, a subset of ("cond", "uncond") in that order (both = one
    batched forward of 2B); `gradient`: whether the classifier gradient is taken.
    """

    branches: tuple[str, ...]
    gradient: bool

    @property
    def network_evaluations(self) -> int:
        """Per sample: the batched CFG forward of 2B counts 2."""
        return len(self.branches)


@dataclass
class Predictions:
    """What a rule may combine at one step; a branch not in the step's mode is None."""

    x: Tensor
    t: Tensor
    cond: Tensor | None = None
    uncond: Tensor | None = None
    grad: Tensor | None = None  # ∇_{x_t} log p(y | x_t), unscaled


@dataclass
class Guided:
    """A rule's output: the guided ε, and an extra score term (already scaled) for the sampler to apply."""

    eps: Tensor
    score: Tensor | None = None


def condition_score(eps: Tensor, score: Tensor | None, sigma_t: Tensor) -> Tensor:
    """ε-form guidance (DDIM, DPM-Solver): ε̂ = ε − √(1−ᾱ_t)·score (Dhariwal & Nichol 2021, Alg. 2)."""
    return eps if score is None else eps - sigma_t * score


def condition_mean(mean: Tensor, score: Tensor | None, variance: Tensor) -> Tensor:
    """Mean-form guidance (ancestral sampling): μ̂ = μ + Σ_t·score (Dhariwal & Nichol 2021, Alg. 1)."""
    return mean if score is None else mean + variance * score


def classifier_grad(classifier: nn.Module, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """∇_x log softmax(f(x, t))[y], per sample. Safe inside no-grad / inference-mode sampling loops.

    Summing log-probs over the batch is exact because the classifier has no cross-sample layers. Under
    torch.compile the gradient is taken with `torch.func.grad`, which Dynamo traces into the step's graph
    (`torch.autograd.grad` makes it skip the frame); eagerly plain autograd is ~1.5x faster.
    """

    def log_prob(x_in: Tensor) -> Tensor:
        log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
        return log_probs.gather(1, y.view(-1, 1)).sum()

    if torch.compiler.is_compiling():
        return torch.func.grad(log_prob)(x.detach())
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        return torch.autograd.grad(log_prob(x_in), x_in)[0]


def guidance_weight(t: int, timesteps: int, options: GuidanceOptions) -> float:
    """How much of the guidance beyond the base branch acts at training index t, in [0, 1]."""
    if options.interval is not None and not options.interval[0] <= t <= options.interval[1]:
        return 0.0
    progress = 1.0 - t / (timesteps - 1)  # 0 at pure noise, 1 at the data end
    if options.scale_schedule == "linear":
        return progress
    if options.scale_schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * progress))
    return 1.0


class GuidanceRule:
    """One guidance method. Subclasses set `name` and implement gamma, mode and combine."""

    name: ClassVar[str]
    uses_gradient: ClassVar[bool] = False  # may need a classifier gradient at some scale

    def __init__(self, options: GuidanceOptions | None = None) -> None:
        self.options = options or GuidanceOptions()

    def gamma(self, scale: float) -> float:
        """The common axis: the exponent γ on p(y|x) the method implies at this native scale."""
        raise NotImplementedError

    def needs_gradient(self, scale: float) -> bool:
        """Whether a cell at this scale takes classifier gradients (so needs a classifier)."""
        return False

    def mode(self, scales: Sequence[float], w: float) -> StepMode:
        """The evaluations a step with guidance weight w needs for a batch holding these scales."""
        raise NotImplementedError

    def combine(self, p: Predictions, scale: Tensor, w: Tensor) -> Guided:
        """The guided prediction from per-sample scales (B,) and the step's guidance weight w (0-d)."""
        raise NotImplementedError


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

    def mode(self, scales: Sequence[float], w: float) -> StepMode:
        pairs = [self.split(s) for s in scales]
        effective = {(1.0 + (c - 1.0) * w) if c != 0 else 0.0 for c, _ in pairs}
        branches = ("cond",) if effective == {1.0} else ("uncond",) if effective == {0.0} else ("cond", "uncond")
        return StepMode(branches, w != 0.0 and any(g != 0 for _, g in pairs))

    def combine(self, p: Predictions, scale: Tensor, w: Tensor) -> Guided:
        s_cfg, s_cg = self.split(scale)
        score = None if p.grad is None else (s_cg * w).view(-1, 1, 1, 1) * p.grad
        if p.uncond is None or p.cond is None:
            return Guided(p.cond if p.uncond is None else p.uncond, score)
        base = (s_cfg != 0).float()  # 1 = the conditional branch is the base, 0 = the unconditional one
        s = (base + (s_cfg - base) * w).view(-1, 1, 1, 1)
        guided = p.uncond + s * (p.cond - p.uncond)
        if self.options.cfg_rescale > 0:
            # Lin et al. 2023: match the guided prediction's per-sample std to the conditional one's.
            dims = tuple(range(1, guided.ndim))
            ratio = p.cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-8)
            phi = self.options.cfg_rescale
            guided = phi * guided * ratio + (1 - phi) * guided
        return Guided(guided, score)


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


RULES: dict[str, type[GuidanceRule]] = {
    r.name: r for r in (NoGuidance, ClassifierFree, ClassifierOnConditional, ClassifierOnUnconditional,
                        ClassifierFreePlusClassifier)}
METHODS = tuple(RULES)


def make_rule(method: str, options: GuidanceOptions | None = None) -> GuidanceRule:
    """The rule object for a method name."""
    if method not in RULES:
        raise OptionError("methods", f"unknown guidance method {method!r}", f"choose from {list(METHODS)}")
    return RULES[method](options)


def cell_cost(rule: GuidanceRule, scale: float, timesteps: int, steps: int) -> tuple[float, float]:
    """(network evaluations, classifier passes) per sample of one cell sampled on its own: a pure function
    of the plan. (A batched pass may evaluate both CFG branches for s = 0 or 1 when its chunk also holds
    other scales; the cost a cell is reported with is what it needs by itself.)"""
    nfe = passes = 0
    for t in respaced_timesteps(timesteps, steps):
        mode = rule.mode([scale], guidance_weight(t, timesteps, rule.options))
        nfe += mode.network_evaluations
        passes += int(mode.gradient)
    return float(nfe), float(passes)
