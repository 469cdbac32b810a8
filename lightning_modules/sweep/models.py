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

from lightning_modules.diffusion import NoiseSchedule, OptionError, classifier_grad, clean_log_prob
from lightning_modules.diffusion.guidance import GradFn, LogProbFn
from lightning_modules.networks import EncoderClassifier, UNet
from lightning_modules.sweep.config import SweepConfig

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
    guide: Network | None = None  # a weaker diffusion model of the same data (autoguidance)
    clean_classifier: Network | None = None  # trained on clean images, applied to x̂0 (cg_clean)
    schedule: NoiseSchedule = field(init=False)
    grad_fn: GradFn | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        hp = self.diffusion.hparams
        self.schedule = NoiseSchedule(hp["schedule"], hp["timesteps"])
        if self.classifier is not None:
            check_compatible(hp, self.classifier.hparams)
            # One gradient function for the whole sweep, so a compiled step is traced once.
            self.grad_fn = functools.partial(classifier_grad, self.classifier.net)
        if self.guide is not None:
            check_compatible(hp, self.guide.hparams, what="guide", option="sweep.guide_ckpt")
        if self.clean_classifier is not None:
            check_clean(hp, self.clean_classifier.hparams)
        self._flops: dict[str, float] | None = None
        self._log_probs: dict[float, LogProbFn] = {}

    def clean_log_prob(self, temperature: float) -> LogProbFn | None:
        """The clean classifier's log p(y | x̂0) at this temperature (one function per sweep: compiled once)."""
        if self.clean_classifier is None:
            return None
        if temperature not in self._log_probs:
            self._log_probs[temperature] = clean_log_prob(self.clean_classifier.net, temperature)
        return self._log_probs[temperature]

    def flops(self) -> dict[str, float]:
        """FLOPs per sample of one main-network evaluation, one guide evaluation and one classifier forward +
        backward (torch.utils.flop_counter: matmuls, convolutions, attention), counted once."""
        if self._flops is None:
            x = torch.zeros(2, *self.shape, device=self.device)
            t = torch.full((2,), self.schedule.timesteps // 2, device=self.device)
            y = torch.zeros(2, dtype=torch.long, device=self.device)
            counts = {"diffusion": _count(lambda: self.diffusion.net(x, t, y)) / 2}
            if self.guide is not None:
                counts["guide"] = _count(lambda: self.guide.net(x, t, y)) / 2
            if self.classifier is not None:
                counts["classifier"] = _count(lambda: _input_gradient(self.classifier.net, x, t)) / 2
            if self.clean_classifier is not None:
                counts["clean"] = _count(lambda: _input_gradient(self.clean_classifier.net, x, t * 0)) / 2
            self._flops = counts
        return self._flops

    def unet_equivalents(self, nfe: float, classifier_passes: float, guide_evals: float, clean: bool = False,
                         exact: bool = False) -> float:
        """A cell's cost per sample in main-network evaluations, the other passes converted by their FLOPs
        (`clean`: the passes are the clean classifier's; `exact`: each also runs the network forward and
        backward, ≈ 3 evaluations)."""
        f = self.flops()
        per_pass = f.get("clean" if clean else "classifier", 0.0) / f["diffusion"] + (3.0 if exact else 0.0)
        return nfe + classifier_passes * per_pass + guide_evals * f.get("guide", 0.0) / f["diffusion"]

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
        c, g, k = self.classifier, self.guide, self.clean_classifier
        return {"diffusion_step": self.diffusion.step, "diffusion_sha": self.diffusion.sha,
                "classifier_step": c.step if c else -1, "classifier_sha": c.sha if c else "",
                "guide_step": g.step if g else -1, "guide_sha": g.sha if g else "",
                "clean_classifier_step": k.step if k else -1, "clean_classifier_sha": k.sha if k else ""}


def _input_gradient(net: nn.Module, x: Tensor, t: Tensor) -> None:
    # Forward and backward to the input, as classifier guidance does (`.backward()`: the FLOP counter does
    # not follow `torch.autograd.grad`).
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        net(x_in, t).float().logsumexp(-1).sum().backward()


def _count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def check_compatible(diffusion_hparams: dict, other_hparams: dict, path: str = "", what: str = "noisy classifier",
                     option: str = "sweep.classifier_ckpt") -> None:
    """Guidance is meaningful only if both models share classes, image shape and noise schedule."""
    bad = [f"{k}: diffusion={diffusion_hparams.get(k)!r} {what}={other_hparams.get(k)!r}"
           for k in COMPAT_KEYS if diffusion_hparams.get(k) != other_hparams.get(k)]
    if bad:
        raise OptionError(option, f"the {what} {path} does not match the diffusion model ({'; '.join(bad)})",
                          f"train the {what} on the same data with the same --model.init_args.schedule/timesteps "
                          "(the recipes in configs/experiments/ mirror each other)")


def check_clean(diffusion_hparams: dict, hparams: dict, path: str = "") -> None:
    """A cg_clean classifier must be trained on clean images of the same classes and image shape."""
    if hparams.get("train_on", "noisy") != "clean":
        raise OptionError("sweep.clean_classifier_ckpt", f"{path} is a noisy classifier (train_on=noisy)",
                          "train one with --model.init_args.train_on clean (configs/experiments/"
                          "digits_clean_classifier.yaml) and pass its checkpoint")
    bad = [k for k in ("num_classes", "image_size", "channels") if diffusion_hparams.get(k) != hparams.get(k)]
    if bad:
        raise OptionError("sweep.clean_classifier_ckpt", f"the clean classifier {path} differs from the diffusion "
                          f"model in {bad}", "train it on the same data")


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


def load_diffusion(path: str | Path, device: torch.device | str = "cpu", option: str = "diffusion checkpoint"
                   ) -> Network:
    """The EMA network of a ConditionalDiffusion checkpoint (what generates every evaluation sample)."""
    ckpt = read_checkpoint(path, option)
    hp = dict(ckpt["hyper_parameters"])
    if "p_uncond" not in hp:
        raise OptionError(option, f"{path} holds a {hp.get('_class_path', 'different model')}, not a "
                          "ConditionalDiffusion", "pass the diffusion model's checkpoint")
    net = UNet.from_hparams(hp)
    _load(net, _submodule(ckpt["state_dict"], "ema_net."), path, option)
    return Network(net.to(device), hp, int(ckpt.get("global_step", 0)))


def resolve_guide(guide: str, diffusion_ckpt: str | Path) -> Path:
    """`snapshot:1/16` → the guide snapshot the diffusion fit saved next to `diffusion_ckpt`; else a path."""
    if not guide.startswith("snapshot:"):
        return Path(guide)
    fraction = guide.split(":", 1)[1].replace("/", "of")
    return Path(diffusion_ckpt).parent / f"guide-{fraction}.ckpt"


def load_guide(config: SweepConfig, diffusion_hparams: dict, diffusion_ckpt: str | Path | None,
               device: torch.device | str = "cpu", allow_missing_snapshot: bool = False) -> Network | None:
    """The guide autoguidance needs (None if no method does), checked against the diffusion model.

    `diffusion_ckpt`: where the diffusion checkpoint is (or will be written); a `snapshot:1/16` guide lies next
    to it. `allow_missing_snapshot`: a snapshot the running fit has not written yet gives None (load it again at
    sweep time) instead of an error."""
    if not config.needs_guide:
        return None
    path = resolve_guide(config.guide_ckpt, diffusion_ckpt)
    if allow_missing_snapshot and config.guide_ckpt.startswith("snapshot:") and not path.exists():
        return None
    guide = load_diffusion(path, device, option="sweep.guide_ckpt")
    check_compatible(diffusion_hparams, guide.hparams, str(path), "guide", "sweep.guide_ckpt")
    return guide


def load_helper_networks(config: SweepConfig, diffusion_hparams: dict, diffusion_ckpt: str | Path | None,
                         device: torch.device | str = "cpu", allow_missing_snapshot: bool = False
                         ) -> tuple[Network | None, Network | None, Network | None]:
    """(noisy classifier, guide, clean classifier) as the config asks for them, None where it does not, each
    checked against the diffusion model's hyperparameters: an OptionError naming the option before any
    sampling, not a failure (or silently wrong samples) deep inside it. The guide's arguments: `load_guide`."""
    classifier = clean = None
    if config.classifier_ckpt:  # loaded whenever given: the rows record it even for classifier-free methods
        classifier = load_classifier(config.classifier_ckpt, device)
        check_compatible(diffusion_hparams, classifier.hparams, config.classifier_ckpt)
    if config.needs_clean_classifier:
        clean = load_classifier(config.clean_classifier_ckpt, device, option="sweep.clean_classifier_ckpt")
        check_clean(diffusion_hparams, clean.hparams, config.clean_classifier_ckpt)
    guide = load_guide(config, diffusion_hparams, diffusion_ckpt, device, allow_missing_snapshot)
    return classifier, guide, clean


def load_classifier(path: str | Path, device: torch.device | str = "cpu", option: str = "sweep.classifier_ckpt"
                    ) -> Network:
    """The classifier of a NoisyClassifier checkpoint (noisy, or trained on clean images for cg_clean)."""
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
