"""The networks a sweep samples with, and their identities.

A network is identified by a content hash of its weights (never a path or a step counter: in `validate` a
module's global_step is 0, and a file path says nothing about what is in it). How they are read from
checkpoints: `loading.py`.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_modules.diffusion import NoiseSchedule, OptionError, classifier_grad, clean_log_prob
from lightning_modules.diffusion.guidance import GradFn, LogProbFn
from lightning_modules.diffusion.guidance_training import cost_totals, objective_text

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
    training_cost: dict | None = None  # the checkpoint's `training_cost` (None: not recorded, e.g. diffusers)

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
    # Per trained-in method (mg, gft; `sweep.trained_ckpts`): the diffusion model its cells sample instead.
    trained: dict[str, Network] = field(default_factory=dict)
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
            if self.guide.sha == self.diffusion.sha:
                # ε_g = ε_c: every autoguidance scale would sample the plain conditional model.
                raise OptionError("sweep.guide_ckpt", f"the guide's weights equal the diffusion model's (sha "
                                  f"{self.guide.sha}), so autoguidance would be the conditional model at every "
                                  "scale", "pass a weaker model of the same data: an earlier snapshot such as "
                                  "--sweep.guide_ckpt=snapshot:1/16, or a smaller model's checkpoint")
        if self.clean_classifier is not None:
            check_clean(hp, self.clean_classifier.hparams)
        for method, network in self.trained.items():
            check_compatible(hp, network.hparams, what=f"{method} model", option=f"sweep.trained_ckpts.{method}")
        self._flops: dict[str, float] | None = None
        # The clean classifier's log p(y | x̂0, τ): one function per sweep, so a compiled step is traced once.
        self.clean_log_prob: LogProbFn | None = None if self.clean_classifier is None \
            else clean_log_prob(self.clean_classifier.net)

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
            for method, network in self.trained.items():
                counts[f"trained:{method}"] = _count(lambda net=network.net: net(x, t, y)) / 2
            self._flops = counts
        return self._flops

    def unet_equivalents(self, nfe: float, classifier_passes: float, guide_evals: float,
                         classifier: str = "classifier", extra_per_pass: float = 0.0, method: str = "") -> float:
        """A cell's cost per sample in main-network evaluations, the other passes converted by their FLOPs
        (`classifier`: whose passes they are, classifier or clean; `extra_per_pass`: main-network evaluations
        each pass also costs, as the rule's `gradient_cost` says: ≈ 3 for a gradient through the network;
        `method`: a trained-in method's evaluations are of its own network, converted too)."""
        f = self.flops()
        per_pass = f.get(classifier, 0.0) / f["diffusion"] + extra_per_pass
        own = f.get(f"trained:{method}", f["diffusion"]) / f["diffusion"]
        return nfe * own + classifier_passes * per_pass + guide_evals * f.get("guide", 0.0) / f["diffusion"]

    def network_for(self, method: str) -> Network:
        """The diffusion network `method`'s cells sample: its own trained-in model, else the sweep's."""
        return self.trained.get(method, self.diffusion)

    def decode(self, samples: Tensor) -> Tensor:
        """What the sampler produced → the images that grids and features see: the diffusion network's own
        `decode` step where it has one (a latent model's VAE decoder; `networks.diffusers_unet`), else the samples
        themselves (every pixel-space model)."""
        decode = getattr(self.diffusion.net, "decode", None)
        return samples if decode is None else decode(samples)

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

    def to(self, device: torch.device | str | torch.dtype) -> SweepModels:
        """Every network it holds, moved in place (the guide and the clean classifier too: a step mixes them)."""
        for network in (self.diffusion, self.classifier, self.guide, self.clean_classifier, *self.trained.values()):
            if network is not None:
                network.net.to(device)
        return self

    def identity(self, method: str = "") -> dict:
        """What the rows of `method` record about the networks (and what their cells are keyed by): the diffusion
        network it samples (`network_for`), how it was trained and at what cost (`training_*`: its objective, and
        its steps, FLOPs and wall seconds with those of any checkpoint it was fine-tuned from), and the helpers."""
        c, g, k, d = self.classifier, self.guide, self.clean_classifier, self.network_for(method)
        cost = cost_totals(d.training_cost)
        return {"diffusion_step": d.step, "diffusion_sha": d.sha, "training_objective": objective_text(d.hparams),
                "training_steps": cost["steps"], "training_flops": cost["flops"], "training_seconds": cost["seconds"],
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


# What torch's own messages advise (re-run with weights_only=False, allowlist globals) could run a crafted
# file's code: users see only these short reasons and the project's fix.
