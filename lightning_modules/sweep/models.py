"""The networks a sweep samples with, and their identities.

A network is identified by a content hash of its weights (never a path or a step counter: in `validate` a
module's global_step is 0, and a file path says nothing about what is in it). Checkpoints are read with
`weights_only=True`, so no code runs from a file, and any problem names the file.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_modules.diffusion import NoiseSchedule, OptionError, classifier_grad
from lightning_modules.diffusion.guidance import GradFn
from lightning_modules.networks import EncoderClassifier, UNet

COMPAT_KEYS = ("num_classes", "image_size", "channels", "schedule", "timesteps")


def weights_hash(net: nn.Module) -> str:
    """SHA-256 (16 hex) of a network's parameters and buffers: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


@dataclass
class Network:
    """A frozen network in eval mode with its hyperparameters, training step and content hash."""

    net: nn.Module
    hparams: dict
    step: int
    sha: str = ""

    def __post_init__(self) -> None:
        self.net.eval().requires_grad_(False)
        self.sha = self.sha or weights_hash(self.net)


@dataclass
class SweepModels:
    """What the engine samples with: the diffusion network (EMA weights) and an optional noisy classifier."""

    diffusion: Network
    classifier: Network | None = None
    schedule: NoiseSchedule = field(init=False)
    grad_fn: GradFn | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        hp = self.diffusion.hparams
        self.schedule = NoiseSchedule(hp["schedule"], hp["timesteps"])
        if self.classifier is not None:
            check_compatible(hp, self.classifier.hparams)
            # One gradient function for the whole sweep, so a compiled step is traced once.
            self.grad_fn = functools.partial(classifier_grad, self.classifier.net)

    @property
    def shape(self) -> tuple[int, int, int]:
        hp = self.diffusion.hparams
        return hp["channels"], hp["image_size"], hp["image_size"]

    @property
    def num_classes(self) -> int:
        return self.diffusion.hparams["num_classes"]

    @property
    def prediction(self) -> str:
        return self.diffusion.hparams["prediction"]

    @property
    def device(self) -> torch.device:
        return next(self.diffusion.net.parameters()).device

    def to(self, device: torch.device | str) -> SweepModels:
        self.diffusion.net.to(device)
        if self.classifier is not None:
            self.classifier.net.to(device)
        return self

    def identity(self) -> dict:
        """What the rows record about the networks (and what their cells are keyed by)."""
        c = self.classifier
        return {"diffusion_step": self.diffusion.step, "diffusion_sha": self.diffusion.sha,
                "classifier_step": c.step if c else -1, "classifier_sha": c.sha if c else ""}


def check_compatible(diffusion_hparams: dict, classifier_hparams: dict, classifier_path: str = "") -> None:
    """Guidance is meaningful only if both models share classes, image shape and noise schedule."""
    bad = [f"{k}: diffusion={diffusion_hparams.get(k)!r} classifier={classifier_hparams.get(k)!r}"
           for k in COMPAT_KEYS if diffusion_hparams.get(k) != classifier_hparams.get(k)]
    if bad:
        raise OptionError("sweep.classifier_ckpt", f"the noisy classifier {classifier_path} does not match the "
                          f"diffusion model ({'; '.join(bad)})", "train the classifier on the same data with the "
                          "same --model.init_args.schedule/timesteps (the *_classifier.yaml recipes mirror the "
                          "diffusion recipes)")


def read_checkpoint(path: str | Path, option: str) -> dict:
    """A Lightning checkpoint as plain tensors and containers (weights_only=True: no code runs)."""
    p = Path(path)
    if not p.is_file():
        raise OptionError(option, f"checkpoint {str(path)!r} does not exist",
                          "train one (python -m experiments.train fit --config configs/experiments/...) and pass "
                          "its checkpoints/last.ckpt")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a checkpoint, or holding code objects
        raise OptionError(option, f"checkpoint {p} cannot be read safely ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]})", "point to an intact Lightning .ckpt file; "
                          "re-copy or retrain it") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise OptionError(option, f"{p} is not a Lightning checkpoint of this framework (no state_dict / "
                          "hyper_parameters)", "pass a checkpoints/*.ckpt written by python -m experiments.train")
    return ckpt


def _submodule(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_diffusion(path: str | Path, device: torch.device | str = "cpu") -> Network:
    """The EMA network of a ConditionalDiffusion checkpoint (what generates every evaluation sample)."""
    option = "diffusion checkpoint"
    ckpt = read_checkpoint(path, option)
    hp = dict(ckpt["hyper_parameters"])
    if "p_uncond" not in hp:
        raise OptionError(option, f"{path} holds a {hp.get('_class_path', 'different model')}, not a "
                          "ConditionalDiffusion", "pass the diffusion model's checkpoint")
    net = UNet.from_hparams(hp)
    _load(net, _submodule(ckpt["state_dict"], "ema_net."), path, option)
    return Network(net.to(device), hp, int(ckpt.get("global_step", 0)))


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> Network:
    """The noisy classifier of a NoisyClassifier checkpoint."""
    option = "sweep.classifier_ckpt"
    ckpt = read_checkpoint(path, option)
    hp = dict(ckpt["hyper_parameters"])
    if "pool" not in hp:
        raise OptionError(option, f"{path} is not a NoisyClassifier checkpoint", "pass the classifier's checkpoint")
    net = EncoderClassifier.from_hparams(hp)
    _load(net, _submodule(ckpt["state_dict"], "net."), path, option)
    return Network(net.to(device), hp, int(ckpt.get("global_step", 0)))


def _load(net: nn.Module, state: dict[str, Tensor], path: str | Path, option: str) -> None:
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise OptionError(option, f"the weights in {path} do not fit the network its hyperparameters describe "
                          f"({str(err).splitlines()[0][:200]})", "pass an unmodified checkpoint") from err
