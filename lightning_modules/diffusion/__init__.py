"""Diffusion maths in pure torch: schedules, noise, guidance rules and samplers (no Lightning)."""

from .denoiser import GuidedDenoiser
from .guidance import (
    GuidanceRule,
    Guided,
    Predictions,
    StepMode,
    check_guided_steps,
    classifier_grad,
    clean_log_prob,
    condition_mean,
    condition_score,
)
from .noise import keyed_normal, sample_keys
from .options import COMPILE_MODES, SAMPLERS, GuidanceOptions, OptionError, SamplerOptions
from .rules import METHODS, RULES, cell_cost, make_rule
from .samplers import sample
from .schedule import NoiseSchedule, make_betas, respaced_timesteps

__all__ = [
    "COMPILE_MODES", "METHODS", "RULES", "SAMPLERS", "Guided", "GuidanceOptions", "GuidanceRule", "GuidedDenoiser",
    "NoiseSchedule", "OptionError", "Predictions", "SamplerOptions", "StepMode", "cell_cost", "check_guided_steps",
    "classifier_grad", "clean_log_prob", "condition_mean", "condition_score", "keyed_normal", "make_betas", "make_rule",
    "respaced_timesteps", "sample", "sample_keys",
]
