"""The hook every guidance method implements: one class owns a method's maths, options, defaults and metadata.

A rule says, per step, which predictions it needs (`mode`: names from `guidance.BRANCHES` and whether a
classifier gradient is taken) and how it combines them (`combine`) into a guided ε plus an optional extra score
term s·∇log p(y|x_t). Rules see predictions and gradient functions, never networks or classifiers; samplers see
`Guided`, never method names. Everything else a method needs lives on its class too, so adding a method is one
class (+ its tests): its name, default grid, display label and style, scale-axis and γ text, its own options
(`Options`, a frozen dataclass namespaced as `sweep.guidance.<options_key>.<field>`), the shared options it
reads (and so what enters its cells' signature), its cost, the gradient it takes and any perturbation of the
network its extra branch runs under.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, ClassVar

from torch import Tensor

from ..guidance import GradFn, Guided, LogProbFn, Predictions, StepMode
from ..options import SharedGuidance
from ..schedule import NoiseSchedule

BAD_VERSION = "a bad version of itself"  # the family of guides that are the model made worse (see `family`)


class GuidanceRule:
    """One guidance method. Subclasses set the class attributes below and implement gamma, mode and combine."""

    name: ClassVar[str]
    label: ClassVar[str]  # how figures and reports name it
    color: ClassVar[str] = "tab:gray"
    marker: ClassVar[str] = "p"
    default_scales: ClassVar[tuple[float, ...]]
    scale_axis: ClassVar[str] = "scale s"
    gamma_text: ClassVar[str] = "γ = s"  # the report's line on how its scale maps to γ
    cost_text: ClassVar[str] = ""  # network evaluations per step (the README's method table)
    Options: ClassVar[type | None] = None  # its own options (a frozen dataclass with a `check(prefix)`)
    deprecated: ClassVar[dict[str, str]] = {}  # an old flat `sweep.guidance.<name>` -> the field of Options
    # Shared options its steps read (all but `none` read the guidance band and ramp); they key its cells.
    reads_shared: ClassVar[tuple[str, ...]] = ("interval", "sigma_interval", "scale_schedule")
    uses_gradient: ClassVar[bool] = False  # may need a classifier gradient at some scale
    uses_guide: ClassVar[bool] = False  # needs a guide network (autoguidance with a trained guide)
    gradient_at: ClassVar[str] = "x_t"  # the classifier sees x_t (noisy classifier) or x̂0 (clean classifier)
    scale_range: ClassVar[tuple[float, float]] = (-math.inf, math.inf)  # valid native scales
    family: ClassVar[str | None] = None  # methods a report compares side by side (BAD_VERSION)
    # The guidance_training objective its network must have been trained with (mg, gft); None: any network.
    trained_with: ClassVar[str | None] = None

    def __init__(self, options: SharedGuidance | None = None) -> None:
        from . import GuidanceOptions as Full  # the registry's class: shared options + every method's own

        self.options = options if options is not None else Full()
        own = getattr(self.options, self.options_key(), None) if self.Options is not None else None
        self.settings: Any = own if own is not None or self.Options is None else self.Options()

    @classmethod
    def options_key(cls) -> str:
        """Its options' name on the command line and in YAML (`cfg+cg` -> `cfg_cg`)."""
        return cls.name.replace("+", "_")

    def gamma(self, scale: float) -> float:
        """The common axis: the exponent γ on p(y|x) the method implies at this native scale."""
        raise NotImplementedError

    def needs_gradient(self, scale: float) -> bool:
        """Whether a cell at this scale takes classifier gradients (so needs a classifier)."""
        return False

    def mode(self, scales: Sequence[float], w: float) -> StepMode:
        """The evaluations a step with guidance weight w needs for a batch holding these scales."""
        raise NotImplementedError

    def step_mode(self, t: int, scales: Sequence[float], w: float) -> StepMode:
        """The evaluations step t needs (a rule whose steps differ by more than the weight overrides this)."""
        return self.mode(scales, w)

    def prepare(self, schedule: NoiseSchedule, pairs: Sequence[tuple[int, int]]) -> None:
        """Called before sampling with the (t, s) transitions the sampler will take (FBG derives its constants
        from them, CFG-Zero* its zeroed steps); host work only."""

    def plain(self, scale: float) -> str | None:
        """"cond" / "uncond" when this scale is exactly the plain conditional / unconditional model at every
        step (so its cell equals every other such cell on paired noise), else None."""
        return None

    def combine(self, p: Predictions, scale: Tensor, w: Tensor) -> Guided:
        """The guided prediction from per-sample scales (B,) and the step's guidance weight w (0-d)."""
        raise NotImplementedError

    def initial_memory(self, x: Tensor) -> dict[str, Tensor]:
        """The rule's loop state before the first step (tensors only, so a compiled step carries it)."""
        return {}

    def gradient(self, p: Predictions, noisy: GradFn | None, clean: LogProbFn | None) -> Tensor:
        """The unscaled guidance gradient ∇_{x_t} log p(y | x_t): a noisy classifier's at x_t by default."""
        assert noisy is not None, "the denoiser checks for a gradient function before sampling"
        return noisy(p.x, p.t, p.y)

    def gradient_cost(self) -> tuple[str, float]:
        """(which classifier a gradient pass runs: classifier | clean, extra main-network evaluations per pass)."""
        return ("clean" if self.gradient_at == "x0" else "classifier"), 0.0

    def network(self, net, scales: Sequence[float], n: int):
        """The network the denoiser evaluates for n samples at these per-sample scales: `net` itself, or (a rule whose
        scale is a network input, GFT's β) a wrapper that feeds it."""
        return net

    def perturbation(self, schedule: NoiseSchedule):
        """The perturbation (`networks.perturbations`) its "perturbed" branch runs the main network under, for a
        model with this schedule; None: it has no such branch."""
        return None

    def signature(self) -> dict:
        """What its cells depend on besides networks and sampling: its name, the shared options it reads and
        its own options (changing APG's momentum does not resample a CFG cell)."""
        shared = {k: getattr(self.options, k) for k in self.reads_shared}
        return {"method": self.name, "shared": shared,
                "own": asdict(self.settings) if self.settings is not None else None}


def effective(scale, w):
    """A scale around the conditional model (1 = conditional) with guidance weight w applied to its excess."""
    return 1 + (scale - 1) * w


def like(scale, value: float):
    """A constant shaped like `scale` (float or tensor)."""
    return scale * 0 + value


class AroundConditional(GuidanceRule):
    """A method with a scale w around the conditional model (w = 1 is the conditional model, γ = w) that needs
    the conditional prediction and one `other` branch whenever some sample is guided; by default it guides away
    from that branch: ε̂ = ε_o + w·(ε_c − ε_o)."""

    other: ClassVar[str]

    def gamma(self, scale: float) -> float:
        return scale

    def plain(self, scale: float) -> str | None:
        return "cond" if scale == 1 else None

    def mode(self, scales: Sequence[float], w: float) -> StepMode:
        values = {effective(s, w) for s in scales}
        return StepMode(("cond",) if values == {1.0} else ("cond", self.other), False)

    def combine(self, p: Predictions, scale: Tensor, w: Tensor) -> Guided:
        other = getattr(p, self.other)
        if other is None:
            return Guided(p.cond)
        s = effective(scale, w).view(-1, 1, 1, 1)
        # Written around ε_c (EDM2's D_o.lerp(D_c, w) in ε), so a row at w = 1 is ε_c exactly, as in a batch that
        # evaluates only the conditional branch.
        return Guided(p.cond + (s - 1) * (p.cond - other))
