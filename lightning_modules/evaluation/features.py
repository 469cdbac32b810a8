"""Feature extractors behind one interface, and the offline Inception-v3 wrapper for natural images.

Every metric in `metrics.py` works on (features, logits) gathered once per sweep cell, from any object
satisfying `FeatureExtractor`: torch-fidelity's Inception-v3 for natural images, or the framework's own
clean-data "evaluator" for the embedded digits (see `evaluator.py`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# The option of the guidance-sweep callback that carries a local weights path (named in error messages).
INCEPTION_WEIGHTS_OPTION = "inception_weights"


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the metrics need from a feature network.

    `extractor_id` names the network *and its weights*: it is part of every cache key, so cached
    reference features are never reused with a different network or weights file.
    """

    extractor_id: str
    num_features: int

    def extract(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x float in [-1, 1], (B, C, H, W) -> (features (B, d) float32, logits (B, K) float32)."""
        ...


def default_inception_weights_path() -> Path:
    """Where torch-fidelity would have put its download: `$TORCH_HOME/hub/checkpoints/<file>`.

    `torch.hub.get_dir()` resolves TORCH_HOME (default ~/.cache/torch, honouring XDG_CACHE_HOME) exactly
    as torch-fidelity's own `load_state_dict_from_url` would, so a file fetched once online is found.
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def check_inception_weights(weights_path: str | os.PathLike | None) -> Path:
    """Return the local Inception-v3 weights file, or raise FileNotFoundError saying how to provide it.

    Cheap (a stat call, no import of torch-fidelity): call it before any sampling so a long sweep never
    dies at its first FID for want of a file. Never downloads.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
    else:
        path = default_inception_weights_path()
    if path.is_file():
        return path
    raise FileNotFoundError(
        "Inception-v3 weights for FID/KID/IS on natural images were not found (nothing is downloaded at run "
        f"time). Missing: {path}\n"
        f"Fix: pass a local copy of {INCEPTION_WEIGHTS_FILENAME} with the sweep callback option "
        f"`{INCEPTION_WEIGHTS_OPTION}`, e.g.\n"
        f"  --sweep.{INCEPTION_WEIGHTS_OPTION}=/path/to/{INCEPTION_WEIGHTS_FILENAME}\n"
        f"or place the file at {default_inception_weights_path()} (i.e. under $TORCH_HOME/hub/checkpoints/; "
        "TORCH_HOME defaults to ~/.cache/torch). It is released with torch-fidelity v0.2.0 on GitHub."
    )


def to_uint8_range(x: Tensor) -> Tensor:
    """[-1, 1] float -> uint8 0..255 by rounding (not truncating), grey repeated to RGB.

    Done in float32 so a bf16/fp16 input does not lose the rounding; uint8 is what torch-fidelity's
    Inception expects (it resizes to 299 and normalises itself, matching the TF reference graph).
    """
    x = x.detach().float()
    u8 = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if u8.shape[1] == 1:
        u8 = u8.repeat(1, 3, 1, 1)
    if u8.shape[1] != 3:
        raise ValueError(f"Inception needs 1 or 3 channels, got shape {tuple(x.shape)}")
    return u8


class InceptionExtractor:
    """torch-fidelity's Inception-v3 (TF-2015 weights): 2048-d pool features and 1008 unbiased logits.

    We use the network only, not torch-fidelity's feature cache: its cache key ignores the weights file,
    so our `extractor_id` carries the weights file name and size instead.
    """

    num_features = 2048

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
    ):
        path = check_inception_weights(weights_path)  # raises before torch-fidelity could try a download
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights_path = path
        # fp32 at 299x299: batches of 256 keep a GPU busy; 64 bounds CPU memory.
        self.batch_size = batch_size or (256 if torch.device(device).type == "cuda" else 64)
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(path),
            verbose=False,
        )
        self.model.eval().requires_grad_(False).to(device)
        self.extractor_id = f"inception-v3-compat-{path.name}-{path.stat().st_size}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> InceptionExtractor:
        self.model.to(device)
        return self

    @torch.no_grad()
    def extract(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x in [-1, 1], (B, C, H, W) -> (features (B, 2048), logits_unbiased (B, 1008)), float32."""
        self.model.eval()
        feats, logits = [], []
        # Autocast off: bf16 autocast shifts Inception features by ~1.5e-2, enough to move FID.
        with torch.autocast(device_type=self.device.type, enabled=False):
            for chunk in x.split(self.batch_size):
                f, lg = self.model(to_uint8_range(chunk).to(self.device))
                feats.append(f.float())
                logits.append(lg.float())
        return torch.cat(feats), torch.cat(logits)
