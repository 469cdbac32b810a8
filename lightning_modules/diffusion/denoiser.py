"""The guided denoiser: a network, a rule and per-sample scales become one hook the samplers call.

The denoiser only evaluates networks: exactly the predictions the rule's step mode asks for (the label, null
label and random-class branches as one batched forward in that fixed order, the guide network, the perturbed
copy of the network), each converted to ε, and it hands them with the gradient functions to the rule. It never
sees a classifier (only gradient functions) and raises on a branch it cannot evaluate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .guidance import BRANCHES, GradFn, Guided, LogProbFn, Predictions, StepMode, guidance_weight
from .methods import GuidanceRule, make_rule
from .noise import keyed_integers
from .options import SharedGuidance
from .schedule import NoiseSchedule, posterior_coefficients

Network = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t, y) -> model output (ε or v)
CLEAN = ("cond", "uncond", "random")  # one batched forward of the main network, in this order
RANDOM_CLASS_STREAM = 1 << 22  # ICG's random class: a key stream disjoint from the sampler's noise


class GuidedDenoiser:
    """Guided ε for one batch: labels, rule and per-sample scales fixed at creation.

    `scales` are the rule's native scales, one per sample (or one for all), so every scale of a sweep runs
    as one batched pass. `grad_fn(x, t, y)` returns ∇_x log p(y | x_t); `log_prob_x0(x̂0, y, τ)` a clean
    classifier's log p(y | x̂0); rules that need one fail without it, before any sampling.
    """

    def __init__(self, net: Network, schedule: NoiseSchedule, labels: Tensor, null_label: int,
                 rule: GuidanceRule | str = "none", scales: float | Sequence[float] | Tensor = 1.0, *,
                 grad_fn: GradFn | None = None, prediction: str = "eps",
                 options: SharedGuidance | None = None, guide: Network | None = None,
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
        net = self.rule.network(net, self.scales_host, len(labels))  # GFT: the β = 1/s of each sample
        self.net, self.schedule, self.prediction, self.grad_fn = net, schedule, prediction, grad_fn
        self.guide, self.guide_prediction, self.log_prob_x0 = guide, guide_prediction, log_prob_x0
        perturbation = self.rule.perturbation(schedule)
        # A parameter-sharing copy whose hooks perturb it: the clean passes run the network itself, untouched.
        self.perturbed = None if perturbation is None else perturbation.attach(net)
        self.labels, self.num_classes = labels, null_label
        self.null = torch.full_like(labels, null_label)
        self.scale = torch.tensor(self.scales_host, device=labels.device)

    def weight(self, t: int) -> float:
        """How much of the guidance beyond the base branch acts at training index t, in [0, 1]."""
        return guidance_weight(t, self.schedule, self.rule.options)

    def mode(self, t: int) -> StepMode:
        """Which evaluations step t needs (host side: no device sync); raises on a branch it cannot evaluate."""
        mode = self.rule.step_mode(t, self._distinct, self.weight(t))
        unknown = [b for b in mode.branches if b not in BRANCHES]
        missing = [b for b, ok in (("guide", self.guide), ("perturbed", self.perturbed)) if b in mode.branches
                   and ok is None]
        if unknown or missing or len(set(mode.branches)) != len(mode.branches):
            raise ValueError(f"rule {self.rule.name!r} asks for branches {mode.branches} at t={t}: the denoiser "
                             f"evaluates each of {BRANCHES} at most once (the guide only with a guide network, "
                             "the perturbed pass only for a rule with a perturbation)")
        return mode

    def initial_memory(self, x: Tensor) -> dict[str, Tensor]:
        return self.rule.initial_memory(x)

    def prepare(self, pairs: Sequence[tuple[int, int]]) -> None:
        """The sampler's (t, s) transitions, before its first step (see GuidanceRule.prepare)."""
        self.rule.prepare(self.schedule, pairs)

    def _eps(self, x: Tensor, t: Tensor, output: Tensor, guide: bool = False) -> Tensor:
        return self.schedule.eps_from_output(self.guide_prediction if guide else self.prediction, output.float(), x, t)

    def random_labels(self, keys: Tensor, stream: Tensor) -> Tensor:
        """ICG's independent class per sample and step: keyed, so the same in every cell (paired)."""
        return keyed_integers(keys, stream + RANDOM_CLASS_STREAM, self.num_classes)

    def __call__(self, x: Tensor, t: Tensor, w: Tensor, mode: StepMode, memory: dict[str, Tensor] | None = None,
                 a_t: Tensor | None = None, sigma_t: Tensor | None = None, *, keys: Tensor | None = None,
                 stream: Tensor | None = None, posterior: tuple[Tensor, Tensor, Tensor] | None = None) -> Guided:
        """The guided prediction at training indices t (B,) with guidance weight w (0-d tensor); `memory` is
        the rule's state from the previous step (the sampler carries it); `a_t`, `sigma_t` = √ᾱ_t, √(1−ᾱ_t)
        (samplers pass their precomputed values; else gathered here); `keys` (B,) and `stream` (0-d) key any
        randomness of a branch (ICG's class, a perturbation's noise); `posterior` the step's DDPM posterior
        coefficients (for rules that track the trajectory).

        Pure tensor code (no host reads), so a sampler may compile it into its step.
        """
        if a_t is None or sigma_t is None:
            a_t, sigma_t = self.schedule.coef("sqrt_ab", t, x), self.schedule.coef("sqrt_1m_ab", t, x)
        if keys is None:
            keys = torch.arange(len(x), device=x.device)
        stream = torch.zeros((), dtype=torch.long, device=x.device) if stream is None else stream
        p = Predictions(x, t, a_t, sigma_t, self.rule.initial_memory(x) if memory is None else memory, posterior,
                        y=self.labels)
        clean = [b for b in CLEAN if b in mode.branches]
        if clean:
            labels = {"cond": self.labels, "uncond": self.null}
            if "random" in clean:
                labels["random"] = self.random_labels(keys, stream)
            n = len(clean)
            out = self.net(torch.cat([x] * n), torch.cat([t] * n), torch.cat([labels[b] for b in clean])) \
                if n > 1 else self.net(x, t, labels[clean[0]])
            for branch, eps in zip(clean, self._eps(torch.cat([x] * n), torch.cat([t] * n), out).chunk(n)):
                setattr(p, branch, eps)
        if "guide" in mode.branches:
            p.guide = self._eps(x, t, self.guide(x, t, self.labels), guide=True)  # the same label, weaker network
        if "perturbed" in mode.branches:
            p.perturbed = self._eps(x, t, self.perturbed(x, t, self.labels, keys, stream))
        if mode.gradient:
            p.cond_fn = lambda z: self._eps(z, t, self.net(z, t, self.labels))
            p.grad = self.rule.gradient(p, self.grad_fn, self.log_prob_x0)
        return self.rule.combine(p, self.scale, w)

    def at(self, x: Tensor, t: int, keys: Tensor | None = None, next_t: int | None = None) -> Guided:
        """The guided prediction at one training index, for direct use and tests (samplers call __call__): the
        step's transition goes to `next_t` (default t − 1; −1 = the data end), and the rule is prepared for the
        two-step chain t → next_t → data end (or the chain ending in this step, for a step into the data end)."""
        s = t - 1 if next_t is None else next_t
        self.prepare([(t, s), (s, -1)] if s >= 0 else [(t + 1, t), (t, s)])
        coefficients = posterior_coefficients(self.schedule.alpha_bar(t), self.schedule.alpha_bar(s))
        posterior = tuple(torch.tensor(v, device=x.device) for v in coefficients)
        t_batch = torch.full((len(x),), t, device=x.device, dtype=torch.long)
        return self(x, t_batch, torch.tensor(self.weight(t), device=x.device), self.mode(t), keys=keys,
                    posterior=posterior)


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
