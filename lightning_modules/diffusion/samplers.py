"""Samplers on a respaced subset of the training timesteps: DDIM (η), DDPM ancestral and DPM-Solver++(2M).

One loop serves every guidance method: the GuidedDenoiser returns the rule's guided ε and its extra score
term, and the sampler applies that term in the form its update needs (ε-form for DDIM and DPM-Solver++ via
`condition_score`, mean-form for ancestral via `condition_mean`). Samplers know no method names; a rule
may also hand back the ε to renoise with (CFG++): every update then starts from x_t' = √ᾱ_t·x̂0 + σ_t·ε_renoise,
the point whose noise is that ε (for DDIM exactly its direction term).

Every per-step scalar (timestep, ᾱ terms, σ, guidance weight, noise stream, solver weights) is computed on
the host before the loop and handed to the step as one row of a device tensor. A step is therefore pure
tensor code with static shapes: the loop never waits on the device, and `compile=` turns each step
(network, guidance, classifier forward + backward, update) into one compiled graph, with CUDA graphs under
mode "reduce-overhead". The loop state is (x, previous x̂0, the rule's memory, thresholded steps).

x̂0 handling, per step: `clip_x0` clips to [-1, 1]; `threshold = p` is Imagen's dynamic thresholding
(s = max(1, quantile_p |x̂0|) per sample, x̂0 ← clip(x̂0, −s, s)/s). Either way ε is recomputed from the
new x̂0 before the update, so large guidance scales do not collapse for a sampler-side reason.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .denoiser import GuidedDenoiser
from .guidance import StepMode, condition_mean, condition_score
from .noise import keyed_normal
from .options import COMPILE_MODES, SAMPLERS, SamplerOptions
from .schedule import posterior_coefficients, respaced_timesteps

# x_t, the previous step's x̂0 (DPM-Solver++), the rule's memory (APG momentum, FBG's posterior, ...),
# thresholded steps (B,)
State = tuple[Tensor, Tensor, dict[str, Tensor], Tensor]
# Graphs per step function: (methods × step kinds × batch shapes) of a whole sweep; Dynamo's default of 8 would
# silently fall back to eager for the later methods of a many-method sweep.
RECOMPILE_LIMIT = 64

# Columns every sampler's per-step table has: t, guidance weight, noise stream, step index, √ᾱ_t, √(1−ᾱ_t), and
# the DDPM posterior q(x_s | x_t, x̂0) of the step's transition (x̂0 weight, x_t weight, variance) for rules
# that follow the trajectory. Each sampler adds its own update coefficients by name (`Sampler.coefficients`).
COMMON = ("t", "w", "stream", "step", "a_t", "b_t", "post_x0", "post_xt", "post_var")


def _ddim_row(ab_t: float, ab_s: float, ab_prev: float | None, i: int, n: int, options: SamplerOptions) -> list[float]:
    sigma = options.eta * math.sqrt(max((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s), 0.0))
    return [math.sqrt(ab_s), math.sqrt(max(1 - ab_s - sigma**2, 0.0)), sigma]


def _ddpm_row(ab_t: float, ab_s: float, ab_prev: float | None, i: int, n: int, options: SamplerOptions) -> list[float]:
    c_x0, c_xt, var = posterior_coefficients(ab_t, ab_s)
    # At the last step the posterior variance is 0; like guided-diffusion's clipped log-variance,
    # the mean-form classifier term falls back to β there so guidance still acts.
    return [c_x0, c_xt, math.sqrt(var), 1 - ab_t / ab_s if i == n - 1 else var]  # var = 0 at the last step


def _lambda(ab: float) -> float:
    """λ = log(√ᾱ / √(1−ᾱ)), the half log-SNR; +inf at the data end."""
    return math.inf if ab >= 1.0 else 0.5 * math.log(ab / (1.0 - ab))


def _dpmpp_row(ab_t: float, ab_s: float, ab_prev: float | None, i: int, n: int,
               options: SamplerOptions) -> list[float]:
    """DPM-Solver++ (Lu et al. 2022) in data-prediction form, x_s = (σ_s/σ_t)·x_t + √ᾱ_s·(1 − e^{−h})·D with
    h = λ_s − λ_t; 2M: D = (1 + 1/2r)·D_t − (1/2r)·D_prev, r = h_prev/h. First order (= DDIM η=0) on the
    first step, on the step to the data end (h = ∞) and on the last two steps (three below 15 steps)."""
    if ab_s >= 1.0:  # to the data end: σ_s = 0, e^{−h} = 0, so x_0 = D_t exactly
        return [0.0, 1.0, 1.0, 0.0]
    lam_t, lam_s = _lambda(ab_t), _lambda(ab_s)
    h = lam_s - lam_t
    ratio, c_d = math.sqrt((1 - ab_s) / (1 - ab_t)), math.sqrt(ab_s) * -math.expm1(-h)
    # Lower-order final steps keep few-step guided sampling stable (Lu et al. 2022, §3.3): always into t = 0,
    # where λ jumps (a 2M step there extrapolates far: 1/2r ≫ 1), and the last three below 15 steps.
    if ab_prev is None or i >= n - (3 if n < 15 else 2):
        return [ratio, c_d, 1.0, 0.0]
    r = (lam_t - _lambda(ab_prev)) / h
    return [ratio, c_d, 1.0 + 0.5 / r, -0.5 / r]


def step_table(den: GuidedDenoiser, pairs: list[tuple[int, int]], sampler: Sampler, options: SamplerOptions,
               device: torch.device) -> Tensor:
    """(steps, columns) float32 table of every per-step scalar, computed in float64 on the host."""
    rows = []
    for i, (t, s) in enumerate(pairs):
        ab_t, ab_s = den.schedule.alpha_bar(t), den.schedule.alpha_bar(s)
        ab_prev = den.schedule.alpha_bar(pairs[i - 1][0]) if i > 0 else None
        own = sampler.row(ab_t, ab_s, ab_prev, i, len(pairs), options)
        rows.append([t, den.weight(t), i + 1, i, math.sqrt(ab_t), math.sqrt(1 - ab_t),
                     *posterior_coefficients(ab_t, ab_s), *own])
    return torch.tensor(rows, dtype=torch.float64).to(device, torch.float32)


def _named(row: Tensor, own: tuple[str, ...]) -> dict[str, Tensor]:
    """A table row as {column name: 0-d tensor} (a compiled step traces the lookup away)."""
    return dict(zip((*COMMON, *own), row.unbind()))


def _x0_from_eps(x: Tensor, eps: Tensor, r: dict[str, Tensor]) -> Tensor:
    return (x - r["b_t"] * eps) / r["a_t"]


def _limit_x0(x0: Tensor, clip_x0: bool, threshold: float | None) -> tuple[Tensor, Tensor]:
    """x̂0 clipped or dynamically thresholded, and which samples were thresholded (B,) float."""
    if threshold is not None:
        # Imagen (Saharia et al. 2022): s = max(1, quantile_p |x̂0|) per sample; x̂0 ← clip(x̂0, −s, s)/s.
        q = torch.quantile(x0.abs().flatten(1).float(), threshold, dim=1)
        s = q.clamp_min(1.0).to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s, (q > 1.0).float()
    if clip_x0:
        return x0.clamp(-1, 1), torch.zeros(len(x0), device=x0.device)
    return x0, torch.zeros(len(x0), device=x0.device)


def _renoise_point(x: Tensor, x0: Tensor, guided, r: dict[str, Tensor]) -> Tensor:
    """The point an update starts from: x_t itself, or for a rule with its own renoising ε (CFG++) the point
    √ᾱ_t·x̂0 + σ_t·ε_renoise whose data part is the guided x̂0 and whose noise is that ε. For DDIM this is
    exactly CFG++'s x_s = √ᾱ_s·x̂0 + σ_s·ε_u; ancestral and DPM-Solver++ updates take it for x_t unchanged
    (so their 2M extrapolation stays on the guided x̂0 it integrates)."""
    return x if guided.eps_renoise is None else r["a_t"] * x0 + r["b_t"] * guided.eps_renoise


def _predict(den: GuidedDenoiser, x: Tensor, memory: dict[str, Tensor], r: dict[str, Tensor], keys: Tensor,
             mode: StepMode):
    """The denoiser at this step's row: (guided prediction, noise stream)."""
    t, stream = r["t"].long().expand(len(x)), r["stream"].long()  # exact: indices < 2^24
    guided = den(x, t, r["w"], mode, memory, r["a_t"], r["b_t"], keys=keys, stream=r["step"].long(),
                 posterior=(r["post_x0"], r["post_xt"], r["post_var"]))
    return guided, stream, memory if guided.memory is None else guided.memory


def _eps_form_x0(x: Tensor, guided, r: dict[str, Tensor], clip_x0: bool, threshold: float | None):
    """Classifier guidance in ε-form, then the limited x̂0: (ε, x̂0, thresholded samples)."""
    eps = condition_score(guided.eps, guided.score, r["b_t"])
    x0, hit = _limit_x0(_x0_from_eps(x, eps, r), clip_x0, threshold)
    return eps, x0, hit


def ddim_step(den: GuidedDenoiser, state: State, row: Tensor, keys: Tensor, mode: StepMode, noisy: bool,
              clip_x0: bool, threshold: float | None) -> State:
    """x_t → x_s (s < t) with DDIM (Song et al. 2021); η=1 is DDPM-like. CG in ε-form."""
    x, d_prev, memory, count = state
    r = _named(row, DDIM.coefficients)
    guided, stream, memory = _predict(den, x, memory, r, keys, mode)
    eps, x0, hit = _eps_form_x0(x, guided, r, clip_x0, threshold)
    if clip_x0 or threshold is not None:
        eps = (x - r["a_t"] * x0) / r["b_t"]  # recompute ε from the limited x̂0 (docs/conventions.md)
    direction = eps if guided.eps_renoise is None else guided.eps_renoise  # CFG++ renoises with ε_u
    x_prev = r["c_x0"] * x0 + r["c_dir"] * direction
    if noisy:
        x_prev = x_prev + r["sigma"] * keyed_normal(keys, stream, tuple(x.shape[1:]), x.dtype)
    return x_prev, d_prev, memory, count + hit


def ddpm_step(den: GuidedDenoiser, state: State, row: Tensor, keys: Tensor, mode: StepMode, noisy: bool,
              clip_x0: bool, threshold: float | None) -> State:
    """x_t → x_s by the posterior q(x_s | x_t, x̂_0) of the (respaced) chain, fixed-small variance. CG in mean-form."""
    x, d_prev, memory, count = state
    r = _named(row, DDPM.coefficients)
    guided, stream, memory = _predict(den, x, memory, r, keys, mode)
    x0, hit = _limit_x0(_x0_from_eps(x, guided.eps, r), clip_x0, threshold)
    mean = condition_mean(r["c_x0"] * x0 + r["c_xt"] * _renoise_point(x, x0, guided, r), guided.score, r["cg_var"])
    if noisy:
        mean = mean + r["std"] * keyed_normal(keys, stream, tuple(x.shape[1:]), x.dtype)
    return mean, d_prev, memory, count + hit


def dpmpp_2m_step(den: GuidedDenoiser, state: State, row: Tensor, keys: Tensor, mode: StepMode, noisy: bool,
                  clip_x0: bool, threshold: float | None) -> State:
    """DPM-Solver++(2M): a multistep update on the data prediction D = x̂0 (limited before use). CG in ε-form."""
    x, d_prev, memory, count = state
    r = _named(row, DPMPP_2M.coefficients)
    guided, _, memory = _predict(den, x, memory, r, keys, mode)
    _, d, hit = _eps_form_x0(x, guided, r, clip_x0, threshold)
    x_next = r["ratio"] * _renoise_point(x, d, guided, r) + r["c_d"] * (r["w_cur"] * d + r["w_prev"] * d_prev)
    return x_next, d, memory, count + hit


@dataclass(frozen=True)
class Sampler:
    """One sampler: its own table columns and the function computing them, its step, whether it draws noise,
    and the form in which it applies a classifier's score term (guided-diffusion's condition_score ε-form or
    condition_mean mean-form). Every sampler supports every rule: ε-guidance, a score term, CFG++'s renoising ε
    and a rule's memory."""

    name: str
    coefficients: tuple[str, ...]
    row: Callable[..., list[float]]
    step: Callable[..., State]
    draws_noise: Callable[[SamplerOptions], bool]
    score_form: str


DDIM = Sampler("ddim", ("c_x0", "c_dir", "sigma"), _ddim_row, ddim_step, lambda o: o.eta > 0, "eps")
DDPM = Sampler("ddpm", ("c_x0", "c_xt", "std", "cg_var"), _ddpm_row, ddpm_step, lambda o: True, "mean")
DPMPP_2M = Sampler("dpmpp_2m", ("ratio", "c_d", "w_cur", "w_prev"), _dpmpp_row, dpmpp_2m_step, lambda o: False, "eps")
SAMPLER_RECORDS = {s.name: s for s in (DDIM, DDPM, DPMPP_2M)}
assert tuple(SAMPLER_RECORDS) == SAMPLERS, "options.SAMPLERS names every sampler record"


@functools.cache
def compiled_step(sampler: str, mode: str = "default", backend: str | Callable = "inductor") -> Callable:
    """One torch.compile'd step per (sampler, mode, backend), shared by every call (compiled once).

    dynamic=False: a sweep has at most two batch sizes (full chunks and the last one), and static
    shapes are what CUDA graphs need.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {COMPILE_MODES} (or None for eager)")
    if backend != "inductor":
        return torch.compile(SAMPLER_RECORDS[sampler].step, backend=backend, dynamic=False)
    return torch.compile(SAMPLER_RECORDS[sampler].step, mode=None if mode == "default" else mode, dynamic=False)


@torch.no_grad()
def sample(den: GuidedDenoiser, shape: tuple[int, ...], keys: Tensor, options: SamplerOptions, *,
           callback: Callable[[int], None] | None = None, stats: dict | None = None, progress: bool = False,
           desc: str = "sampling", compile_backend: str | Callable = "inductor") -> Tensor:
    """Draw len(keys) samples of `shape` (C, H, W); sample i starts from the noise of keys[i].

    `options` travel whole (sampler, steps, eta, clip_x0, threshold, compile; see SamplerOptions), so no caller
    can drop one, and are checked against the schedule first. With clip_x0 the data range is [-1, 1]: predicted
    x_0 is clipped each step and the result too; `threshold` is dynamic thresholding's quantile p instead of the
    static clip. `compile` is a torch.compile mode (None = eager; "reduce-overhead" adds CUDA graphs on GPUs).
    `callback(i)` runs on the host after step i (progress bars; it must not read the device); with a `stats`
    dict, its "thresholded_steps" gets the number of steps each sample was thresholded at (a device tensor).
    """
    options.check(den.schedule.timesteps)
    record = SAMPLER_RECORDS[options.sampler]
    step = record.step if options.compile is None else compiled_step(options.sampler, options.compile, compile_backend)
    cuda_graphs = options.compile is not None and "reduce-overhead" in options.compile and keys.is_cuda
    timesteps = respaced_timesteps(den.schedule.timesteps, options.steps)
    pairs = list(zip(timesteps, timesteps[1:] + [-1]))
    den.prepare(pairs)
    table = step_table(den, pairs, record, options, keys.device)
    # The last step's noise coefficient is 0 in the table; drawing it anyway keeps one graph for all steps.
    noisy = record.draws_noise(options)
    x = keyed_normal(keys, 0, tuple(shape))
    state: State = (x, torch.zeros_like(x), den.initial_memory(x), torch.zeros(len(x), device=x.device))
    traces: list[dict[str, Tensor]] = []
    for i, (t, _) in enumerate(tqdm(pairs, desc=desc, disable=not progress, leave=False)):
        mode = den.mode(t)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: earlier graph outputs may be reused
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            state = step(den, state, table[i], keys, mode, noisy, options.clip_x0, options.threshold)
        if cuda_graphs:
            # Own the state: a graph output fed back as the next input can be overwritten by that very
            # replay (pytorch#170604, #184102). One copy of the batch per step, negligible next to the UNet.
            x_, d_, memory_, count_ = state
            state = (x_.clone(), d_.clone(), {k: v.clone() for k, v in memory_.items()}, count_.clone())
        traces.append({k[len("trace_"):]: v for k, v in state[2].items() if k.startswith("trace_")})
        if callback is not None:
            callback(i)
    x = state[0]
    if stats is not None:
        stats["thresholded_steps"] = state[3]
        # A rule's per-sample values per step (FBG's λ_t): {name: (steps, B)}; a step without one records NaN.
        names = sorted({k for trace in traces for k in trace})
        stats["trace"] = {k: torch.stack([tr.get(k, torch.full_like(state[3], math.nan)) for tr in traces])
                          for k in names}
    return x.clamp(-1, 1) if options.clip_x0 or options.threshold is not None else x
