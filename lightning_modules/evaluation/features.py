"""Feature extractors behind one interface, and the offline Inception-v3 wrapper for natural images.

Every metric in `metrics.py` works on (features, logits) gathered once per sweep cell, from any object
satisfying `FeatureExtractor`: torch-fidelity's Inception-v3 for natural images, or the framework's own
clean-data "evaluator" for the embedded digits (see `evaluator.py`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# The option of the guidance-sweep callback that carries a local weights path (named in error messages).
INCEPTION_WEIGHTS_OPTION = "inception_weights"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILENAME}"
# torch.hub's naming convention: `<name>-<first 8+ hex of the file's SHA-256>.<ext>`.
_HUB_HASH = re.compile(r"-([0-9a-f]{8,})\.pth$")
# Tensors (and shapes) every torch-fidelity Inception-v3 state dict holds, first layer to last: enough to tell
# its weights from another network's file without importing torch-fidelity or building the network.
_INCEPTION_SIGNATURE = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
                        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1), "fc.weight": (1008, 2048),
                        "fc.bias": (1008,)}
# (resolved path, size, mtime_ns) -> SHA-256 of files verified in this process: only so the callback's setup
# and the sweep script do not verify one file twice in one run; never persisted (no cross-run cache).
_VERIFIED: dict[tuple[str, int, int], str] = {}


class InceptionWeightsError(ValueError):
    """A weights file that exists but cannot be used (corrupt, truncated, wrong file): `problem` and `fix`."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}. Fix: {fix}.")


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


def load_inception_state_dict(path: Path) -> tuple[dict[str, Tensor], str]:
    """(state dict, SHA-256 hex) of a weights file, read once and never unpickled beyond plain tensors.

    torch-fidelity would `torch.load(path, weights_only=False)`, which runs any code a crafted file names.
    Here the bytes are read once, checked against the hash prefix in a torch.hub-style file name, and
    loaded with `weights_only=True`; the caller hands torch-fidelity only what was loaded from these bytes.
    """
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    fix = f"delete it and download {INCEPTION_WEIGHTS_FILENAME} again from {INCEPTION_WEIGHTS_URL}"
    expected = _HUB_HASH.search(path.name)
    if expected and not digest.startswith(expected.group(1)):
        raise InceptionWeightsError(f"Inception weights {path}: SHA-256 {digest[:16]}... does not start with "
                                    f"{expected.group(1)} as its name says - a corrupt, truncated or wrong file", fix)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError (crafted), RuntimeError (truncated zip), EOFError, ...
        raise InceptionWeightsError(f"Inception weights {path} are not a plain state dict of tensors, or are "
                                    f"corrupt: {type(err).__name__}: {err}", fix) from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise InceptionWeightsError(f"Inception weights {path} are not a plain state dict (name -> tensor)", fix)
    return state, digest


def verify_inception_weights(weights_path: str | os.PathLike | None) -> Path:
    """`check_inception_weights`, then the file itself: its SHA-256 against a torch.hub-style name, a
    `weights_only=True` load, and the tensors of torch-fidelity's Inception-v3. Raises InceptionWeightsError
    (a ValueError) for a corrupt, truncated or wrong file, so that is found before training, not at the
    first FID. Reads the file once per process (memoised by path, size and mtime)."""
    path = check_inception_weights(weights_path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return path
    state, digest = load_inception_state_dict(path)
    wrong = [f"{name} {tuple(state[name].shape) if name in state else 'missing'} (expected {shape})"
             for name, shape in _INCEPTION_SIGNATURE.items()
             if name not in state or tuple(state[name].shape) != shape]
    if wrong:
        raise InceptionWeightsError(f"Inception weights {path} load, but are not torch-fidelity's Inception-v3: "
                                    f"{', '.join(wrong[:3])}", f"pass {INCEPTION_WEIGHTS_FILENAME} itself "
                                    f"(from {INCEPTION_WEIGHTS_URL}), not another network's weights")
    _VERIFIED[key] = digest
    return path


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
        raise ValueError(f"the feature networks need 1 or 3 channels, got shape {tuple(x.shape)}")
    return u8


class InceptionExtractor:
    """torch-fidelity's Inception-v3 (TF-2015 weights): 2048-d pool features and 1008 unbiased logits.

    We use the network only, not torch-fidelity's feature cache: its cache key ignores the weights file,
    so our `extractor_id` carries the SHA-256 of the weights instead. The file is verified and loaded with
    `weights_only=True` by `load_inception_state_dict` before torch-fidelity sees anything.
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
        state, digest = load_inception_state_dict(path)
        # torch-fidelity torch.load()s whatever it is given with weights_only=False: it gets an in-memory
        # re-serialisation of the verified tensors, never the file (which could change after our check).
        verified = io.BytesIO()
        torch.save(state, verified)
        verified.seek(0)
        del state
        # fp32 at 299x299: batches of 256 keep a GPU busy; 64 bounds CPU memory.
        self.batch_size = batch_size or (256 if torch.device(device).type == "cuda" else 64)
        self.model = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=verified,
            verbose=False,
        )
        self.model.eval().requires_grad_(False).to(device)
        self.extractor_id = f"inception-v3-compat-sha256-{digest[:16]}"

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
