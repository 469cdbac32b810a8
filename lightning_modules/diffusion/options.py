"""Option objects that travel whole from a config to the maths, each checked once, up front.

`OptionError` is the one error for a bad setting: it names the option, what is wrong and the fix, so a
sweep or a fit fails before any training or sampling rather than after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

SCALE_SCHEDULES = ("constant", "linear", "cosine")


class OptionError(ValueError):
    """A setting that cannot work: names the option, the problem and the fix."""

    def __init__(self, option: str, problem: str, fix: str) -> None:
        self.option = option
        super().__init__(f"option `{option}`: {problem}. Fix: {fix}")


@dataclass(frozen=True)
class SharedGuidance:
    """The guidance settings every rule shares (the scale itself is per cell; a method's own options are its
    class's `Options`, namespaced under its name: see `methods.GuidanceOptions`).

    Args:
        interval: guide only at training timesteps t with lo <= t <= hi (original indices 0..T-1); outside
            the band a sample is plain conditional (or unconditional) sampling. null = every step.
        scale_schedule: how the guidance beyond the base branch ramps over sampling: constant, linear or
            cosine (0 at pure noise, full at the data end).
        cfg_rescale: φ of Lin et al. (2023): blend the CFG output towards the conditional prediction's
            per-sample std, in [0, 1]; 0 = off. Acts on CFG-guided samples only (the base branch is the
            conditional one); an s_cfg = 0 sample stays the unconditional model.
        sigma_interval: guide only where the noise level σ = √((1−ᾱ)/ᾱ) lies in (lo, hi] (Kynkäänniemi et al.
            2024 define their interval on σ); combines with `interval`. null = every step.
    """

    interval: tuple[int, int] | None = None
    scale_schedule: Literal["constant", "linear", "cosine"] = "constant"
    cfg_rescale: float = 0.0
    sigma_interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        # Checked by whoever consumes the options (with the model's timesteps and the option's full name).
        for name in ("interval", "sigma_interval"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def check(self, timesteps: int | None = None, prefix: str = "") -> None:
        """Raise OptionError for the first bad setting; with `timesteps`, also check the interval's range."""
        if self.interval is not None:
            if len(self.interval) != 2 or not all(isinstance(v, int) for v in self.interval) \
                    or self.interval[0] > self.interval[1]:
                raise OptionError(f"{prefix}interval", f"{list(self.interval)} is not a [lo, hi] band with lo <= hi",
                                  "give training timesteps in increasing order, e.g. [0, 600]")
            if self.interval[0] < 0 or (timesteps is not None and self.interval[1] > timesteps - 1):
                top = "T-1" if timesteps is None else str(timesteps - 1)
                raise OptionError(f"{prefix}interval", f"{list(self.interval)} leaves the timestep range [0, {top}]",
                                  f"choose lo >= 0 and hi <= {top}")
        if self.sigma_interval is not None:
            lo_hi = tuple(self.sigma_interval)
            if len(lo_hi) != 2 or not all(math.isfinite(v) and v >= 0 for v in lo_hi) or lo_hi[0] >= lo_hi[1]:
                raise OptionError(f"{prefix}sigma_interval", f"{list(lo_hi)} is not a noise-level band (lo, hi] "
                                  "with 0 <= lo < hi", "give σ values in increasing order, e.g. [0.34, 1.02]")
        if self.scale_schedule not in SCALE_SCHEDULES:
            raise OptionError(f"{prefix}scale_schedule", f"unknown schedule {self.scale_schedule!r}",
                              f"choose one of {list(SCALE_SCHEDULES)}")
        if not (math.isfinite(self.cfg_rescale) and 0.0 <= self.cfg_rescale <= 1.0):
            raise OptionError(f"{prefix}cfg_rescale", f"φ = {self.cfg_rescale} is outside [0, 1]",
                              "use 0 (off) up to 1 (full rescale); 0.7 is the paper's value")


def check_finite(prefix: str, **values: float) -> None:
    """OptionError for the first value that is not a finite number (a method's own numeric options)."""
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise OptionError(f"{prefix}{name}", f"{value!r} is not a finite number", "give a finite number")


SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class SamplerOptions:
    """How samples are drawn.

    Args:
        sampler: ddim (ε-form guidance, η below), ddpm (ancestral, fixed-small variance, mean-form guidance) or
            dpmpp_2m (DPM-Solver++(2M), data-prediction multistep with lower-order final steps: 15-20 steps).
        steps: sampling steps, evenly respaced over the training timesteps.
        eta: DDIM's η >= 0: 0 is deterministic DDIM, 1 is DDPM-like noise.
        clip_x0: clip the predicted x₀ to [-1, 1] and recompute ε from it at every step.
        threshold: dynamic thresholding's quantile p (Saharia et al. 2022; e.g. 0.995) instead of the static
            clip: per sample s = max(1, quantile_p |x̂0|), x̂0 ← clip(x̂0, −s, s)/s, ε recomputed. null = off.
        compile: null (eager) or a torch.compile mode for the whole sampler step: default, reduce-overhead
            (adds CUDA graphs), max-autotune, max-autotune-no-cudagraphs.
    """

    sampler: Literal["ddim", "ddpm", "dpmpp_2m"] = "ddim"
    steps: int = 50
    eta: float = 0.0
    clip_x0: bool = True
    threshold: float | None = None
    compile: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None

    def check(self, timesteps: int | None = None, prefix: str = "") -> None:
        """Raise OptionError for the first bad setting; with `timesteps`, also check the step count's range."""
        if self.sampler not in SAMPLERS:
            raise OptionError(f"{prefix}sampler", f"unknown sampler {self.sampler!r}",
                              f"choose one of {list(SAMPLERS)}")
        top = "T" if timesteps is None else str(timesteps)
        if not isinstance(self.steps, int) or self.steps < 1 or (timesteps is not None and self.steps > timesteps):
            raise OptionError(f"{prefix}steps", f"{self.steps!r} sampling steps is outside [1, {top}]",
                              "give at least 1 step and at most the model's training timesteps")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise OptionError(f"{prefix}eta", f"η = {self.eta} is not a finite number >= 0",
                              "use 0 (deterministic DDIM) up to 1 (DDPM-like)")
        if self.threshold is not None and not (isinstance(self.threshold, float) and 0.5 <= self.threshold <= 1.0):
            raise OptionError(f"{prefix}threshold", f"quantile {self.threshold!r} is outside [0.5, 1]",
                              "use null (static clip) or a high quantile such as 0.995")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise OptionError(f"{prefix}compile", f"unknown torch.compile mode {self.compile!r}",
                              f"use null (eager) or one of {list(COMPILE_MODES)}")
