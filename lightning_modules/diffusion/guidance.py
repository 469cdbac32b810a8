"""What the guidance hook passes around, and the gradient and score functions the rules use.

A rule (`methods/`, one class per method) says per step which predictions it needs (`StepMode`: names from
BRANCHES, and whether a classifier gradient is taken) and how it combines them (`Predictions` → `Guided`): a
guided ε plus an optional extra score term s·∇log p(y|x_t). Rules see predictions and gradient functions, never
networks or classifiers; samplers see `Guided`, never method names. The score term is applied by the sampler in
the form its update needs, by the two functions that sit side by side here (guided-diffusion's condition_score /
condition_mean):
    ε-form (DDIM):      ε̂ = ε − σ_t·score,        σ_t = √(1−ᾱ_t)
    mean-form (DDPM):   μ̂ = μ + Σ_t·score
Scales follow docs/conventions.md: CFG ε̂ = ε_u + s·(ε_c − ε_u) (s = 1 conditional, s = 0 unconditional; no
value of s switches guidance off); CG s = 0 is unguided. Every scale is per sample, so all scales of a sweep
run as one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .options import OptionError, SharedGuidance
from .schedule import NoiseSchedule, respaced_timesteps

GradFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t, y) -> ∇_x log p(y | x_t)


# The predictions a step can ask for. "cond"/"uncond"/"random": the main network at the label, the null label or
# an independent random class (ICG), evaluated as one batched forward in this order; "guide": the guide network at
# the label (autoguidance); "perturbed": the main network under the rule's perturbation (PAG, SEG, TSG, ...).
BRANCHES = ("cond", "uncond", "random", "guide", "perturbed")
MAIN_BRANCHES = ("cond", "uncond", "random", "perturbed")


@dataclass(frozen=True)
class StepMode:
    """What one step evaluates, decided on the host before it runs (a compiled step specialises on it).

    `branches`: the predictions needed, names from BRANCHES (e.g. ("cond", "uncond") is one batched forward of
    2B); `gradient`: whether the classifier gradient is taken.
    """

    branches: tuple[str, ...]
    gradient: bool

    @property
    def network_evaluations(self) -> int:
        """Per sample, of the main network: the batched CFG forward of 2B counts 2, a perturbed pass 1."""
        return len([b for b in self.branches if b in MAIN_BRANCHES])

    @property
    def guide_evaluations(self) -> int:
        return int("guide" in self.branches)


@dataclass
class Predictions:
    """What a rule may combine at one step (ε of each branch); a branch not in the step's mode is None.

    `a_t`, `sigma_t` (√ᾱ_t, √(1−ᾱ_t), shaped to broadcast) convert between ε and x̂0 for rules that act in
    x̂0 space; `posterior` = (weight of x̂0, weight of x_t, variance) of the DDPM posterior q(x_s | x_t, x̂0) of
    this step's transition t → s (0-d tensors), for rules that track the sampler's trajectory (FBG); `memory`
    is the rule's own state carried from the previous step (its `initial_memory` at the first); `step` the
    0-based step index (0-d tensor).
    """

    x: Tensor
    t: Tensor
    a_t: Tensor
    sigma_t: Tensor
    memory: dict[str, Tensor]
    posterior: tuple[Tensor, Tensor, Tensor] | None = None
    step: Tensor | None = None
    y: Tensor | None = None  # the labels
    cond: Tensor | None = None
    uncond: Tensor | None = None
    random: Tensor | None = None  # the main network at an independent random class (ICG)
    guide: Tensor | None = None  # the guide network's conditional ε (autoguidance)
    perturbed: Tensor | None = None  # the main network under the rule's perturbation
    grad: Tensor | None = None  # ∇_{x_t} log p(y | x_t), unscaled
    cond_fn: Callable[[Tensor], Tensor] | None = None  # x ↦ ε_c(x) at this step (for gradients through the network)

    def x0(self, eps: Tensor) -> Tensor:
        return (self.x - self.sigma_t * eps) / self.a_t

    def eps(self, x0: Tensor) -> Tensor:
        return (self.x - self.a_t * x0) / self.sigma_t


@dataclass
class Guided:
    """A rule's output: the guided ε, an extra score term (already scaled) for the sampler to apply, and the
    ε a deterministic sampler renoises with when it is not `eps` (CFG++). Memory entries named `trace_*` (one
    value per sample) are also recorded per step by the sampler (`stats["trace"]`), e.g. FBG's scale λ_t."""

    eps: Tensor
    score: Tensor | None = None
    eps_renoise: Tensor | None = None
    memory: dict[str, Tensor] | None = None  # the rule's state for the next step (None = unchanged)


def condition_score(eps: Tensor, score: Tensor | None, sigma_t: Tensor) -> Tensor:
    """ε-form guidance (DDIM, DPM-Solver): ε̂ = ε − √(1−ᾱ_t)·score (Dhariwal & Nichol 2021, Alg. 2)."""
    return eps if score is None else eps - sigma_t * score


def condition_mean(mean: Tensor, score: Tensor | None, variance: Tensor) -> Tensor:
    """Mean-form guidance (ancestral sampling): μ̂ = μ + Σ_t·score (Dhariwal & Nichol 2021, Alg. 1)."""
    return mean if score is None else mean + variance * score


LogProbFn = Callable[..., Tensor]  # (x̂0, y, temperature) -> log p(y | x̂0) per sample


def input_grad(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """∇_x Σ fn(x), safe inside no-grad / inference-mode sampling loops. Summing per-sample terms is exact when
    samples do not interact. Under torch.compile the gradient is taken with `torch.func.grad`, which Dynamo
    traces into the step's graph (`torch.autograd.grad` makes it skip the frame); eagerly plain autograd is
    ~1.5x faster."""
    if torch.compiler.is_compiling():
        return torch.func.grad(lambda z: fn(z).sum())(x.detach())
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        return torch.autograd.grad(fn(x_in).sum(), x_in)[0]


def _log_prob(logits: Tensor, y: Tensor, temperature: float = 1.0) -> Tensor:
    logits = logits.float() if logits.dtype != torch.float64 else logits  # bf16 logits up to float32
    return F.log_softmax(logits / temperature, dim=-1).gather(1, y.view(-1, 1)).squeeze(1)


def classifier_grad(classifier: nn.Module, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """∇_x log softmax(f(x, t))[y], per sample, of a noisy classifier at the original training indices t."""
    return input_grad(lambda z: _log_prob(classifier(z, t), y), x)


def clean_log_prob(classifier: nn.Module) -> LogProbFn:
    """(x̂0, y, τ) ↦ log softmax(f(x̂0, 0)/τ)[y] of a classifier trained on clean images (its time input is 0)."""

    def log_prob(x0: Tensor, y: Tensor, temperature: float = 1.0) -> Tensor:
        return _log_prob(classifier(x0, torch.zeros(len(x0), dtype=torch.long, device=x0.device)), y, temperature)

    return log_prob


def noise_level(schedule: NoiseSchedule, t: int) -> float:
    """σ = √((1−ᾱ_t)/ᾱ_t) at training index t (the axis of `sigma_interval`)."""
    ab = schedule.alpha_bar(t)
    return math.sqrt((1 - ab) / ab)


def check_guided_steps(options: SharedGuidance, timesteps: int, steps: int, schedule: NoiseSchedule | None = None,
                       prefix: str = "") -> None:
    """Raise OptionError when guidance acts at none of the `steps` respaced sampling steps: a band that holds
    no step would silently sample every cell as the plain model. Without `schedule` (σ unknown) only the
    `interval` on training indices is checked."""
    ts = respaced_timesteps(timesteps, steps)
    at = ", ".join(f"t={t}" + ("" if schedule is None else f" σ={noise_level(schedule, t):.3g}") for t in ts)
    more = f"or sample with more steps than {steps}"
    if options.interval is not None and not any(options.interval[0] <= t <= options.interval[1] for t in ts):
        raise OptionError(f"{prefix}interval", f"{list(options.interval)} holds none of the {steps} sampling "
                          f"steps ({at}), so no step would be guided", f"widen it to hold one of these t, {more}")
    if schedule is None or any(guidance_weight(t, schedule, options) > 0 for t in ts):
        return
    band, interval = options.sigma_interval, options.interval
    in_band = [t for t in ts if band is None or band[0] < noise_level(schedule, t) <= band[1]]
    guided = [t for t in in_band if interval is None or interval[0] <= t <= interval[1]]
    if band is not None and not guided:
        problem = f"shares no sampling step with interval {list(interval or ())}" if in_band \
            else "holds none of the sampling steps' noise levels"
        raise OptionError(f"{prefix}sigma_interval", f"({band[0]:g}, {band[1]:g}] {problem} ({at}), so no step "
                          "would be guided", f"widen it to hold one of these σ (guided where lo < σ <= hi), {more}")
    raise OptionError(f"{prefix}scale_schedule", f"the {options.scale_schedule} ramp is 0 at every guided step ({at})",
                      f"use scale_schedule constant, {more}")


def guidance_weight(t: int, schedule: NoiseSchedule, options: SharedGuidance) -> float:
    """How much of the guidance beyond the base branch acts at training index t, in [0, 1]."""
    if options.interval is not None and not options.interval[0] <= t <= options.interval[1]:
        return 0.0
    if options.sigma_interval is not None:
        # Kynkäänniemi et al. 2024 define the interval on the noise level σ = √((1−ᾱ)/ᾱ): guide in (lo, hi].
        if not options.sigma_interval[0] < noise_level(schedule, t) <= options.sigma_interval[1]:
            return 0.0
    progress = 1.0 - t / (schedule.timesteps - 1)  # 0 at pure noise, 1 at the data end
    if options.scale_schedule == "linear":
        return progress
    if options.scale_schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * progress))
    return 1.0


