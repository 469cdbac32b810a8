"""Diffusion maths in pure torch: schedules, noise, guidance rules and samplers (no Lightning)."""

from .denoiser import GuidedDenoiser
from .guidance import (
    BRANCHES,
    Guided,
    Predictions,
    StepMode,
    check_guided_steps,
    classifier_grad,
    clean_log_prob,
    condition_mean,
    condition_score,
)
from .methods import METHODS, RULES, GuidanceOptions, GuidanceRule, cell_cost, make_rule
from .noise import keyed_integers, keyed_normal, sample_keys
from .options import COMPILE_MODES, SAMPLERS, OptionError, SamplerOptions, SharedGuidance
from .samplers import SAMPLER_RECORDS, Sampler, sample
from .schedule import NoiseSchedule, make_betas, respaced_timesteps

__all__ = [
    "BRANCHES", "COMPILE_MODES", "METHODS", "RULES", "SAMPLERS", "SAMPLER_RECORDS", "Guided", "GuidanceOptions",
    "GuidanceRule", "GuidedDenoiser", "NoiseSchedule", "OptionError", "Predictions", "Sampler", "SamplerOptions",
    "SharedGuidance", "StepMode", "cell_cost", "check_guided_steps", "classifier_grad", "clean_log_prob",
    "condition_mean", "condition_score", "keyed_integers", "keyed_normal", "make_betas", "make_rule",
    "respaced_timesteps", "sample", "sample_keys",
]
