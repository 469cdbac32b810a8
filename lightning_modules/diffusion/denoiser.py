"""The guided denoiser: a network, a rule and per-sample scales become one hook the samplers call.

The denoiser evaluates exactly the predictions the rule's step mode asks for (both CFG branches as one
batched forward, conditional first), converts the network output to ε, takes the classifier gradient
through a gradient function (it never sees a classifier), and hands everything to the rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .guidance import GradFn, GuidanceRule, Guided, LogProbFn, Predictions, StepMode, guidance_weight, input_grad
from .options import GuidanceOptions
from .rules import make_rule
from .schedule import NoiseSchedule

Network = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t, y) -> model output (ε or v)


class GuidedDenoiser:
    """Guided ε for one batch: labels, rule and per-sample scales fixed at creation.

    `scales` are the rule's native scales, one per sample (or one for all), so every scale of a sweep runs
    as one batched pass. `grad_fn(x, t, y)` returns ∇_x log p(y | x_t); rules that need it fail without it.
    """

    def __init__(self, net: Network, schedule: NoiseSchedule, labels: Tensor, null_label: int,
                 rule: GuidanceRule | str = "none", scales: float | Sequence[float] | Tensor = 1.0, *,
                 grad_fn: GradFn | None = None, prediction: str = "eps",
                 options: GuidanceOptions | None = None, guide: Network | None = None,
                 guide_prediction: str = "eps", log_prob_x0: LogProbFn | None = None) -> None:
        self.rule = make_rule(rule, options) if isinstance(rule, str) else rule
        self.rule.options.check(schedule.timesteps)
        self.scales_host = _per_sample(scales, len(labels))
        self._distinct = sorted(set(self.scales_host))  # decided on the host: no per-step device sync
        takes_gradient = any(self.rule.needs_gradient(s) for s in self._distinct)
        if self.rule.gradient_at == "x0" and takes_gradient and log_prob_x0 is None:
            raise ValueError(f"method {self.rule.name!r} needs a classifier trained on clean images "
                             "(clean_classifier_ckpt)")
        if self.rule.gradient_at == "x_t" and grad_fn is None and takes_gradient:
            raise ValueError(f"method {self.rule.name!r} at scales {self._distinct} takes classifier gradients: "
                             "give a gradient function (a noisy classifier checkpoint, classifier_ckpt)")
        if guide is None and self.rule.uses_guide:
            raise ValueError(f"method {self.rule.name!r} needs a guide network (a weaker diffusion model: guide_ckpt)")
        self.net, self.schedule, self.prediction, self.grad_fn = net, schedule, prediction, grad_fn
        self.guide, self.guide_prediction, self.log_prob_x0 = guide, guide_prediction, log_prob_x0
        self.labels = labels
        self.null = torch.full_like(labels, null_label)
        self.scale = torch.tensor(self.scales_host, device=labels.device)

    def weight(self, t: int) -> float:
        """How much of the guidance beyond the base branch acts at training index t, in [0, 1]."""
        return guidance_weight(t, self.schedule, self.rule.options)

    def mode(self, t: int) -> StepMode:
        """Which evaluations step t needs (host side: no device sync)."""
        return self.rule.mode(self._distinct, self.weight(t))

    def _eps(self, x: Tensor, t: Tensor, y: Tensor, guide: bool = False) -> Tensor:
        net, prediction = (self.guide, self.guide_prediction) if guide else (self.net, self.prediction)
        return self.schedule.eps_from_output(prediction, net(x, t, y).float(), x, t)

    def __call__(self, x: Tensor, t: Tensor, w: Tensor, mode: StepMode, memory: Tensor | None = None,
                 a_t: Tensor | None = None, sigma_t: Tensor | None = None) -> Guided:
        """The guided prediction at training indices t (B,) with guidance weight w (0-d tensor); `memory` is
        the rule's state from the previous step (the sampler carries it; zeros at the first step); `a_t`,
        `sigma_t` = √ᾱ_t, √(1−ᾱ_t) (samplers pass their precomputed values; else gathered here).

        Pure tensor code (no host reads), so a sampler may compile it into its step.
        """
        if a_t is None or sigma_t is None:
            a_t, sigma_t = self.schedule.coef("sqrt_ab", t, x), self.schedule.coef("sqrt_1m_ab", t, x)
        p = Predictions(x, t, a_t, sigma_t, torch.zeros_like(x) if memory is None else memory)
        if mode.branches == ("cond", "uncond"):
            # One batched forward; chunk order is fixed: conditional first, null label second.
            both = self._eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.labels, self.null]))
            p.cond, p.uncond = both.chunk(2)
        elif mode.branches == ("cond",):
            p.cond = self._eps(x, t, self.labels)
        elif mode.branches == ("uncond",):
            p.uncond = self._eps(x, t, self.null)
        elif mode.branches == ("cond", "guide"):
            p.cond = self._eps(x, t, self.labels)
            p.guide = self._eps(x, t, self.labels, guide=True)  # the same label through the weaker network
        if mode.gradient:
            p.grad = self._x0_grad(p) if self.rule.gradient_at == "x0" else self.grad_fn(x, t, self.labels)
        return self.rule.combine(p, self.scale, w)

    def _x0_grad(self, p: Predictions) -> Tensor:
        """∇_{x_t} log p(y | x̂0(x_t)) of a clean classifier (Ma et al. 2023; Bansal et al. 2023): the cheap
        Jacobian ∇_{x̂0} / √ᾱ_t, or the exact one through the network."""
        y, log_prob = self.labels, self.log_prob_x0
        assert log_prob is not None and p.cond is not None
        if self.rule.options.cg_clean_exact:
            return input_grad(lambda z: log_prob((z - p.sigma_t * self._eps(z, p.t, y)) / p.a_t, y), p.x)
        return input_grad(lambda x0: log_prob(x0, y), p.x0(p.cond)) / p.a_t

    def at(self, x: Tensor, t: int) -> Guided:
        """The guided prediction at one training index (for direct use and tests; samplers call __call__)."""
        t_batch = torch.full((len(x),), t, device=x.device, dtype=torch.long)
        return self(x, t_batch, torch.tensor(self.weight(t), device=x.device), self.mode(t))


def _per_sample(value: float | Sequence[float] | Tensor, n: int) -> list[float]:
    if isinstance(value, Tensor):
        value = value.flatten().tolist()
    if isinstance(value, (int, float)):
        value = [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"scales has {len(values)} entries for a batch of {n} samples")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"scales must be finite, got {values[:5]}...")
    return values
