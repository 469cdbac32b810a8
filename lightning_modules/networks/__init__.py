"""Networks: class-conditional UNet (AdaGN + optional cross-attention) and the noise-aware classifier."""

from .classifier import EncoderClassifier
from .unet import UNet

__all__ = ["EncoderClassifier", "UNet"]
