"""Diffusion maths in pure torch: schedules, noise, guidance rules and samplers (no Lightning)."""

from .guidance import METHODS, GuidedDenoiser, classifier_grad, gamma, guidance_cost, method_scales
from .noise import keyed_normal, sample_keys
from .samplers import SAMPLERS, sample
from .schedule import NoiseSchedule, make_betas, respaced_timesteps

__all__ = [
    "METHODS", "SAMPLERS", "GuidedDenoiser", "NoiseSchedule", "classifier_grad", "gamma", "guidance_cost",
    "keyed_normal", "make_betas", "method_scales", "respaced_timesteps", "sample", "sample_keys",
]
