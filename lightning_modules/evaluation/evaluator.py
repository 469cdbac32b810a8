"""The "evaluator": a classifier trained by the framework on *clean* images of the embedded dataset.

For sklearn digits there is no pretrained feature network (Inception on 8x8 greyscale digits is
meaningless), so FID / KID / precision / recall are computed in the penultimate feature space of this
network, and its logits give the classifier score and the target-class accuracy. It is deliberately a
different network from the noise-aware classifier used for guidance, so guidance cannot game the metric.

`arch` selects the network: "cnn" (EvaluatorNet, the main evaluator) or "mlp" (EvaluatorMLP, a second,
independently trained feature space used to check that a ranking is not an artefact of one network).
Cache helpers live in evaluator_cache.py, the training loop in evaluator_train.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .evaluator_cache import _fingerprint, _load_cached_evaluator, _safe, _weights_hash, atomic_torch_save
from .evaluator_train import _accuracy, _train_loop

__all__ = ["EVALUATOR_ARCHS", "EvaluatorExtractor", "EvaluatorMLP", "EvaluatorNet", "atomic_torch_save",
           "load_or_train_evaluator", "train_evaluator"]

log = logging.getLogger(__name__)

# Bump when the architecture or the training recipe changes: it is part of the cache key, so old
# evaluator files (and every reference-feature file keyed on the evaluator's identity) are not reused.
_RECIPE_VERSION = 2
# Measured on sklearn digits (80/20 split, 1 thread): >= 99% held-out accuracy from ~300 steps.
_TRAIN_HPARAMS = {
    "batch_size": 128,
    "lr": 3e-3,
    "weight_decay": 5e-4,
    "max_shift": 1,
    "width": 32,
    "num_features": 128,
}
# arch "mlp": its own recipe version (bumping it leaves the CNN's cache alone). Same optimiser and shifts.
_MLP_RECIPE_VERSION = 1
_MLP_HPARAMS = {
    "batch_size": 128,
    "lr": 3e-3,
    "weight_decay": 5e-4,
    "max_shift": 1,
    "hidden": 256,
    "num_features": 64,
}
EVALUATOR_ARCHS = ("cnn", "mlp")
_NET_KEYS = {"cnn": ("width", "num_features"), "mlp": ("hidden", "num_features")}  # the hparams that shape the net


def _groups(channels: int) -> int:
    # Largest of 8/4/2/1 that divides `channels`: GroupNorm needs an exact split.
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class EvaluatorNet(nn.Module):
    """Small CNN for small images (8x8 digits, also 28/32 px): conv stages with GroupNorm, global pool.

    GroupNorm rather than BatchNorm so that a sample's features never depend on the rest of its batch:
    features of generated images must not change with the evaluation batch size or composition.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, num_features: int = 128):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.num_features = num_features

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                nn.GroupNorm(_groups(c_out), c_out),
                nn.SiLU(),
            )

        self.body = nn.Sequential(
            block(in_channels, width, 1),
            block(width, width, 1),
            block(width, 2 * width, 2),
            block(2 * width, 2 * width, 1),
            block(2 * width, 4 * width, 2),
        )
        # Adaptive pooling makes the network independent of the input resolution (8, 28, 32 px...).
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Sequential(nn.Linear(4 * width, num_features), nn.SiLU())
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (B, num_features)."""
        h = self.pool(self.body(x)).flatten(1)
        return self.embed(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class EvaluatorMLP(nn.Module):
    """MLP on the flattened image (arch "mlp"): Linear-LayerNorm-GELU x2, then a 64-d penultimate layer.

    No convolution, no pooling, no translation prior: a feature space built differently from EvaluatorNet's.
    LayerNorm normalises each sample on its own, so features never depend on the batch. Fixed input size.
    """

    def __init__(self, image_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, hidden: int = 256,
                 num_features: int = 64):
        super().__init__()
        self.in_channels = image_shape[0]
        self.num_classes = num_classes
        self.num_features = num_features
        d = 1
        for n in image_shape:
            d *= int(n)
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
        )
        self.embed = nn.Sequential(nn.Linear(hidden, num_features), nn.LayerNorm(num_features), nn.GELU())
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (B, num_features)."""
        return self.embed(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _build_net(arch: str, image_shape: tuple[int, ...], num_classes: int, width: int = 32,
               num_features: int | None = None, hidden: int = 256) -> nn.Module:
    if arch == "cnn":
        return EvaluatorNet(image_shape[0], num_classes, width=width, num_features=num_features or 128)
    if arch == "mlp":
        return EvaluatorMLP(tuple(image_shape), num_classes, hidden=hidden, num_features=num_features or 64)
    raise ValueError(f"unknown evaluator arch {arch!r}: expected one of {EVALUATOR_ARCHS}")


class EvaluatorExtractor:
    """FeatureExtractor over a trained evaluator network (EvaluatorNet or EvaluatorMLP): features = penultimate
    layer, logits = class logits."""

    def __init__(self, net: nn.Module, extractor_id: str, heldout_accuracy: float, batch_size: int = 512):
        self.net = net.eval().requires_grad_(False)
        self.extractor_id = extractor_id
        self.num_features = net.num_features
        self.num_classes = net.num_classes
        self.heldout_accuracy = float(heldout_accuracy)
        self.batch_size = batch_size

    def to(self, device: str | torch.device) -> EvaluatorExtractor:
        self.net.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def extract(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x in [-1, 1], (B, C, H, W) -> (features (B, d) float32, logits (B, K) float32)."""
        self.net.eval()  # a caller may have flipped it; dropout/norm modes must not vary between cells
        feats, logits = [], []
        # Autocast off: features under bf16 differ measurably and would make FID depend on precision flags.
        with torch.autocast(device_type=self.device.type, enabled=False):
            for chunk in x.split(self.batch_size):
                f = self.net.features(chunk.to(self.device, torch.float32))
                feats.append(f.float())
                logits.append(self.net.head(f).float())
        return torch.cat(feats), torch.cat(logits)


def train_evaluator(
    x_train: Tensor,
    y_train: Tensor,
    num_classes: int,
    steps: int,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    max_shift: int = 1,
    width: int = 32,
    num_features: int | None = None,
    arch: str = "cnn",
    hidden: int = 256,
) -> nn.Module:
    """Plain deterministic training loop (AdamW, one-cycle LR, +-1 px shifts) on clean images in [-1, 1].

    `arch` "cnn": EvaluatorNet (`width`; `num_features` default 128); "mlp": EvaluatorMLP (`hidden`;
    `num_features` default 64). `seed` sets both the weight init and the batch/shift stream.

    Runs on CPU with ONE intra-op thread, restored afterwards. Why: (1) the result then does not depend on
    the machine's core count (reduction order), so the cache key really determines the weights; (2) these
    ops are tiny, and with 2 threads on a busy 2-core machine OpenMP oversubscription made training ~17x
    slower (measured: 100 steps 17 s vs 2.3 s single-threaded), while on an idle one it costs only ~1.6x.
    """
    def make_net() -> nn.Module:
        return _build_net(arch, tuple(x_train.shape[1:]), num_classes, width, num_features, hidden)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # callers may sit inside a no-grad sampling or validation context
        with torch.inference_mode(False), torch.enable_grad():
            return _train_loop(x_train, y_train, make_net, steps, seed, batch_size, lr, weight_decay, max_shift)
    finally:
        torch.set_num_threads(threads)


def load_or_train_evaluator(
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    num_classes: int,
    cache_dir: str | Path,
    dataset_id: str,
    steps: int = 400,
    seed: int = 0,
    device: str | torch.device = "cpu",
    arch: str = "cnn",
) -> EvaluatorExtractor:
    """Load the evaluator for (dataset, arch, seed, settings) from `cache_dir`, or train it once and cache it.

    Cache file: `cache_dir/evaluator-<tag><dataset_id>-<hash of settings and data>.pt` holding the weights,
    the held-out accuracy and the settings; the extractor id is that stem plus the weights' hash. `<tag>` is
    empty for the main evaluator (arch "cnn", seed 0: names as they always were, so old caches are reused)
    and `<arch>-s<seed>-` otherwise. Training always runs on CPU in float32 (tiny network, and CPU keeps it
    reproducible); `device` is where the returned extractor runs.
    """
    if arch not in EVALUATOR_ARCHS:
        raise ValueError(f"unknown evaluator arch {arch!r}: expected one of {EVALUATOR_ARCHS}")
    x_train, x_val = x_train.detach().cpu().float(), x_val.detach().cpu().float()
    y_train, y_val = y_train.detach().cpu().long(), y_val.detach().cpu().long()
    hparams = dict(_TRAIN_HPARAMS if arch == "cnn" else _MLP_HPARAMS)
    # The CNN's settings stay exactly as before (no "arch" entry): its cache key must not change.
    settings = {
        "recipe_version": _RECIPE_VERSION if arch == "cnn" else _MLP_RECIPE_VERSION,
        **({} if arch == "cnn" else {"arch": arch}),
        "dataset_id": dataset_id,
        "num_classes": int(num_classes),
        "steps": int(steps),
        "seed": int(seed),
        "image_shape": list(x_train.shape[1:]),
        "data": _fingerprint(x_train, y_train, x_val, y_val),
        **hparams,
    }
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    tag = "" if (arch, int(seed)) == ("cnn", 0) else f"{arch}-s{int(seed)}-"
    name = f"{tag}{_safe(dataset_id)}"
    path = Path(cache_dir) / f"evaluator-{name}-{key}.pt"

    net = _build_net(arch, tuple(x_train.shape[1:]), num_classes, **{k: hparams[k] for k in _NET_KEYS[arch]})
    cached_acc = _load_cached_evaluator(path, net)
    if cached_acc is not None:
        acc = cached_acc
        log.info("Evaluator %s loaded from %s: held-out accuracy %.4f", name, path, acc)
    else:
        t0 = time.perf_counter()
        net = train_evaluator(x_train, y_train, num_classes, steps=steps, seed=seed, arch=arch, **hparams)
        acc = _accuracy(net, x_val, y_val)
        secs = time.perf_counter() - t0
        blob = {"state_dict": net.state_dict(), "heldout_accuracy": acc, "settings": settings, "train_seconds": secs}
        atomic_torch_save(blob, path)
        log.info(
            "Evaluator %s trained in %.1f s (%d steps): held-out accuracy %.4f on %d images -> %s",
            name,
            secs,
            steps,
            acc,
            len(y_val),
            path,
        )
    if acc < 0.9:
        log.warning("Evaluator %s held-out accuracy is only %.3f: feature-space metrics will be weak", name, acc)
    # The weights hash goes into the identity too: if the file is ever re-trained (another machine,
    # another torch version), reference features cached under the old identity are not reused.
    extractor_id = f"evaluator-{name}-{key}-{_weights_hash(net.state_dict())}"
    return EvaluatorExtractor(net, extractor_id, acc).to(device)
