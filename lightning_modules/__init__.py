"""LightningModules (thin wiring) and the pure-torch parts they wire (diffusion/, networks/, sweep/).

The LightningModules are imported lazily, so `import lightning_modules.sweep` (or .diffusion) does not
import Lightning.
"""

__all__ = ["ConditionalDiffusion", "NoisyClassifier"]


def __getattr__(name: str):
    if name == "ConditionalDiffusion":
        from .diffusion_module import ConditionalDiffusion

        return ConditionalDiffusion
    if name == "NoisyClassifier":
        from .classifier_module import NoisyClassifier

        return NoisyClassifier
    raise AttributeError(f"module 'lightning_modules' has no attribute {name!r}")
