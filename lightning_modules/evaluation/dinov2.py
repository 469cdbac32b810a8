"""FD_DINOv2 (Stein et al. 2023): the sweep's metrics in the feature space of a DINOv2 ViT, from a local directory.

EDM2 and the guidance-interval paper report FD_DINOv2 beside FID; dgm-eval and EDM2 compute it the same way,
and so does this extractor:
- **Features**: the CLS token of the last layer after the final LayerNorm. The hub model's `forward` returns
  `head(x_norm_clstoken)` with `head = Identity` (facebookresearch/dinov2, dinov2/models/vision_transformer.py,
  `forward` / `forward_features`); dgm-eval's `DINOv2Encoder` calls it as is (dgm_eval/models/encoder.py `forward`,
  dgm_eval/models/dinov2.py `setup`: `torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')`), and so does
  EDM2's `DINOv2Detector.__call__` (calculate_metrics.py: `return self.model.to(x.device)(x)`). In transformers
  that vector is `Dinov2Model(...).pooler_output` (= `layernorm(last_hidden_state)[:, 0]`).
- **Preprocessing**: 8-bit images (both references read uint8 images) → [0, 1] → grey repeated to RGB →
  224 × 224 bicubic with antialias (EDM2's `resize_mode='torch'`, its fast equivalent of dgm-eval's PIL bicubic
  `TF.Resize((224, 224), BICUBIC)`; PyTorch's antialiased bicubic is PIL's kernel, a = −0.5, also when
  upsampling) → ImageNet mean/std.
- **Position embeddings**: the checkpoints hold 37 × 37 of them (trained at 518 px). The hub model interpolates
  them to the 16 × 16 patches of a 224 px image with `scale_factor = (16 + 0.1) / 37`; transformers' Dinov2Model
  with `size = 16`, which samples slightly other points. They are interpolated once here the hub's way, so the
  features are the ones dgm-eval and EDM2 compute.

Why not torch-fidelity 0.4's DINOv2 extractor: it calls `torch.hub.load("facebookresearch/dinov2", ...)`, which
downloads code from GitHub and runs it (and the weights), refuses a local weights path (NotImplementedError), and
resizes with TF1-style bilinear instead of bicubic. Here: a `Dinov2Model` saved with `save_pretrained`
(config.json + *.safetensors), loaded by transformers with safetensors only, local files only, no remote code.

There is no classifier head: `extract` returns (B, 0) logits, so the classifier score and target-class accuracy
are NaN in this space (a sweep that needs accuracy keeps the evaluator as its main space and adds DINOv2 as an
extra ruler, `sweep.extra_extractors: [dinov2]`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.diffusion.options import OptionError

from .features import to_uint8_range

DINOV2_OPTION = "sweep.dinov2_dir"
RESOLUTION = 224  # dgm-eval's and EDM2's input size
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_INTERPOLATE_OFFSET = 0.1  # the hub model's `interpolate_offset`
_ARCH = {384: "vits", 768: "vitb", 1024: "vitl", 1536: "vitg"}  # hidden size → the hub's model name
_FIX = ("save a DINOv2 model once, where a network is reachable: `from transformers import Dinov2Model; "
        "Dinov2Model.from_pretrained('facebook/dinov2-large').save_pretrained(DIR)` (ViT-L/14, the one dgm-eval and "
        f"EDM2 use; safetensors), then pass --{DINOV2_OPTION} DIR")


def _signature(hidden: int, patch: int) -> dict[str, tuple[int, ...]]:
    # Tensors every Dinov2Model state dict holds, first layer to last: tells a DINOv2 directory from another model's.
    return {"embeddings.cls_token": (1, 1, hidden),
            "embeddings.patch_embeddings.projection.weight": (hidden, 3, patch, patch), "layernorm.weight": (hidden,)}


def check_dinov2_dir(directory: str | os.PathLike | None, option: str = DINOV2_OPTION) -> tuple[Path, dict]:
    """(the directory, its config) when it holds a loadable DINOv2 model, else OptionError naming `option`.

    Cheap (config.json and the safetensors headers, no tensor data): call it before any sampling so a sweep never
    dies at its first FD_DINOv2. Pickled weights (pytorch_model.bin) are refused: loading them can run code."""
    if directory is None:
        raise OptionError(option, "the DINOv2 extractor needs a local model directory (nothing is downloaded)", _FIX)
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise OptionError(option, f"{path} is not a directory", _FIX)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise OptionError(option, f"{path}/config.json is missing or not JSON ({type(err).__name__}: {err})",
                          _FIX) from err
    if not isinstance(config, dict) or config.get("model_type") != "dinov2":
        kind = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise OptionError(option, f"{path} holds a {kind!r} model, not a transformers Dinov2Model", _FIX)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.glob("*.bin")]
        raise OptionError(option, f"{path} has no *.safetensors weights" +
                          (f" (only pickled {pickled}, refused: unpickling can run code)" if pickled else ""),
                          "re-save the model with `save_pretrained(DIR)` (safetensors is its default)")
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    shapes[key.removeprefix("dinov2.")] = tuple(f.get_slice(key).get_shape())
        except Exception as err:  # truncated or garbage header: SafetensorError, OSError, ...
            raise OptionError(option, f"{file} is not a readable safetensors file ({type(err).__name__}: {err})",
                              f"delete it and {_FIX}") from err
    expected = _signature(int(config.get("hidden_size", 0)), int(config.get("patch_size", 0)))
    wrong = [f"{k} {shapes.get(k, 'missing')} (expected {v})" for k, v in expected.items() if shapes.get(k) != v]
    if wrong:
        raise OptionError(option, f"{path}'s weights do not fit its config.json: {', '.join(wrong)}", _FIX)
    return path, config


def _weights_digest(path: Path) -> str:
    """SHA-256 over config.json and every *.safetensors file (streamed: a ViT-L file is 1.2 GB)."""
    h = hashlib.sha256()
    for file in [path / "config.json", *sorted(path.glob("*.safetensors"))]:
        h.update(file.name.encode())
        with open(file, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def dinov2_inputs(x: Tensor) -> Tensor:
    """x in [-1, 1], (B, 1 or 3, H, W) → the network's input, (B, 3, 224, 224) float32 (see the module docstring)."""
    u = to_uint8_range(x).float() / 255.0  # 8-bit levels as the references read them; grey → RGB
    u = F.interpolate(u, size=(RESOLUTION, RESOLUTION), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=u.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=u.device).view(1, 3, 1, 1)
    return (u - mean) / std


def hub_position_embeddings(position_embeddings: Tensor, grid: int) -> Tensor:
    """(1, 1 + n², d) position embeddings → (1, 1 + grid², d) as the hub model interpolates them for a grid × grid
    patch image (bicubic, scale factor (grid + 0.1) / n, in float32); unchanged when n = grid."""
    n = math.isqrt(position_embeddings.shape[1] - 1)
    if n == grid:
        return position_embeddings
    d = position_embeddings.shape[-1]
    patches = position_embeddings[:, 1:].float().reshape(1, n, n, d).permute(0, 3, 1, 2)
    scale = (grid + HUB_INTERPOLATE_OFFSET) / n
    patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic")
    if patches.shape[-2:] != (grid, grid):
        raise ValueError(f"position embeddings interpolated to {tuple(patches.shape[-2:])}, not {grid} x {grid}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(position_embeddings.dtype)
    return torch.cat([position_embeddings[:, :1], patches], dim=1)


class DINOv2Extractor:
    """A DINOv2 ViT (transformers' Dinov2Model) from a local directory: the CLS token as features, no logits."""

    def __init__(self, directory: str | os.PathLike | None, device: str | torch.device = "cpu",
                 batch_size: int | None = None, option: str = DINOV2_OPTION) -> None:
        path, config = check_dinov2_dir(directory, option)
        from transformers import Dinov2Model

        try:
            model = Dinov2Model.from_pretrained(str(path), use_safetensors=True, local_files_only=True)
        except Exception as err:  # corrupt tensor data, shapes that do not fit, ...
            raise OptionError(option, f"transformers cannot load {path} ({type(err).__name__}: {err})", _FIX) from err
        grid = RESOLUTION // model.config.patch_size
        with torch.no_grad():  # the hub's interpolation, once; Dinov2Model then uses them as they are
            model.embeddings.position_embeddings = nn.Parameter(
                hub_position_embeddings(model.embeddings.position_embeddings, grid), requires_grad=False)
        model.config.image_size = grid * model.config.patch_size
        self.model = model.float().eval().requires_grad_(False).to(device)  # a half-precision save runs in fp32
        self.directory = path
        self.num_features = int(model.config.hidden_size)
        # fp32 at 224 px: ViT-L's attention over 257 tokens bounds CPU memory at 64 images per pass.
        self.batch_size = batch_size or (256 if torch.device(device).type == "cuda" else 64)
        arch = f"{_ARCH.get(self.num_features, f'd{self.num_features}')}{model.config.patch_size}"
        # Weights and config by content, and what is read from them (CLS token at 224 px): part of every cache key.
        self.extractor_id = f"dinov2-{arch}-cls{RESOLUTION}-sha256-{_weights_digest(path)[:16]}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> DINOv2Extractor:
        self.model.to(device)
        return self

    @torch.no_grad()
    def extract(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x in [-1, 1], (B, C, H, W) → (CLS features (B, hidden) float32, logits (B, 0): no classifier head)."""
        feats = []
        # Autocast off: features are always extracted in float32 (docs/conventions.md).
        with torch.autocast(device_type=self.device.type, enabled=False):
            for chunk in x.split(self.batch_size):
                out = self.model(pixel_values=dinov2_inputs(chunk.to(self.device)))
                feats.append(out.pooler_output.float())
        features = torch.cat(feats) if feats else torch.zeros(0, self.num_features, device=self.device)
        return features, features.new_zeros(len(features), 0)
