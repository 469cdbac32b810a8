"""Samplers on a respaced subset of the training timesteps: DDIM (η) and DDPM ancestral.

One loop serves every guidance method: the GuidedDenoiser supplies ε (CFG already applied) and,
when classifier guidance is on, the scaled gradient s·∇log p(y|x_t); the sampler applies it in
the form that matches its update (ε-form for DDIM, mean-form for ancestral).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .guidance import GuidedDenoiser
from .noise import keyed_normal
from .schedule import respaced_timesteps

SAMPLERS = ("ddim", "ddpm")


def _x0_from_eps(x: Tensor, eps: Tensor, ab: float) -> Tensor:
    return (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)


def ddim_step(den: GuidedDenoiser, x: Tensor, t: int, s: int, eta: float, keys: Tensor, stream: int,
              clip_x0: bool) -> Tensor:
    """x_t → x_s (s < t, s = -1 is the end) with DDIM (Song et al. 2021); η=1 is DDPM-like."""
    ab_t, ab_s = den.schedule.alpha_bar(t), den.schedule.alpha_bar(s)
    eps = den.eps(x, t)
    g = den.grad(x, t)
    if g is not None:
        eps = eps - math.sqrt(1 - ab_t) * g
    x0 = _x0_from_eps(x, eps, ab_t)
    if clip_x0:
        # Recompute ε from the clipped x_0, else large guidance scales collapse (DESIGN.md).
        x0 = x0.clamp(-1, 1)
        eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
    sigma = eta * math.sqrt(max((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s), 0.0))
    x_prev = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma**2, 0.0)) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * keyed_normal(keys, stream, tuple(x.shape[1:]), x.dtype)
    return x_prev


def ddpm_step(den: GuidedDenoiser, x: Tensor, t: int, s: int, keys: Tensor, stream: int,
              clip_x0: bool) -> Tensor:
    """x_t → x_s by the posterior q(x_s | x_t, x̂_0) of the (respaced) chain, fixed-small variance."""
    ab_t, ab_s = den.schedule.alpha_bar(t), den.schedule.alpha_bar(s)
    alpha_ts = ab_t / ab_s
    beta_ts = 1 - alpha_ts
    x0 = _x0_from_eps(x, den.eps(x, t), ab_t)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    mean = (math.sqrt(ab_s) * beta_ts / (1 - ab_t)) * x0 + (math.sqrt(alpha_ts) * (1 - ab_s) / (1 - ab_t)) * x
    var = beta_ts * (1 - ab_s) / (1 - ab_t)
    g = den.grad(x, t)
    if g is not None:
        # At the last step the posterior variance is 0; like guided-diffusion's clipped
        # log-variance, fall back to β so guidance still acts there.
        mean = mean + (var if s >= 0 else beta_ts) * g
    if s < 0:
        return mean
    return mean + math.sqrt(var) * keyed_normal(keys, stream, tuple(x.shape[1:]), x.dtype)


@torch.no_grad()
def sample(den: GuidedDenoiser, shape: tuple[int, ...], keys: Tensor, steps: int, sampler: str = "ddim",
           eta: float = 0.0, clip_x0: bool = True, progress: bool = False, desc: str = "sampling") -> Tensor:
    """Draw len(keys) samples of `shape` (C, H, W); sample i starts from the noise of keys[i].

    With clip_x0 the data range is [-1, 1]: predicted x_0 is clipped each step and the result too.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    timesteps = respaced_timesteps(den.schedule.timesteps, steps)
    x = keyed_normal(keys, 0, tuple(shape))
    pairs = list(zip(timesteps, timesteps[1:] + [-1]))
    for i, (t, s) in enumerate(tqdm(pairs, desc=desc, disable=not progress, leave=False)):
        if sampler == "ddim":
            x = ddim_step(den, x, t, s, eta, keys, i + 1, clip_x0)
        else:
            x = ddpm_step(den, x, t, s, keys, i + 1, clip_x0)
    return x.clamp(-1, 1) if clip_x0 else x
