"""CFG-Zero* (Fan et al. 2025, arXiv 2503.18886) as pure tensor maths, for a VP diffusion model's ε predictions.

The paper guides a flow-matching *velocity*: per sample s* = ⟨v_c, v_u⟩/‖v_u‖² (over all pixels), then
ṽ = s*·v_u + w·(v_c − s*·v_u), and ṽ = 0 for the first K steps ("zero-init"). Neither the projection nor the
zero is invariant under a change of prediction space, so the space is a decision, made here as follows.

Space: the velocity of the rectified-flow path through the *same marginals* as our VP process. With
x_t = a_t·x0 + σ_t·ε (a_t = √ᾱ_t, σ_t = √(1−ᾱ_t)) put z = x_t/(a_t + σ_t) and τ = σ_t/(a_t + σ_t); then
z = (1 − τ)·x0 + τ·ε exactly (the rectified-flow / SD3 interpolant), so dz/dτ = ε − x0 along each path and the
marginal velocity is u = E[ε − x0 | x_t] = ε̂ − x̂0 with x̂0 = (x_t − σ_t·ε̂)/a_t. This is the quantity the paper's
models (SD3, Flux, Wan) predict, and DDIM (η = 0) on our grid is exactly Euler in (z, τ):
z_s = z_t + (τ_s − τ_t)·(ε̂ − x̂0). So CFG-Zero* here is what it is in a flow-matching Euler sampler, and
"zero output" (u = 0) means the step keeps z: ε̂ = x̂0 = x_t/(a_t + σ_t). In ε space instead, s* ≈ 1 at high noise
(both branches ≈ the same noise) and a zero ε would send x̂0 = x_t/a_t off to infinity.

Numerics: we work with r = a_t·u = (a_t + σ_t)·ε̂ − x_t, which needs no division by a_t (a_t → 0 at the noise
end); s* is invariant to that per-sample factor and the combination is linear, so the result is identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..guidance import Guided, Predictions, StepMode
from ..options import OptionError
from ..schedule import NoiseSchedule
from .base import GuidanceRule, effective


def _per_sample(value: Tensor | float, like: Tensor) -> Tensor | float:
    """A per-sample (B,) tensor shaped to broadcast over `like` (B, ...); floats and 0-d tensors pass through."""
    if isinstance(value, Tensor) and value.ndim == 1:
        return value.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return value


def optimal_scale(p_c: Tensor, p_u: Tensor, eps: float = 1e-8) -> Tensor:
    """s* = ⟨p_c, p_u⟩ / (‖p_u‖² + eps) per sample over all non-batch dims, shaped (B, 1, ..., 1).

    The paper's least-squares fit of s·p_u to p_c. Accumulated in at least float32 (bf16 sums of 10^5 pixels
    lose the digits s* lives in); `eps` is the reference code's guard, kept so results match it exactly.
    """
    acc = torch.promote_types(p_c.dtype, torch.float32)
    c, u = p_c.flatten(1).to(acc), p_u.flatten(1).to(acc)
    s = (c * u).sum(1) / ((u * u).sum(1) + eps)
    return s.to(p_c.dtype).view(-1, *([1] * (p_c.ndim - 1)))


def zero_star_combine(p_c: Tensor, p_u: Tensor, w: Tensor | float) -> Tensor:
    """s*·p_u + w·(p_c − s*·p_u) on arbitrary (B, ...) tensors: the paper's Eq. with w on the CFG axis
    (w = 1 gives p_c, s* = 1 gives CFG). `w` is a float, a 0-d tensor or per sample (B,)."""
    scaled_u = optimal_scale(p_c, p_u) * p_u
    return scaled_u + _per_sample(w, p_c) * (p_c - scaled_u)


def eps_to_velocity(x: Tensor, eps: Tensor, a_t: Tensor | float, sigma_t: Tensor | float) -> Tensor:
    """u = ε − x̂0 = ((a_t + σ_t)·ε − x)/a_t, the rectified-flow velocity dz/dτ of the same marginal path."""
    return ((a_t + sigma_t) * eps - x) / a_t


def velocity_to_eps(x: Tensor, u: Tensor, a_t: Tensor | float, sigma_t: Tensor | float) -> Tensor:
    """The inverse of `eps_to_velocity`: ε = (a_t·u + x)/(a_t + σ_t); u = 0 gives ε = x̂0 = x/(a_t + σ_t)."""
    return (a_t * u + x) / (a_t + sigma_t)


def zero_star_eps(x: Tensor, eps_c: Tensor, eps_u: Tensor, a_t: Tensor | float, sigma_t: Tensor | float,
                  w: Tensor | float, zero: Tensor) -> Tensor:
    """CFG-Zero* on ε predictions, acting on the flow-matching velocity u = ε − x̂0 (module docstring).

    `w`: the guidance weight (float, 0-d or per sample (B,)); `zero`: bool-ish, (B, 1, ..., 1) or 0-d, true where
    the step's output is the zero velocity (zero-init). Tensor-only (no host sync), so it compiles.
    """
    total = a_t + sigma_t  # >= 1 on a VP path (a² + σ² = 1), so dividing by it is always safe
    # r = a_t·u: the same direction as u per sample, so s* and the linear combination are unchanged.
    r = zero_star_combine(total * eps_c - x, total * eps_u - x, w)
    guided = (r + x) / total
    return torch.where(zero.to(torch.bool), x / total, guided)


@dataclass(frozen=True)
class ZeroStarOptions:
    """Options of `cfg_zero_star`.

    Args:
        zero_steps: K, how many of the first sampling steps output zero velocity (diffusers' zero_init_steps = 1;
            the authors advise about 4% of the steps); 0 = none.
    """

    zero_steps: int = 1

    def check(self, prefix: str = "") -> None:
        if not (isinstance(self.zero_steps, int) and self.zero_steps >= 0):
            raise OptionError(f"{prefix}zero_steps", f"{self.zero_steps!r} is not an integer >= 0",
                              "give the number of zeroed first steps, e.g. 1")


class ClassifierFreeZeroStar(GuidanceRule):
    """CFG-Zero* (Fan et al. 2025) on the rectified-flow velocity u = ε − x̂0 of the same marginal path (the space
    the paper works in; acting on u, the result does not depend on whether the network predicts ε or v):
    s* = ⟨u_c, u_u⟩/‖u_u‖² per sample, ũ = s*·u_u + w·(u_c − s*·u_u), and u = 0 (ε̂ = x̂0 = x/(√ᾱ_t + σ_t))
    on the first `zero_steps` steps, which evaluate no network. w = 1 is the conditional model outside the
    zeroed steps; γ = w (the CFG axis)."""

    name, label, color, marker = "cfg_zero_star", "CFG-Zero*", "tab:purple", ">"
    default_scales = (1.0, 1.25, 1.5, 2.0, 3.0)
    scale_axis = "CFG-Zero* scale w  (1 = conditional model after the zeroed steps)"
    gamma_text, cost_text = "CFG-Zero* γ = w", "2 (0 on the zeroed first steps)"
    Options = ZeroStarOptions

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self._zeroed: set[int] = set()

    def prepare(self, schedule: NoiseSchedule, pairs: Sequence[tuple[int, int]]) -> None:
        self._zeroed = {t for t, _ in pairs[:self.settings.zero_steps]}

    def gamma(self, scale: float) -> float:
        return scale

    def plain(self, scale: float) -> str | None:
        return "cond" if scale == 1 and self.settings.zero_steps == 0 else None

    def mode(self, scales: Sequence[float], w: float) -> StepMode:
        values = {effective(s, w) for s in scales}
        return StepMode(("cond",) if values == {1.0} else ("cond", "uncond"), False)

    def step_mode(self, t: int, scales: Sequence[float], w: float) -> StepMode:
        return StepMode((), False) if t in self._zeroed else self.mode(scales, w)

    def combine(self, p: Predictions, scale: Tensor, w: Tensor) -> Guided:
        if p.cond is None:  # a zeroed step: u = 0
            return Guided(velocity_to_eps(p.x, torch.zeros_like(p.x), p.a_t, p.sigma_t))
        if p.uncond is None:
            return Guided(p.cond)
        lam = effective(scale, w)
        no_zero = torch.zeros((), dtype=torch.bool, device=p.x.device)
        guided = zero_star_eps(p.x, p.cond, p.uncond, p.a_t, p.sigma_t, lam, no_zero)
        # A row at w = 1 is ε_c itself (not its round trip through u), as in a batch that evaluates only ε_c.
        return Guided(torch.where((lam == 1).view(-1, 1, 1, 1), p.cond, guided))
