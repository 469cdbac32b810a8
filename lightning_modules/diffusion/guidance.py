"""Guidance rules: how a class-conditional network (and an optional noisy classifier) become one
guided ε-prediction per step. One sampler loop serves every method; only this object changes.

General form, per sample (CFG scale s_cfg, CG scale s_cg, classifier gradient g = ∇ log p(y|x_t)):
    ε̂ = ε_u + s_cfg·(ε_c − ε_u)            (diffusers/Imagen convention: s=1 conditional, s=0 unconditional)
    DDIM:      ε̂ ← ε̂ − s_cg·√(1−ᾱ_t)·g      (ε-form, applied by the sampler)
    ancestral: μ̂ ← μ + s_cg·Σ_t·g            (mean-form, applied by the sampler)
The named methods are points of that form: cfg = (s, 0), cg_cond = (1, s), cg_uncond = (0, s),
cfg+cg = (s, s2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .schedule import NoiseSchedule, respaced_timesteps

METHODS = ("none", "cfg", "cg_cond", "cg_uncond", "cfg+cg")
SCALE_SCHEDULES = ("constant", "linear", "cosine")


def method_scales(method: str, scale: float, cg_scale: float = 0.0) -> tuple[float, float]:
    """(s_cfg, s_cg) for a named method at its native scale; `cg_scale` is the CG part of 'cfg+cg'."""
    table = {
        "none": (1.0, 0.0),
        "cfg": (scale, 0.0),
        "cg_cond": (1.0, scale),
        "cg_uncond": (0.0, scale),
        "cfg+cg": (scale, cg_scale),
    }
    if method not in table:
        raise ValueError(f"unknown guidance method {method!r}; choose one of {METHODS}")
    return table[method]


def gamma(method: str, scale: float, cg_scale: float = 0.0) -> float:
    """The common axis: the exponent γ on p(y|x) that the method implies (DESIGN.md)."""
    s_cfg, s_cg = method_scales(method, scale, cg_scale)
    return s_cfg + s_cg


def classifier_grad(classifier: nn.Module, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """∇_x log softmax(f(x, t))[y], per sample. Safe inside no-grad / inference-mode sampling loops.

    Summing log-probs over the batch is exact because the classifier has no cross-sample layers.
    Under torch.compile the gradient is taken with `torch.func.grad`, which Dynamo traces into the same
    graph as the rest of the step (`torch.autograd.grad` makes it skip the frame); eagerly, plain autograd
    is ~1.5x faster than functorch's wrappers (measured on CPU).
    """

    def log_prob(x_in: Tensor) -> Tensor:
        log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
        return log_probs.gather(1, y.view(-1, 1)).sum()

    if torch.compiler.is_compiling():
        return torch.func.grad(log_prob)(x.detach())
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        return torch.autograd.grad(log_prob(x_in), x_in)[0]


@dataclass(frozen=True)
class StepMode:
    """What one sampling step evaluates, decided on the host before the step runs.

    `branches`: "cond" or "uncond" (one network evaluation) or "both" (one batched forward of 2B);
    `classifier`: whether any sample is classifier-guided at this step. A compiled step is specialised
    on these two values, so a whole sweep compiles a handful of graphs, never one per timestep.
    """

    branches: str
    classifier: bool

    @property
    def network_evaluations(self) -> int:
        """Per sample: the batched CFG forward of 2B counts 2."""
        return 2 if self.branches == "both" else 1


def guidance_weight(t: int, timesteps: int, interval: tuple[int, int] | None, scale_schedule: str) -> float:
    """How much of the guidance beyond the base branch acts at training index t, in [0, 1]."""
    if interval is not None and not interval[0] <= t <= interval[1]:
        return 0.0
    progress = 1.0 - t / (timesteps - 1)  # 0 at pure noise, 1 at the data end
    if scale_schedule == "linear":
        return progress
    if scale_schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * progress))
    return 1.0


def step_mode(cfg_scales: Iterable[float], classifier_guided: bool, w: float) -> StepMode:
    """The evaluations a step with guidance weight w needs for a batch with these CFG scales."""
    effective = {(1.0 + (s - 1.0) * w) if s != 0 else 0.0 for s in cfg_scales}
    branches = "cond" if effective == {1.0} else "uncond" if effective == {0.0} else "both"
    return StepMode(branches, w != 0.0 and classifier_guided)


class GuidedDenoiser:
    """A guided ε-predictor for one batch: labels, per-sample scales and options fixed at creation.

    Per-sample scales let every scale of a sweep run as one batched pass. The guidance interval
    and the scale schedule modulate only the guidance *beyond* the base branch (the conditional
    one, or the unconditional one where s_cfg = 0), so outside the interval a sample is plain
    conditional (or plain unconditional) sampling.
    """

    def __init__(
        self,
        net: Callable[[Tensor, Tensor, Tensor], Tensor],
        schedule: NoiseSchedule,
        labels: Tensor,
        null_label: int,
        *,
        prediction: str = "eps",
        cfg_scale: float | Sequence[float] = 1.0,
        cg_scale: float | Sequence[float] = 0.0,
        classifier: nn.Module | None = None,
        interval: tuple[int, int] | None = None,
        scale_schedule: str = "constant",
        cfg_rescale: float = 0.0,
    ) -> None:
        n = len(labels)
        self.cfg_host = _per_sample(cfg_scale, n, "cfg_scale")
        self._cfg_values = set(self.cfg_host)  # decided on the host, so no per-step device sync
        self.cg_host = _per_sample(cg_scale, n, "cg_scale")
        if any(s != 0 for s in self.cg_host) and classifier is None:
            raise ValueError("classifier guidance (cg_scale != 0) needs a noisy classifier checkpoint")
        if scale_schedule not in SCALE_SCHEDULES:
            raise ValueError(f"unknown scale_schedule {scale_schedule!r}; choose one of {SCALE_SCHEDULES}")
        if not 0.0 <= cfg_rescale <= 1.0:
            raise ValueError(f"cfg_rescale (φ) must be in [0, 1], got {cfg_rescale}")
        self.net, self.schedule, self.prediction = net, schedule, prediction
        self.labels = labels
        self.null = torch.full_like(labels, null_label)
        self.classifier = classifier
        self.interval, self.scale_schedule, self.cfg_rescale = interval, scale_schedule, cfg_rescale
        device = labels.device
        self.cfg_scale = torch.tensor(self.cfg_host, device=device)
        self.cg_scale = torch.tensor(self.cg_host, device=device)
        self.cfg_base = (self.cfg_scale != 0).float()  # 1 = conditional branch is the base, 0 = unconditional
        self.nfe = 0.0  # network evaluations per sample so far
        self.classifier_grads = 0.0  # classifier forward+backward passes per sample so far

    def weight(self, t: int) -> float:
        """How much of the guidance beyond the base branch acts at training index t, in [0, 1]."""
        return guidance_weight(t, self.schedule.timesteps, self.interval, self.scale_schedule)

    def mode(self, t: int) -> StepMode:
        """Which evaluations step t needs (host-side: no device sync, nothing counted)."""
        return step_mode(self._cfg_values, any(s != 0 for s in self.cg_host), self.weight(t))

    def count(self, mode: StepMode) -> None:
        """Book the cost of one step per sample (a batched CFG forward of 2B counts 2)."""
        self.nfe += mode.network_evaluations
        self.classifier_grads += int(mode.classifier)

    def _eps(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        out = self.net(x, t, y).float()
        return self.schedule.eps_from_output(self.prediction, out, x, t)

    def guided_eps(self, x: Tensor, t: Tensor, w: Tensor, mode: StepMode) -> Tensor:
        """The CFG-combined ε for a batch at training indices t (B,), guidance weight w (0-d tensor).

        Pure tensor code (no host reads), so the sampler may compile it; classifier guidance is
        added by the sampler from `scaled_grad`.
        """
        if mode.branches == "cond":
            return self._eps(x, t, self.labels)
        if mode.branches == "uncond":
            return self._eps(x, t, self.null)
        # One batched forward; chunk order is fixed: conditional first, null label second.
        eps_c, eps_u = self._eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.labels, self.null])).chunk(2)
        s = (self.cfg_base + (self.cfg_scale - self.cfg_base) * w).view(-1, 1, 1, 1)
        guided = eps_u + s * (eps_c - eps_u)
        if self.cfg_rescale > 0:
            # Lin et al. 2023: match the guided prediction's per-sample std to the conditional one's.
            dims = tuple(range(1, x.ndim))
            ratio = eps_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-8)
            guided = self.cfg_rescale * guided * ratio + (1 - self.cfg_rescale) * guided
        return guided

    def scaled_grad(self, x: Tensor, t: Tensor, w: Tensor) -> Tensor:
        """s_cg(t)·∇_{x_t} log p(y | x_t); the classifier is fed the ORIGINAL training indices t."""
        assert self.classifier is not None
        g = classifier_grad(self.classifier, x, t, self.labels)
        return (self.cg_scale * w).view(-1, 1, 1, 1) * g

    def eps(self, x: Tensor, t: int) -> Tensor:
        """The CFG-combined ε at training index t, counted (for direct use; samplers use guided_eps)."""
        mode = self.mode(t)
        self.nfe += mode.network_evaluations  # the classifier part is counted by grad()
        return self.guided_eps(x, self._t_batch(x, t), self._w(x, t), mode)

    def grad(self, x: Tensor, t: int) -> Tensor | None:
        """s_cg(t)·∇ log p(y | x_t) at training index t, or None when no sample is classifier-guided there."""
        if not self.mode(t).classifier:
            return None
        self.classifier_grads += 1
        return self.scaled_grad(x, self._t_batch(x, t), self._w(x, t))

    @staticmethod
    def _t_batch(x: Tensor, t: int) -> Tensor:
        return torch.full((len(x),), t, device=x.device, dtype=torch.long)

    def _w(self, x: Tensor, t: int) -> Tensor:
        return torch.tensor(self.weight(t), device=x.device)


def guidance_cost(schedule: NoiseSchedule, steps: int, cfg_scale: float, cg_scale: float,
                  interval: tuple[int, int] | None = None, scale_schedule: str = "constant") -> tuple[float, float]:
    """(network evaluations, classifier passes) per sample of one cell sampled on its own.

    A batched sweep pass may evaluate both CFG branches for a sample at s = 0 or 1 when its chunk also
    holds other scales; the cost a cell is reported with is what it needs by itself.
    """
    nfe = grads = 0
    for t in respaced_timesteps(schedule.timesteps, steps):
        mode = step_mode([cfg_scale], cg_scale != 0, guidance_weight(t, schedule.timesteps, interval, scale_schedule))
        nfe += mode.network_evaluations
        grads += int(mode.classifier)
    return float(nfe), float(grads)


def _per_sample(value: float | Sequence[float] | Tensor, n: int, name: str) -> list[float]:
    if isinstance(value, Tensor):
        value = value.flatten().tolist()
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for a batch of {n} samples")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite, got {values[:5]}...")
    return values
