"""Loading a sweep's networks from Lightning checkpoints: tensors only (`weights_only=True`, so no code runs
from a file), each checked against the diffusion model, every problem an OptionError naming the option and
the file, before any sampling. A diffusers model directory as the diffusion model or guide: `diffusers_models`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_modules.diffusion import OptionError
from lightning_modules.networks import EncoderClassifier, UNet
from lightning_modules.sweep.config import SweepConfig

from .diffusers_models import is_diffusers_dir, load_diffusers
from .models import Network, check_clean, check_compatible

_UNSAFE = "it holds Python objects that are not plain tensors/containers (refused: loading them could run code)"
_TRUNCATED = "it is empty or truncated (an interrupted save or a full disk)"
_NOT_TORCH = "it is not a torch checkpoint, or its bytes are corrupt"


def load_problem(err: BaseException) -> str:
    """Why torch.load(weights_only=True) failed, in one short line, without torch's unsafe advice."""
    text = str(err)
    if isinstance(err, EOFError) or "central directory" in text or "unexpected EOF" in text.lower():
        return _TRUNCATED
    if "Unsupported operand" in text or "invalid load key" in text:
        return _NOT_TORCH
    if "Unsupported global" in text:  # name what was refused: `GLOBAL builtins.getattr was not an allowed ...`
        name = text.split("Unsupported global:", 1)[1].split()[:2]
        return f"{_UNSAFE[:-1]}; e.g. {' '.join(name)})"
    if "weights only load failed" in text.lower():
        return _UNSAFE
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return f"{type(err).__name__}: {(lines or ['no message'])[0][:200]}"


def load_weights_only(path: str | Path, option: str, map_location: object = "cpu") -> object:
    """torch.load(path, weights_only=True) of a local file; any problem is an OptionError naming `option`,
    the file and the fix (URLs are refused: download the file and pass it)."""
    if "://" in str(path):
        raise OptionError(option, f"{str(path)!r} is a URL; checkpoints are read from local files only (a "
                          "downloaded checkpoint is otherwise unpickled unchecked, which can run code)",
                          "download it, check where it came from, and pass the local file")
    p = Path(path)
    if not p.is_file():
        raise OptionError(option, f"checkpoint {str(path)!r} does not exist",
                          "train one (python -m experiments.train fit --config configs/experiments/...) and pass "
                          "its checkpoints/last.ckpt")
    if p.stat().st_size == 0:
        raise OptionError(option, f"checkpoint {p} is empty (0 bytes: an interrupted save or a full disk)",
                          "re-copy it, or pass an intact checkpoint (e.g. an earlier one of the run, or retrain)")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated, not a checkpoint, or holding code objects
        problem = load_problem(err)
        unsafe = problem.startswith(_UNSAFE[:-1])
        fix = ("pass a checkpoint written by python -m experiments.train, from a source you trust" if unsafe
               else "point to an intact Lightning .ckpt file; re-copy or retrain it")
        # `from None`: a traceback must not show torch's message (its advice is the unsafe load).
        raise OptionError(option, f"checkpoint {p} cannot be read safely: {problem}", fix) from None


def read_checkpoint(path: str | Path, option: str) -> dict:
    """A Lightning checkpoint as plain tensors and containers (weights_only=True: no code runs)."""
    ckpt = load_weights_only(path, option)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise OptionError(option, f"{path} is not a Lightning checkpoint of this framework (no state_dict / "
                          "hyper_parameters)", "pass a checkpoints/*.ckpt written by python -m experiments.train")
    return ckpt


def _submodule(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_diffusion(path: str | Path, device: torch.device | str = "cpu", option: str = "diffusion checkpoint",
                   num_classes: int | None = None) -> Network:
    """The EMA network of a ConditionalDiffusion checkpoint (what generates every evaluation sample), or a diffusers
    model directory (`diffusers_models.load_diffusers`; `num_classes`: the data set's, which an unconditional
    diffusers model needs and a conditional one must match; a checkpoint records its own)."""
    if is_diffusers_dir(path):
        return load_diffusers(path, device, option, num_classes)
    ckpt = read_checkpoint(path, option)
    hp = dict(ckpt["hyper_parameters"])
    if "p_uncond" not in hp:
        raise OptionError(option, f"{path} holds a {hp.get('_class_path', 'different model')}, not a "
                          "ConditionalDiffusion", "pass the diffusion model's checkpoint")
    net = UNet.from_hparams(hp)
    _load(net, _submodule(ckpt["state_dict"], "ema_net."), path, option)
    return Network(net.to(device), hp, int(ckpt.get("global_step", 0)), training_cost=ckpt.get("training_cost"))


def load_trained_networks(config: SweepConfig, diffusion_hparams: dict, device: torch.device | str = "cpu"
                          ) -> dict[str, Network]:
    """The diffusion model of each trained-in method `sweep.trained_ckpts` names (mg, gft), checked against the
    sweep's diffusion model (classes, image shape, schedule) and against the method (trained with its objective),
    before any sampling."""
    out = {}
    for method, path in (config.trained_ckpts or {}).items():
        option = f"sweep.trained_ckpts.{method}"
        network = load_diffusion(path, device, option=option, num_classes=diffusion_hparams.get("num_classes"))
        check_compatible(diffusion_hparams, network.hparams, str(path), f"{method} model", option)
        trained = network.hparams.get("guidance_training", "none")
        if trained != method:
            raise OptionError(option, f"{path} was trained with guidance_training {trained}, not {method}",
                              f"pass a model trained with --model.init_args.guidance_training {method}")
        out[method] = network
    return out


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
    snapshot = config.guide_ckpt.startswith("snapshot:")
    if snapshot and diffusion_ckpt is not None and is_diffusers_dir(diffusion_ckpt):
        raise OptionError("sweep.guide_ckpt", f"{config.guide_ckpt} names a guide snapshot that a diffusion fit here "
                          f"keeps beside its checkpoint; the diffusers model {diffusion_ckpt} has none",
                          "pass a weaker model of the same data: another diffusers directory or a .ckpt")
    if snapshot and not path.exists():
        if allow_missing_snapshot:
            return None
        fraction = config.guide_ckpt.split(":", 1)[1]
        raise OptionError("sweep.guide_ckpt", f"{config.guide_ckpt} is the guide snapshot {path}, which does not "
                          f"exist (callbacks.GuideSnapshots saves it beside the fit's checkpoints once the fit "
                          f"reaches {fraction} of trainer.max_steps)", "pass the checkpoint of a diffusion fit that "
                          f"got that far with GuideSnapshots listing {fraction} (configs/experiments/"
                          "digits_diffusion.yaml does), or a guide checkpoint file: --sweep.guide_ckpt PATH")
    guide = load_diffusion(path, device, option="sweep.guide_ckpt", num_classes=diffusion_hparams.get("num_classes"))
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
