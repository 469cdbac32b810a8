"""The guidance methods, one class each (see `base.GuidanceRule`), and the options object they share.

`GuidanceOptions` is built from the registry: the shared settings (`SharedGuidance`: interval, σ interval,
ramp, CFG rescale) stay flat, and every method with options of its own gets a group named after it, so the
command line reads `--sweep.guidance.apg.momentum -0.5`. The flat names of earlier versions (`apg_momentum`,
`combo_cg_scale`, ...) still work, with a message naming the new option.
"""

from __future__ import annotations

import dataclasses
import warnings

from ..guidance import guidance_weight
from ..options import OptionError, SharedGuidance
from ..schedule import NoiseSchedule, respaced_timesteps
from .apg import AdaptiveProjected
from .autoguidance import Autoguidance, DegradedAutoguidance
from .base import BAD_VERSION, AroundConditional, GuidanceRule
from .cfgpp import ClassifierFreePlusPlus
from .cg_clean import CleanClassifierGuidance
from .feedback import FeedbackGuidance
from .linear import (
    ClassifierFree,
    ClassifierFreePlusClassifier,
    ClassifierOnConditional,
    ClassifierOnUnconditional,
    IndependentCondition,
    LinearGuidance,
    NoGuidance,
)
from .perturbed import PerturbedAttention, SmoothedEnergy, TimeStepGuidance
from .trained import GuidanceFree, ModelGuided
from .zero_star import ClassifierFreeZeroStar

RULES: dict[str, type[GuidanceRule]] = {
    r.name: r for r in (NoGuidance, ClassifierFree, ClassifierOnConditional, ClassifierOnUnconditional,
                        ClassifierFreePlusClassifier, AdaptiveProjected, ClassifierFreePlusPlus, Autoguidance,
                        CleanClassifierGuidance, IndependentCondition, TimeStepGuidance, PerturbedAttention,
                        SmoothedEnergy, DegradedAutoguidance, ClassifierFreeZeroStar, FeedbackGuidance, ModelGuided,
                        GuidanceFree)}
METHODS = tuple(RULES)
_GROUPS = {r.options_key(): r for r in RULES.values() if r.Options is not None}
_DEPRECATED = {old: (r.options_key(), new) for r in RULES.values() for old, new in r.deprecated.items()}


def _post_init(self) -> None:
    SharedGuidance.__post_init__(self)
    for key, rule in _GROUPS.items():
        value = getattr(self, key)
        if isinstance(value, dict):  # from YAML or a plain dict: its own dataclass
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(rule.Options)})
            if unknown:
                raise OptionError(f"sweep.guidance.{key}", f"unknown option(s) {unknown}",
                                  f"use any of {[f.name for f in dataclasses.fields(rule.Options)]}")
            object.__setattr__(self, key, rule.Options(**value))
    for old, (key, new) in _DEPRECATED.items():
        value = getattr(self, old)
        if value is None:
            continue
        warnings.warn(f"sweep.guidance.{old} is deprecated: use sweep.guidance.{key}.{new} (now set to {value!r})",
                      FutureWarning, stacklevel=3)
        object.__setattr__(self, key, dataclasses.replace(getattr(self, key), **{new: value}))
        object.__setattr__(self, old, None)


def _check(self, timesteps: int | None = None, prefix: str = "") -> None:
    """Raise OptionError for the first bad setting: the shared ones, then each method's own."""
    SharedGuidance.check(self, timesteps, prefix)
    for key in _GROUPS:
        getattr(self, key).check(f"{prefix}{key}.")


def _doc() -> str:
    lines = [(SharedGuidance.__doc__ or "").split("Args:")[0].strip(), "", "Args:"]
    lines += [line for line in (SharedGuidance.__doc__ or "").split("Args:")[1].splitlines() if line.strip()]
    for key, rule in _GROUPS.items():
        lines.append(f"    {key}: options of `{rule.name}` ({rule.label}); see {rule.Options.__name__}.")
    for old, (key, new) in _DEPRECATED.items():
        lines.append(f"    {old}: deprecated, use {key}.{new}.")
    return "\n".join(lines)


GuidanceOptions = dataclasses.make_dataclass(
    "GuidanceOptions",
    [*((key, rule.Options, dataclasses.field(default_factory=rule.Options)) for key, rule in _GROUPS.items()),
     *((old, float | bool | None, dataclasses.field(default=None)) for old in _DEPRECATED)],
    bases=(SharedGuidance,), frozen=True,
    namespace={"__post_init__": _post_init, "check": _check, "__module__": __name__, "__doc__": _doc()})


def make_rule(method: str, options: SharedGuidance | None = None) -> GuidanceRule:
    """The rule object for a method name."""
    if method not in RULES:
        raise OptionError("methods", f"unknown guidance method {method!r}", f"choose from {list(METHODS)}")
    return RULES[method](options)


def cell_cost(rule: GuidanceRule, scale: float, schedule: NoiseSchedule, steps: int) -> tuple[float, float, float]:
    """(main-network evaluations, classifier passes, guide-network evaluations) per sample of one cell sampled
    on its own: a pure function of the plan. (A batched pass may evaluate both CFG branches for s = 0 or 1
    when its chunk also holds other scales; the cost a cell is reported with is what it needs by itself.)"""
    nfe = passes = guides = 0
    ts = respaced_timesteps(schedule.timesteps, steps)
    rule.prepare(schedule, list(zip(ts, ts[1:] + [-1])))
    for t in ts:
        mode = rule.step_mode(t, [scale], guidance_weight(t, schedule, rule.options))
        nfe += mode.network_evaluations
        passes += int(mode.gradient)
        guides += mode.guide_evaluations
    return float(nfe), float(passes), float(guides)


__all__ = ["BAD_VERSION", "METHODS", "RULES", "AroundConditional", "GuidanceOptions", "GuidanceRule", "LinearGuidance",
           "cell_cost", "make_rule"]
