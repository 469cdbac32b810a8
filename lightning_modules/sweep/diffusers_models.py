"""Diffusers model directories as a sweep's diffusion network or autoguidance guide: JSON configs and safetensors
only (nothing executes from the files), every problem an OptionError naming the option, the file and the key,
before any sampling.

A directory holds a `UNet2DModel` saved with `save_pretrained` (config.json + diffusion_pytorch_model.safetensors),
directly or in `unet/` as a pipeline saves it, and the scheduler config it was trained with (scheduler_config.json,
directly or in `scheduler/`). The scheduler config gives the noise schedule and the prediction type; its sampling
settings (timestep_spacing, steps_offset, clip_sample, set_alpha_to_one, ...) are not the model's and are not read:
the sweep's own `--sweep.sampling.*` decide how it samples (DDIM-n here walks `respaced_timesteps`, 999 → 0 with
the last step to ᾱ = 1, which diffusers' DDIM spacings match only on the full chain).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from lightning_modules.diffusion import OptionError
from lightning_modules.diffusion.schedule import beta_range_kind, make_betas
from lightning_modules.networks.diffusers_unet import DiffusersUNet

from .models import Network, weights_hash

UNET_CONFIG, WEIGHTS, SCHEDULER_CONFIG = "config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}  # diffusers' prediction_type → this framework's prediction
NETWORK = "diffusers.UNet2DModel"
_SAVE = "save the model with UNet2DModel.save_pretrained(DIR) and its scheduler with scheduler.save_pretrained(DIR)"


def is_diffusers_dir(path: str | Path) -> bool:
    """A local directory (a diffusers model) rather than a checkpoint file."""
    return "://" not in str(path) and Path(path).is_dir()


def _read_json(path: Path, option: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OptionError(option, f"{path} cannot be read as JSON ({err})", f"re-copy it, or {_SAVE}") from None
    if not isinstance(value, dict):
        raise OptionError(option, f"{path} is not a JSON object", _SAVE)
    return value


def unet_dir(path: str | Path, option: str) -> Path:
    """The folder holding the UNet's config.json: the directory itself, or its `unet/` (a saved pipeline)."""
    root = Path(path)
    for folder in (root, root / "unet"):
        if (folder / UNET_CONFIG).is_file():
            return folder
    raise OptionError(option, f"{root} holds no {UNET_CONFIG} (nor unet/{UNET_CONFIG}): it is not a diffusers model "
                      "directory", f"pass a ConditionalDiffusion .ckpt, or a directory written by save_pretrained "
                      f"({_SAVE})")


def scheduler_config(path: str | Path, option: str) -> tuple[dict, Path]:
    """The scheduler config saved with the model: DIR/scheduler_config.json or DIR/scheduler/ (a pipeline's)."""
    root = Path(path)
    candidates = [root / SCHEDULER_CONFIG, root / "scheduler" / SCHEDULER_CONFIG]
    for file in candidates:
        if file.is_file():
            return _read_json(file, option), file
    raise OptionError(option, f"{root} has no scheduler config (looked for {', '.join(map(str, candidates))}); the "
                      "noise schedule and the prediction type of the model come from it",
                      "save the scheduler the model was trained with beside it, e.g. DDPMScheduler(beta_schedule="
                      "'linear', num_train_timesteps=1000).save_pretrained(DIR)")


def schedule_from_config(cfg: dict, where: Path, option: str) -> tuple[str, int, str]:
    """(schedule kind, timesteps, prediction) of this framework from a diffusers scheduler config.

    beta_schedule linear → 'linear' where β_start, β_end are this framework's (1e-4, 0.02)·1000/T, else the range
    'linear(β_start,β_end)'; scaled_linear → 'scaled_linear(β_start,β_end)'; squaredcos_cap_v2 → 'cosine' (the same
    formula). A noisy classifier trained here on that kind and T is then compatible with the model.
    """
    def bad(key: str, problem: str, fix: str) -> OptionError:
        return OptionError(option, f"{where}: `{key}` {problem}", fix)

    if cfg.get("trained_betas") is not None:
        raise bad("trained_betas", "lists the betas outright, which this framework does not take",
                  "use a scheduler config with beta_schedule linear, scaled_linear or squaredcos_cap_v2")
    if cfg.get("rescale_betas_zero_snr"):
        raise bad("rescale_betas_zero_snr", "is true (zero terminal SNR): not supported", "sweep a model trained "
                  "without it")
    variance = str(cfg.get("variance_type") or "fixed_small")
    if variance.startswith("learned"):
        raise bad("variance_type", f"is {variance!r}: a learned variance is not supported (samplers here use fixed "
                  "variances)", "sweep a model with a fixed variance (fixed_small)")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise bad("prediction_type", f"is {prediction!r}; supported: {sorted(PREDICTIONS)}",
                  "sweep an ε- or v-prediction model")
    timesteps, kind = cfg.get("num_train_timesteps"), cfg.get("beta_schedule")
    if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 2:
        raise bad("num_train_timesteps", f"is {timesteps!r}, not an integer >= 2", "give the training timesteps")
    if kind == "squaredcos_cap_v2":
        schedule = "cosine"
    elif kind in ("linear", "scaled_linear"):
        start, end = cfg.get("beta_start"), cfg.get("beta_end")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (start, end)):
            raise bad("beta_start/beta_end", f"are {start!r}, {end!r}: not numbers", "give both")
        ours = 1000.0 / timesteps
        same = math.isclose(start, 1e-4 * ours, rel_tol=1e-9) and math.isclose(end, 0.02 * ours, rel_tol=1e-9)
        schedule = "linear" if kind == "linear" and same else beta_range_kind(kind, start, end)
        try:
            make_betas(schedule, timesteps)
        except ValueError as err:
            raise bad("beta_start/beta_end", str(err), "give 0 < beta_start <= beta_end < 1") from None
    else:
        raise bad("beta_schedule", f"is {kind!r}; supported: linear, scaled_linear, squaredcos_cap_v2 (a discrete "
                  "DDPM-family schedule; flow-matching and EDM schedulers are not)", "sweep a model trained on one of "
                  "those")
    return schedule, timesteps, PREDICTIONS[prediction]


def diffusers_hparams(path: str | Path, option: str, num_classes: int | None = None) -> dict:
    """This framework's hyperparameters of a diffusers model directory (what `check_compatible` compares), from its
    JSON configs alone. `num_classes`: the data set's (needed for an unconditional model, which has no classes;
    a class-conditional one must have num_classes + 1 class embeddings, the last being the null label)."""
    folder = unet_dir(path, option)
    cfg, where = _read_json(folder / UNET_CONFIG, option), folder / UNET_CONFIG
    if cfg.get("_class_name") != "UNet2DModel":
        raise OptionError(option, f"{where} describes a {cfg.get('_class_name')!r}; only UNet2DModel (a pixel-space "
                          "UNet) is supported, not latent or text-conditioned models yet",
                          "pass a UNet2DModel directory or a ConditionalDiffusion .ckpt")
    size, channels = cfg.get("sample_size"), cfg.get("in_channels", 3)
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise OptionError(option, f"{where}: `sample_size` is {cfg.get('sample_size')!r}, not one square side",
                          "sweep a model of square images with an integer sample_size")
    if cfg.get("out_channels", 3) != channels:
        raise OptionError(option, f"{where}: `out_channels` = {cfg.get('out_channels')} but in_channels = {channels} "
                          "(2x: a learned variance, not supported)", "sweep an ε- or v-prediction model with "
                          "out_channels = in_channels")
    if cfg.get("time_embedding_type", "positional") == "fourier":
        raise OptionError(option, f"{where}: `time_embedding_type` is 'fourier' (a score-SDE model of continuous "
                          "noise levels), not a discrete-time DDPM model", "sweep a model with positional time "
                          "embeddings")
    embeds, embed_type = cfg.get("num_class_embeds"), cfg.get("class_embed_type")
    if embed_type is not None:
        raise OptionError(option, f"{where}: `class_embed_type` is {embed_type!r}: its class input is not a label "
                          "index", "sweep a model with num_class_embeds = classes + 1 and class_embed_type null, "
                          "or an unconditional one")
    if embeds is None and num_classes is None:
        raise OptionError(option, f"{folder} is an unconditional model (no class embedding), so the number of "
                          "classes comes from the data set", "pass the data set it was trained on (--dataset)")
    too_few = num_classes is None and embeds is not None and embeds < 3  # fewer than 2 classes + the null label
    if too_few or (embeds is not None and num_classes is not None and embeds != num_classes + 1):
        wanted = "classes + 1" if num_classes is None else num_classes + 1
        raise OptionError(option, f"{where}: `num_class_embeds` = {embeds}, but this framework needs one row per "
                          f"class plus the null label (index num_classes): {wanted} rows"
                          + ("" if num_classes is None else f" for the data set's {num_classes} classes"),
                          "pass the data set the model was trained on (--dataset), or a model with that class "
                          "embedding (a class-conditional UNet2DModel trained with label dropout to the last row)")
    schedule, timesteps, prediction = schedule_from_config(*scheduler_config(path, option), option)
    return {"num_classes": embeds - 1 if embeds is not None else num_classes, "image_size": size,
            "channels": channels, "schedule": schedule, "timesteps": timesteps, "prediction": prediction,
            "conditional": embeds is not None, "perturbable": False, "network": NETWORK}


def model_hash(unet: torch.nn.Module, hparams: dict) -> str:
    """The weights' content hash (`weights_hash`) with what the scheduler config makes of them: the same weights
    under another schedule or prediction type are another model, so none of their cells may be reused."""
    spec = {"weights": weights_hash(unet), **{k: hparams[k] for k in ("schedule", "timesteps", "prediction")}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def load_diffusers(path: str | Path, device: torch.device | str = "cpu", option: str = "diffusion",
                   num_classes: int | None = None) -> Network:
    """A diffusers UNet2DModel directory as a sweep network (`DiffusersUNet`), with its hyperparameters and
    identity. It records no training step: its rows say step 0."""
    hp = diffusers_hparams(path, option, num_classes)
    folder = unet_dir(path, option)
    if not (folder / WEIGHTS).is_file() and not (folder / f"{WEIGHTS}.index.json").is_file():
        pickled = (folder / "diffusion_pytorch_model.bin").is_file()
        raise OptionError(option, f"{folder} has no {WEIGHTS}" + (" (only a pickled .bin, refused: loading it could "
                          "run code)" if pickled else ""), "convert it to safetensors from a source you trust "
                          "(UNet2DModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True))")
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise OptionError(option, f"{path} is a diffusers model, but diffusers is not installed",
                          'pip install -e ".[bench]"') from None
    try:  # reads config.json and the safetensors only; local files only, nothing is downloaded
        unet, info = UNet2DModel.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                 low_cpu_mem_usage=False, output_loading_info=True)
    except Exception as err:  # a config that does not build, or weights that are truncated or corrupt
        lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        raise OptionError(option, f"the diffusers model in {folder} cannot be loaded: {lines[0][:200]}",
                          f"re-copy it, or {_SAVE}") from None
    unfit = {k: v for k, v in info.items() if k != "error_msgs" and v} | ({"errors": info["error_msgs"]}
                                                                          if info.get("error_msgs") else {})
    if unfit:
        raise OptionError(option, f"the weights in {folder} do not fit its {UNET_CONFIG} ({str(unfit)[:200]})",
                          "pass an unmodified model directory")
    unet = unet.float()  # weights saved in half precision sample in float32 (autocast decides any bf16)
    return Network(DiffusersUNet(unet, hp["conditional"]).to(device), hp, 0, model_hash(unet, hp))
