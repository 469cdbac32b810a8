"""Samplers on a respaced subset of the training timesteps: DDIM (η) and DDPM ancestral.

One loop serves every guidance method: the GuidedDenoiser returns the rule's guided ε and its extra score
term, and the sampler applies that term in the form its update needs (ε-form for DDIM via
`condition_score`, mean-form for ancestral via `condition_mean`). Samplers know no method names.

Every per-step scalar (timestep, ᾱ terms, σ, guidance weight, noise stream) is computed on the host
before the loop and handed to the step as one row of a device tensor. A step is therefore pure
tensor code with static shapes: the loop never waits on the device, and `compile=` turns each step
(network, CFG combination, classifier forward + backward, update) into one compiled graph, with CUDA
graphs under mode "reduce-overhead".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .denoiser import GuidedDenoiser
from .guidance import StepMode, condition_mean, condition_score
from .noise import keyed_normal
from .options import COMPILE_MODES, SAMPLERS
from .schedule import respaced_timesteps

# Columns of the per-step table: t, guidance weight, noise stream, √ᾱ_t, √(1−ᾱ_t), then the update's
# own coefficients (DDIM: √ᾱ_s, √(1−ᾱ_s−σ²), σ; DDPM: x̂0 and x_t posterior weights, √var, CG weight).
_T, _W, _STREAM, _A_T, _B_T, _C0, _C1, _C2, _C3 = range(9)


def _ddim_row(ab_t: float, ab_s: float, eta: float) -> list[float]:
    sigma = eta * math.sqrt(max((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s), 0.0))
    return [math.sqrt(ab_s), math.sqrt(max(1 - ab_s - sigma**2, 0.0)), sigma, 0.0]


def _ddpm_row(ab_t: float, ab_s: float, last: bool) -> list[float]:
    alpha_ts = ab_t / ab_s
    beta_ts = 1 - alpha_ts
    var = beta_ts * (1 - ab_s) / (1 - ab_t)
    c_x0 = math.sqrt(ab_s) * beta_ts / (1 - ab_t)
    c_xt = math.sqrt(alpha_ts) * (1 - ab_s) / (1 - ab_t)
    # At the last step the posterior variance is 0; like guided-diffusion's clipped log-variance,
    # the mean-form classifier term falls back to β there so guidance still acts.
    return [c_x0, c_xt, math.sqrt(var), beta_ts if last else var]  # var = 0 at the last step: no noise


def step_table(den: GuidedDenoiser, pairs: list[tuple[int, int]], sampler: str, eta: float,
               device: torch.device) -> Tensor:
    """(steps, 9) float32 table of every per-step scalar, computed in float64 on the host."""
    rows = []
    for i, (t, s) in enumerate(pairs):
        ab_t, ab_s = den.schedule.alpha_bar(t), den.schedule.alpha_bar(s)
        own = _ddim_row(ab_t, ab_s, eta) if sampler == "ddim" else _ddpm_row(ab_t, ab_s, s < 0)
        rows.append([t, den.weight(t), i + 1, math.sqrt(ab_t), math.sqrt(1 - ab_t), *own])
    return torch.tensor(rows, dtype=torch.float64).to(device, torch.float32)


def _unpack(x: Tensor, row: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = row[_T].long().expand(len(x))  # exact: indices < 2^24
    return t, row[_W], row[_STREAM].long()


def _x0_from_eps(x: Tensor, eps: Tensor, row: Tensor) -> Tensor:
    return (x - row[_B_T] * eps) / row[_A_T]


def ddim_step(den: GuidedDenoiser, x: Tensor, row: Tensor, keys: Tensor, mode: StepMode, noisy: bool,
              clip_x0: bool) -> Tensor:
    """x_t → x_s (s < t) with DDIM (Song et al. 2021); η=1 is DDPM-like. CG in ε-form."""
    t, w, stream = _unpack(x, row)
    guided = den(x, t, w, mode)
    eps = condition_score(guided.eps, guided.score, row[_B_T])
    x0 = _x0_from_eps(x, eps, row)
    if clip_x0:
        # Recompute ε from the clipped x_0, else large guidance scales collapse (docs/conventions.md).
        x0 = x0.clamp(-1, 1)
        eps = (x - row[_A_T] * x0) / row[_B_T]
    x_prev = row[_C0] * x0 + row[_C1] * eps
    if noisy:
        x_prev = x_prev + row[_C2] * keyed_normal(keys, stream, tuple(x.shape[1:]), x.dtype)
    return x_prev


def ddpm_step(den: GuidedDenoiser, x: Tensor, row: Tensor, keys: Tensor, mode: StepMode, noisy: bool,
              clip_x0: bool) -> Tensor:
    """x_t → x_s by the posterior q(x_s | x_t, x̂_0) of the (respaced) chain, fixed-small variance. CG in mean-form."""
    t, w, stream = _unpack(x, row)
    guided = den(x, t, w, mode)
    x0 = _x0_from_eps(x, guided.eps, row)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    mean = condition_mean(row[_C0] * x0 + row[_C1] * x, guided.score, row[_C3])
    if noisy:
        mean = mean + row[_C2] * keyed_normal(keys, stream, tuple(x.shape[1:]), x.dtype)
    return mean


_STEPS = {"ddim": ddim_step, "ddpm": ddpm_step}


@functools.cache
def compiled_step(sampler: str, mode: str = "default", backend: str | Callable = "inductor") -> Callable:
    """One torch.compile'd step per (sampler, mode, backend), shared by every call (compiled once).

    dynamic=False: a sweep has at most two batch sizes (full chunks and the last one), and static
    shapes are what CUDA graphs need.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {COMPILE_MODES} (or None for eager)")
    if backend != "inductor":
        return torch.compile(_STEPS[sampler], backend=backend, dynamic=False)
    return torch.compile(_STEPS[sampler], mode=None if mode == "default" else mode, dynamic=False)


@torch.no_grad()
def sample(den: GuidedDenoiser, shape: tuple[int, ...], keys: Tensor, steps: int, sampler: str = "ddim",
           eta: float = 0.0, clip_x0: bool = True, progress: bool = False, desc: str = "sampling",
           compile: str | None = None, compile_backend: str | Callable = "inductor",
           callback: Callable[[int], None] | None = None) -> Tensor:
    """Draw len(keys) samples of `shape` (C, H, W); sample i starts from the noise of keys[i].

    With clip_x0 the data range is [-1, 1]: predicted x_0 is clipped each step and the result too.
    `compile` is a torch.compile mode (None = eager; "reduce-overhead" adds CUDA graphs on GPUs).
    `callback(i)` runs on the host after step i (progress bars; it must not read the device).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    step = _STEPS[sampler] if compile is None else compiled_step(sampler, compile, compile_backend)
    cuda_graphs = compile is not None and "reduce-overhead" in compile and keys.is_cuda
    timesteps = respaced_timesteps(den.schedule.timesteps, steps)
    pairs = list(zip(timesteps, timesteps[1:] + [-1]))
    table = step_table(den, pairs, sampler, eta, keys.device)
    # The last step's noise coefficient is 0 in the table; drawing it anyway keeps one graph for all steps.
    noisy = sampler == "ddpm" or eta > 0
    x = keyed_normal(keys, 0, tuple(shape))
    for i, (t, _) in enumerate(tqdm(pairs, desc=desc, disable=not progress, leave=False)):
        mode = den.mode(t)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: earlier graph outputs may be reused
        x = step(den, x, table[i], keys, mode, noisy, clip_x0)
        if cuda_graphs:
            # Own the state: a graph output fed back as the next input can be overwritten by that very
            # replay (pytorch#170604, #184102). One copy of the batch per step, negligible next to the UNet.
            x = x.clone()
        if callback is not None:
            callback(i)
    return x.clamp(-1, 1) if clip_x0 else x
