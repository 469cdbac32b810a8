"""FBG, feedback guidance (Koulischer et al., NeurIPS 2025, arXiv 2506.06085) as pure tensor maths.

Model: p_learned(x|c) = π·p(x|c) + (1 − π)·p(x). Each sample tracks L = log p(c|x_t) (relative to the prior), and
guides with λ = e^L/(e^L − (1 − π)), D = D_u + λ·(D_c − D_u). Reference: FelixKoulischer/FBG_using_edm2,
generate_images_FBG.py (edm_sampler, update_log_posterior, delta_from_t0, Temp_from_t1), and Algorithm 1:
  * L = 0 at x_T (Alg. 1; `log_posterior = zeros`, l.134), so λ_T = 1/π;
  * step i guides with the L of step i, takes x_{i+1}, then updates L with the posterior means
    μ_c, μ_u = q(x_{i+1} | x_i, D_c(x_i) / D_u(x_i)) of the *unguided* branches at x_i (l.136-190):
    L ← clip(L − τ/(2σ̃²)·(‖x_{i+1} − μ_c‖² − ‖x_{i+1} − μ_u‖²) + δ, [L_min, L_max]), norms *summed* over all
    pixels (l.117-118), σ̃² the DDPM posterior variance of that transition (l.111), L_max = 3 (l.123);
  * L_min = log((1 − π)·λ_max/(λ_max − 1)) is exactly λ = λ_max (l.95);
  * δ, τ from t0, t1 as fractions of the N sampling steps, time running 1 (noise) → 0 (data) (l.290-317):
    δ = log((1 − π)·3/2)/((1 − t0)·N): with no feedback L falls by |δ| a step and λ reaches 3 after (1 − t0)·N steps;
    τ = 2·σ̃²(t1)·|δ|/10, σ̃²(t1) linearly interpolated at position t1·N of the per-step variances counted from
    the data end, so the feedback coefficient τ/(2σ̃²) is |δ|/10 at t1.
The reference prints both rounded to 4 decimals (l.295, 308); we keep full precision.

Mapping onto our discrete VP steps (t → s): the ratio ‖·‖²/σ̃² is unchanged by rescaling x, and x/√ᾱ is exactly
EDM's VE process at σ = √((1 − ᾱ)/ᾱ) with the same Gaussian posterior, so the update uses our VP posterior mean
and variance directly. τ, which the reference calibrates on *VE* variances, is computed from σ̃²/ᾱ_s (the VE
variance): the whole recursion is then the reference's, run on the EDM σ grid equivalent to our steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..guidance import Guided, Predictions, StepMode
from ..options import OptionError, check_finite
from ..schedule import NoiseSchedule, posterior_coefficients, respaced_timesteps
from .base import GuidanceRule


@dataclass(frozen=True)
class FeedbackSettings:
    """FBG hyperparameters (defaults: the authors' DinoV2-optimal EDM2 run, README example 1; the script's own
    CLI defaults are π 0.5, t0 0.5, t1 0.35, λ_max 2).

    Args:
        pi: π, the weight of the true conditional in the learned one (guidance grows as 1 − π shrinks).
        t0: the time (1 = noise, 0 = data, a fraction of the sampling steps) by which a sample with no feedback
            reaches λ = lambda_ref.
        t1: the time at which the feedback coefficient τ/(2σ̃²) equals |δ|/t1_ratio.
        lambda_max: the largest guidance scale (sets L_min).
        l_max: the upper clip on L (reference: 3, λ ≈ 1 there).
        lambda_ref, t1_ratio: the reference's fixed 3 and 10 in delta_from_t0 / Temp_from_t1.
        delta, tau: give δ, τ directly instead (the reference's --offset / --temp); null = derive them.
    """

    pi: float = 0.999
    t0: float = 0.556
    t1: float = 0.429
    lambda_max: float = 10.0
    l_max: float = 3.0
    lambda_ref: float = 3.0
    t1_ratio: float = 10.0
    delta: float | None = None
    tau: float | None = None

    def check(self, prefix: str = "") -> None:
        check_finite(prefix, pi=self.pi, t0=self.t0, t1=self.t1, lambda_max=self.lambda_max, l_max=self.l_max,
                     lambda_ref=self.lambda_ref, t1_ratio=self.t1_ratio)
        if not 0.0 < self.pi < 1.0:
            raise OptionError(f"{prefix}pi", f"π = {self.pi} is outside (0, 1)", "use e.g. 0.999")
        for name, value in (("t0", self.t0), ("t1", self.t1)):
            if not 0.0 <= value < 1.0:
                raise OptionError(f"{prefix}{name}", f"{value} is outside [0, 1)", "give a fraction of the steps")
        for name, value in (("lambda_max", self.lambda_max), ("lambda_ref", self.lambda_ref)):
            if not value > 1.0:
                raise OptionError(f"{prefix}{name}", f"{value} is not above 1", "give a guidance scale > 1")
        if not self.t1_ratio > 0.0:
            raise OptionError(f"{prefix}t1_ratio", f"{self.t1_ratio} is not positive", "use 10 (the reference)")
        if self.tau is not None and not (math.isfinite(self.tau) and self.tau >= 0):
            raise OptionError(f"{prefix}tau", f"τ = {self.tau} is not a finite number >= 0", "give τ >= 0 or null")
        if self.delta is not None and not math.isfinite(self.delta):
            raise OptionError(f"{prefix}delta", f"δ = {self.delta} is not finite", "give a finite δ or null")

    @property
    def l_min(self) -> float:
        """log((1 − π)·λ_max/(λ_max − 1)): the L at which λ = λ_max."""
        return math.log((1.0 - self.pi) * self.lambda_max / (self.lambda_max - 1.0))


@dataclass(frozen=True)
class FeedbackConstants:
    """The per-run constants of the L recursion (host floats, fixed before the loop)."""

    delta: float
    tau: float
    l_min: float
    l_max: float


def fbg_constants(settings: FeedbackSettings, ab_pairs: Sequence[tuple[float, float]]) -> FeedbackConstants:
    """δ, τ, L_min, L_max for a sampling run whose steps go from ᾱ_t to ᾱ_s, in order (ᾱ_s = 1 at the data end)."""
    settings.check()
    n = len(ab_pairs)
    if n < 2:
        raise OptionError("sweep.sampling.steps", f"FBG needs at least 2 sampling steps, got {n}",
                          "sample with more steps")
    delta = settings.delta
    if delta is None:
        ab_ref = (1.0 - settings.pi) * settings.lambda_ref / (settings.lambda_ref - 1.0)
        delta = math.log(ab_ref) / ((1.0 - settings.t0) * n)
    tau = settings.tau
    if tau is None:
        # VE variances (σ̃²/ᾱ_s), indexed from the data end as the reference does: k = 0 is the last step.
        var_ve = [posterior_coefficients(ab_t, ab_s)[2] / ab_s for ab_t, ab_s in reversed(ab_pairs)]
        pos = settings.t1 * n
        k = min(math.floor(pos), n - 2)  # the reference would index past the end for t1·N >= N − 1
        frac = pos - k
        tau = abs(2.0 * ((1.0 - frac) * var_ve[k] + frac * var_ve[k + 1]) / settings.t1_ratio * delta)
    return FeedbackConstants(delta=delta, tau=tau, l_min=settings.l_min, l_max=settings.l_max)


def fbg_schedule_constants(settings: FeedbackSettings, schedule: NoiseSchedule, steps: int) -> FeedbackConstants:
    """`fbg_constants` on the respaced steps a sampler walks (N = the steps actually taken, after de-duplication)."""
    ts = respaced_timesteps(schedule.timesteps, steps)
    pairs = [(schedule.alpha_bar(t), schedule.alpha_bar(s)) for t, s in zip(ts, ts[1:] + [-1])]
    return fbg_constants(settings, pairs)


def fbg_lambda(log_posterior: Tensor, pi: float) -> Tensor:
    """λ = e^L/(e^L − (1 − π)), written as 1/(1 − (1 − π)·e^{−L}): no ratio of two large e^L terms.

    λ >= 1 and it falls with L; on [L_min, L_max] it lies in [λ(L_max), λ_max]."""
    return 1.0 / (1.0 - (1.0 - pi) * torch.exp(-log_posterior))


def fbg_combine(eps_c: Tensor, eps_u: Tensor, lam: Tensor) -> Tensor:
    """ε_u + λ·(ε_c − ε_u) per sample (λ: (B,)). Equal to D_u + λ(D_c − D_u) in x̂0 and to the paper's mix of
    posterior means: each map from ε is affine with weights (1 − λ, λ) summing to 1."""
    return eps_u + lam.to(eps_c.dtype).view(-1, *([1] * (eps_c.ndim - 1))) * (eps_c - eps_u)


def posterior_mean(x_t: Tensor, x0: Tensor, ab_t: Tensor | float, ab_s: Tensor | float) -> tuple[Tensor, Tensor]:
    """Mean and variance of the DDPM posterior q(x_s | x_t, x̂0) between ᾱ_t and ᾱ_s (s < t), as the ddpm sampler:
    μ = √ᾱ_s·β/(1 − ᾱ_t)·x̂0 + √(ᾱ_t/ᾱ_s)·(1 − ᾱ_s)/(1 − ᾱ_t)·x_t, σ̃² = β·(1 − ᾱ_s)/(1 − ᾱ_t), β = 1 − ᾱ_t/ᾱ_s.

    ᾱ's are floats or tensors shaped to broadcast (0-d or (B, 1, ..., 1)); σ̃² has their shape (0 at ᾱ_s = 1)."""
    ab_t = torch.as_tensor(ab_t, dtype=x_t.dtype, device=x_t.device)
    ab_s = torch.as_tensor(ab_s, dtype=x_t.dtype, device=x_t.device)
    beta = 1.0 - ab_t / ab_s
    mean = ab_s.sqrt() * beta / (1.0 - ab_t) * x0 + (ab_t / ab_s).sqrt() * (1.0 - ab_s) / (1.0 - ab_t) * x_t
    return mean, beta * (1.0 - ab_s) / (1.0 - ab_t)


def fbg_log_posterior_update(log_posterior: Tensor, x_next: Tensor, mu_c: Tensor, mu_u: Tensor,
                             var: Tensor | float, delta: float | Tensor, tau: float | Tensor,
                             l_min: float | Tensor, l_max: float | Tensor) -> Tensor:
    """L ← clip(L − τ/(2σ̃²)·(‖x_next − μ_c‖² − ‖x_next − μ_u‖²) + δ, [L_min, L_max]) per sample (B,).

    `var` (σ̃² of the transition, 0-d, (B,) or (B, 1, ..., 1)) <= 0 leaves L unchanged: that is the step into the
    data end, whose update the reference computes as ±inf/nan and never uses, and it lets a rule start from
    zero-filled memory (no transition yet, so L stays at 0 as Algorithm 1 starts). Tensor-only, so it compiles.
    """
    acc = torch.promote_types(x_next.dtype, torch.float32)
    x, mc, mu = x_next.to(acc), mu_c.to(acc), mu_u.to(acc)
    # ‖x − μ_c‖² − ‖x − μ_u‖² as one sum of (μ_u − μ_c)(2x − μ_c − μ_u): no cancellation of two large sums.
    diff = ((mu - mc) * (2.0 * x - mc - mu)).flatten(1).sum(1).to(log_posterior.dtype)
    var = torch.as_tensor(var, dtype=log_posterior.dtype, device=log_posterior.device)
    var = var.reshape(-1) if var.ndim else var
    live = var > 0
    step = log_posterior - tau / (2.0 * torch.where(live, var, torch.ones_like(var))) * diff + delta
    lo, hi = (torch.as_tensor(v, dtype=step.dtype, device=step.device) for v in (l_min, l_max))  # floats or (B,)
    return torch.where(live, torch.minimum(torch.maximum(step, lo), hi), log_posterior)


class FeedbackGuidance(GuidanceRule):
    """FBG (Koulischer et al., NeurIPS 2025): a per-sample, state-dependent CFG scale λ_t = e^L/(e^L − (1 − π)),
    L a running estimate of log p(c|x_t) updated every step from how much better the conditional branch's
    posterior mean predicted the step actually taken than the unconditional one's (module docstring). The swept
    scale is λ_max, the most guidance a sample may get (1 = the conditional model); π, t0, t1 are options.
    L rides in the loop state like APG's momentum; cells record the mean λ per step (`guidance_trace`). Both
    branches are evaluated at every step of a guided cell (the feedback needs them even where λ ≈ 1).
    γ = λ_max (an upper bound: the λ actually used is in the trace)."""

    name, label, color, marker = "fbg", "FBG (feedback guidance)", "tab:red", "X"
    default_scales = (1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
    scale_axis = "FBG λ_max  (1 = conditional model)"
    gamma_text, cost_text = "FBG γ = λ_max (the scale's upper bound)", "2 (one batched forward of 2B)"
    Options = FeedbackSettings
    scale_range = (1.0, math.inf)

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.constants: FeedbackConstants | None = None

    def prepare(self, schedule: NoiseSchedule, pairs: Sequence[tuple[int, int]]) -> None:
        self.constants = fbg_constants(self.settings, [(schedule.alpha_bar(t), schedule.alpha_bar(s))
                                                       for t, s in pairs])

    def gamma(self, scale: float) -> float:
        return scale

    def plain(self, scale: float) -> str | None:
        return "cond" if scale == 1 else None

    def mode(self, scales: Sequence[float], w: float) -> StepMode:
        return StepMode(("cond",) if set(scales) == {1.0} else ("cond", "uncond"), False)

    def initial_memory(self, x: Tensor) -> dict[str, Tensor]:
        b = len(x)
        # L = 0 at x_T (Algorithm 1); var = 0: no transition yet, so the first update leaves L as it is.
        return {"log_posterior": torch.zeros(b, device=x.device), "mu_c": torch.zeros_like(x),
                "mu_u": torch.zeros_like(x), "var": torch.zeros((), device=x.device),
                "trace_lambda": torch.ones(b, device=x.device)}

    def combine(self, p: Predictions, scale: Tensor, w: Tensor) -> Guided:
        if p.uncond is None:
            return Guided(p.cond)
        c, m, s = self.constants, p.memory, self.settings
        assert c is not None and p.posterior is not None, "sample() prepares the rule and passes the posterior"
        lam_max = scale.clamp_min(1.0 + 1e-6)  # rows at λ_max = 1 are kept at λ = 1 below
        l_min = torch.log((1.0 - s.pi) * lam_max / (lam_max - 1.0))
        log_post = fbg_log_posterior_update(m["log_posterior"], p.x, m["mu_c"], m["mu_u"], m["var"], c.delta, c.tau,
                                            l_min, c.l_max)
        lam = torch.where(scale == 1, torch.ones_like(scale), fbg_lambda(log_post, s.pi).clamp(1.0, None))
        lam = torch.minimum(lam, scale)
        lam_w = 1 + (lam - 1) * w
        # Around ε_c, so a row at λ = 1 is ε_c exactly (as in a batch evaluating only the conditional branch).
        guided = p.cond + (lam_w - 1).view(-1, 1, 1, 1) * (p.cond - p.uncond)
        c_x0, c_xt, var = p.posterior  # μ of q(x_s | x_t, x̂0) from the *unguided* branches (the reference)
        memory = {"log_posterior": log_post, "mu_c": c_x0 * p.x0(p.cond) + c_xt * p.x,
                  "mu_u": c_x0 * p.x0(p.uncond) + c_xt * p.x, "var": var, "trace_lambda": lam_w}
        return Guided(guided, memory=memory)
