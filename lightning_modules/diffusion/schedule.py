"""Noise schedules and the forward process q(x_t | x_0).

All coefficients are computed in float64 once, then cached per device in float32, so that
gathering them inside a training or sampling step is a single index with no host sync.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

SCHEDULES = ("linear", "cosine")  # the named kinds; `beta_range_kind` names β ranges given outright (diffusers')
BETA_RANGES = ("linear", "scaled_linear")
TARGETS = ("eps", "v")
_BETA_RANGE = re.compile(r"^(linear|scaled_linear)\(([^,()]+),([^,()]+)\)$")


def beta_range_kind(kind: str, beta_start: float, beta_end: float) -> str:
    """The schedule name of β_1..β_T from `beta_start` to `beta_end` exactly as given (no rescaling with T, unlike
    'linear'): 'linear(β_1,β_T)' is linear in β, 'scaled_linear(β_1,β_T)' linear in √β (diffusers' beta schedules
    of those names). A string, so it travels in hyperparameters and compatibility checks like the named kinds."""
    if kind not in BETA_RANGES:
        raise ValueError(f"unknown β range {kind!r}; choose one of {BETA_RANGES}")
    return f"{kind}({float(beta_start)!r},{float(beta_end)!r})"  # repr: the shortest text that reads back exactly


def _beta_range(kind: str, timesteps: int) -> Tensor | None:
    match = _BETA_RANGE.match(kind)
    if match is None:
        return None
    name, start, end = match.group(1), float(match.group(2)), float(match.group(3))
    if not 0 < start <= end < 1:
        raise ValueError(f"noise schedule {kind!r}: need 0 < β_start <= β_end < 1")
    if name == "linear":
        return torch.linspace(start, end, timesteps, dtype=torch.float64)
    return torch.linspace(math.sqrt(start), math.sqrt(end), timesteps, dtype=torch.float64) ** 2


def make_betas(kind: str, timesteps: int) -> Tensor:
    """β_1..β_T as float64: 'linear' (Ho et al. 2020, rescaled to T), 'cosine' (Nichol & Dhariwal 2021; diffusers'
    squaredcos_cap_v2), or a β range given outright (`beta_range_kind`)."""
    if timesteps < 2:
        raise ValueError(f"timesteps must be >= 2, got {timesteps}")
    given = _beta_range(kind, timesteps)
    if given is not None:
        return given
    if kind == "linear":
        scale = 1000.0 / timesteps  # keeps ᾱ_T ≈ the 1000-step value for any T
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        grid = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((grid + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule {kind!r}; choose one of {SCHEDULES} or a β range "
                     "such as 'scaled_linear(0.00085,0.012)'")


class NoiseSchedule:
    """A discrete-time Gaussian diffusion schedule: ᾱ_t for t = 0..T-1 and the maps between x_0, ε, v."""

    def __init__(self, kind: str = "cosine", timesteps: int = 1000) -> None:
        self.kind, self.timesteps = kind, timesteps
        self.betas = make_betas(kind, timesteps)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)
        self._per_device: dict[torch.device, dict[str, Tensor]] = {}

    def config(self) -> dict:
        """What another model must share to be compatible (the noisy classifier checks this)."""
        return {"schedule": self.kind, "timesteps": self.timesteps}

    def alpha_bar(self, t: int) -> float:
        """ᾱ_t as a Python float; t = -1 means 'before any noise' (ᾱ = 1), the end of sampling."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def _tables(self, device: torch.device) -> dict[str, Tensor]:
        if device not in self._per_device:
            ab = self.alphas_cumprod
            tables = {"sqrt_ab": ab.sqrt(), "sqrt_1m_ab": (1 - ab).sqrt()}
            self._per_device[device] = {k: v.to(device, torch.float32) for k, v in tables.items()}
        return self._per_device[device]

    def coef(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Gather a per-timestep coefficient for a batch and shape it to broadcast against `like`."""
        value = self._tables(t.device)[name][t]
        return value.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε."""
        return self.coef("sqrt_ab", t, x0) * x0 + self.coef("sqrt_1m_ab", t, x0) * noise

    def training_target(self, kind: str, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network regresses: ε, or v = √ᾱ_t·ε − √(1-ᾱ_t)·x_0 (Salimans & Ho 2022)."""
        if kind == "eps":
            return noise
        if kind == "v":
            return self.coef("sqrt_ab", t, x0) * noise - self.coef("sqrt_1m_ab", t, x0) * x0
        raise ValueError(f"unknown prediction target {kind!r}; choose one of {TARGETS}")

    def eps_from_output(self, kind: str, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Convert a network output to ε. Affine in the output, so CFG may combine either form."""
        if kind == "eps":
            return output
        if kind == "v":
            return self.coef("sqrt_1m_ab", t, x_t) * x_t + self.coef("sqrt_ab", t, x_t) * output
        raise ValueError(f"unknown prediction target {kind!r}; choose one of {TARGETS}")


def posterior_coefficients(ab_t: float, ab_s: float) -> list[float]:
    """(x̂0 weight, x_t weight, variance) of the DDPM posterior q(x_s | x_t, x̂0) for a (respaced) transition t → s
    between cumulative products ᾱ_t < ᾱ_s (ᾱ_s = 1 at the data end: variance 0)."""
    alpha_ts, beta_ts = ab_t / ab_s, 1 - ab_t / ab_s
    return [math.sqrt(ab_s) * beta_ts / (1 - ab_t), math.sqrt(alpha_ts) * (1 - ab_s) / (1 - ab_t),
            beta_ts * (1 - ab_s) / (1 - ab_t)]


def respaced_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` original training indices, evenly spaced, descending, always starting at T-1.

    Samplers walk these in order; the network and the classifier are always fed the original
    index (0..T-1), never the position in the respaced list.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"sampling steps must be in [1, {timesteps}], got {steps}")
    grid = torch.linspace(0, timesteps - 1, steps, dtype=torch.float64).round().long()
    return sorted({int(v) for v in grid}, reverse=True)
