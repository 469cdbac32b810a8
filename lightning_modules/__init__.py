"""LightningModules (thin wiring) and the pure-torch parts they wire (diffusion/, networks/)."""

from .classifier_module import NoisyClassifier
from .diffusion_module import ConditionalDiffusion, Samples

__all__ = ["ConditionalDiffusion", "NoisyClassifier", "Samples"]
