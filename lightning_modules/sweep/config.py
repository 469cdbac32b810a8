"""The sweep's settings: one object from the YAML/command line to the engine, checked before any work.

Every problem is an `OptionError` naming the option (as `sweep.<name>`), what is wrong and the fix, raised
before training or sampling starts: a typo in a scale key or a NaN in a later method's grid must not let
earlier cells sample and write first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from lightning_modules.diffusion import (
    METHODS,
    RULES,
    GuidanceOptions,
    NoiseSchedule,
    OptionError,
    SamplerOptions,
    check_guided_steps,
    make_rule,
    respaced_timesteps,
)

DEFAULT_SCALES = {name: list(rule.default_scales) for name, rule in RULES.items()}  # each method's own grid
EXTRACTORS = ("auto", "evaluator", "inception", "dinov2")
PRECISIONS = ("auto", "32", "bf16")
P = "sweep."  # how options are named in messages: the LightningCLI group and the YAML key


@dataclass
class SweepConfig:
    """A guidance sweep: methods × scales × seeds, each cell `num_samples` images on paired noise.

    Args:
        methods: guidance methods to sweep (one class each, `lightning_modules.diffusion.methods`): cfg, cg_cond,
            cg_uncond, cfg+cg, apg, cfgpp, autoguidance, cg_clean, icg, tsg, pag, seg, autoguidance_degraded,
            cfg_zero_star, fbg, none. Empty = no sweep.
        scales: native scales per method, e.g. {"cfg": [0, 1, 2], "cg_cond": [0, 1]}; a method not named
            keeps its default grid. Keys must be listed in `methods`.
        seeds: sampling seeds; each is a full repeat of every cell (mean ± std over seeds).
        num_samples: images per (method, scale, seed) cell; labels cycle through the classes.
        batch_size: images per sampler call (all scales of a method share chunks).
        sampling: sampler, steps, eta, clip_x0 and compile (see SamplerOptions).
        guidance: options every rule shares (interval, sigma_interval, scale_schedule, cfg_rescale) and each
            method's own, namespaced: guidance.apg.momentum, guidance.cfg_cg.cg_scale, guidance.pag.layers, ...
        classifier_ckpt: noisy-classifier checkpoint for classifier-guided methods.
        guide_ckpt: the weaker diffusion model for autoguidance: a checkpoint path, or snapshot:1/16 (also 1/8,
            1/4) for the guide snapshots the diffusion fit keeps next to its checkpoint.
        clean_classifier_ckpt: a classifier trained on clean images (NoisyClassifier with train_on=clean) for
            cg_clean; never the evaluator that scores the samples.
        trained_ckpts: the diffusion model each trained-in method samples, e.g. {mg: MG.ckpt, gft: GFT.ckpt}
            (trained with --model.init_args.guidance_training mg / gft), so they are swept beside the sweep's own
            model on the same noise; a trained-in method not named here samples the sweep's diffusion model,
            which must then have been trained with its objective.
        extractor: feature network for FID & co: auto (evaluator for digits/MNIST/Fashion-MNIST, Inception
            otherwise), evaluator (trained on the clean data, offline), inception (needs its weights file), dinov2
            (FD_DINOv2: a pretrained DINOv2's CLS features from `dinov2_dir`; no logits, so no score or accuracy).
        extra_extractors: further feature spaces every cell is also scored in, so each paired verdict says
            whether it holds in every space or flips: evaluator-mlp (an MLP evaluator, another architecture
            and seed), evaluator-cnn-seed1 (the main evaluator's CNN, another seed), both trained once and cached;
            dinov2 (FD_DINOv2 beside FID, from `dinov2_dir`).
        inception_weights: local weights-inception-2015-12-05-6726825d.pth (nothing is downloaded).
        dinov2_dir: a local transformers Dinov2Model directory (`save_pretrained`: config.json + model.safetensors,
            e.g. facebook/dinov2-large) for extractor or extra extractor dinov2 (nothing is downloaded).
        reference_split: real-data split the sample statistics are compared with.
        reference_stats: an .npz of precomputed FID statistics (`mu`, `sigma`, as pytorch-fid, clean-fid and EDM
            write them; ADM's reference batches carry them too) that FID is computed against instead of the
            reference split's own. They must be in the extractor's space: Inception-v3 pool features (2048-d,
            --sweep.extractor inception) for the usual files. KID and precision/recall are still computed
            against the split's features; the file's SHA-256 enters every cell's signature.
        cache_dir: where the evaluator and reference features are cached.
        output_dir: where sweep.csv / sweep.json / plots / grids go (default: <run dir>/sweep).
        grid_size: images per cell kept for the sample grids (the first of each cell).
        save_samples: also write every image of every cell as samples/<cell>.npz, ADM-style (uint8 (N, H, W, C)
            `arr_0`, labels `arr_1`), for any external evaluator (`python -m experiments.evaluate` re-scores them
            to the cell's row); the disk cost is printed before sampling. A cell recorded without its file is
            sampled again.
        bootstrap: resamples (random halves of the samples) for every metric's 95% interval over samples per cell
            (0 = none; see docs/conventions.md). Each FID resample is a d×d eigendecomposition: cheap for the
            evaluator's 128-d features, seconds for Inception's 2048-d ones on a CPU (the CIFAR recipe sets 0).
        precision: autocast for sampling: auto (the trainer's), 32 or bf16. Features are always float32.
        every_n_epochs: during fit, sweep every N epochs (0 = never).
        on_fit_end: during fit, sweep once when training ends.
        progress: show a progress bar over all cells and sampling steps, with ETA.
    """

    methods: list[str] = field(default_factory=list)
    scales: dict[str, list[float]] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    num_samples: int = 500
    batch_size: int = 2048
    sampling: SamplerOptions = field(default_factory=lambda: SamplerOptions(steps=25))
    guidance: GuidanceOptions = field(default_factory=GuidanceOptions)
    classifier_ckpt: str | None = None
    guide_ckpt: str | None = None
    clean_classifier_ckpt: str | None = None
    trained_ckpts: dict[str, str] | None = None
    extractor: Literal["auto", "evaluator", "inception", "dinov2"] = "auto"
    extra_extractors: list[str] = field(default_factory=list)
    inception_weights: str | None = None
    dinov2_dir: str | None = None
    reference_split: Literal["train", "val"] = "train"
    reference_stats: str | None = None
    cache_dir: str = ".cache/guidelab"
    output_dir: str | None = None
    grid_size: int = 40
    save_samples: bool = False
    bootstrap: int = 50
    precision: Literal["auto", "32", "bf16"] = "auto"
    every_n_epochs: int = 0
    on_fit_end: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SamplerOptions(**self.sampling)
        if isinstance(self.guidance, dict):
            self.guidance = GuidanceOptions(**self.guidance)
        elif type(self.guidance) is not GuidanceOptions:  # e.g. SharedGuidance: every method's defaults
            from dataclasses import fields

            self.guidance = GuidanceOptions(**{f.name: getattr(self.guidance, f.name) for f in fields(self.guidance)})
        self.methods = list(self.methods)
        self.seeds = list(self.seeds)
        self.check()

    @property
    def grids(self) -> dict[str, list[float]]:
        """The scale grid of every method (given, or its default)."""
        return {m: [float(s) for s in (self.scales or {}).get(m, DEFAULT_SCALES[m])] for m in self.methods}

    def check(self, timesteps: int | None = None, schedule: str | None = None) -> None:
        """Raise OptionError for the first problem; with the model's `timesteps`, check ranges too, and that the
        guidance bands hold some of the sampling steps (the σ band needs the model's noise `schedule` kind too:
        the engine checks it with the model's schedule before it samples)."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or len(set(self.methods)) != len(self.methods):
            raise OptionError(f"{P}methods", f"{self.methods} has unknown or repeated methods {unknown}",
                              f"list each of {list(METHODS)} at most once")
        stray = sorted(set(self.scales or {}) - set(self.methods))
        if stray:
            raise OptionError(f"{P}scales", f"keys {stray} are not among the swept methods {self.methods}",
                              f"fix the spelling, or add them to {P}methods")
        for method, grid in self.grids.items():
            if not grid:
                raise OptionError(f"{P}scales.{method}", "the scale list is empty", "give at least one scale")
            if not all(isinstance(s, (int, float)) and math.isfinite(s) for s in grid):
                raise OptionError(f"{P}scales.{method}", f"{grid} holds a value that is not a finite number",
                                  "give finite numbers")
            if len(set(grid)) != len(grid):
                raise OptionError(f"{P}scales.{method}", f"{grid} repeats a scale", "list each scale once")
            rule = make_rule(method, self.guidance)
            lo, hi = rule.scale_range
            if not all(lo <= v <= hi for v in grid):
                raise OptionError(f"{P}scales.{method}", f"{grid} leaves {method}'s scale range [{lo}, {hi}]",
                                  f"give scales within [{lo}, {hi}]")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise OptionError(f"{P}seeds", f"{self.seeds} is empty or repeats a seed",
                              "give distinct seeds, e.g. [0, 1]")
        for name, value, least in (("num_samples", self.num_samples, 4), ("batch_size", self.batch_size, 1),
                                   ("grid_size", self.grid_size, 1), ("every_n_epochs", self.every_n_epochs, 0),
                                   ("bootstrap", self.bootstrap, 0)):
            if not isinstance(value, int) or value < least:
                raise OptionError(f"{P}{name}", f"{value!r} is below {least}",
                                  "precision/recall (k = 3 neighbours) need at least 4 samples per cell"
                                  if name == "num_samples"
                                  else f"give an integer >= {least}")
        if self.extractor not in EXTRACTORS:
            raise OptionError(f"{P}extractor", f"unknown extractor {self.extractor!r}",
                              f"choose one of {list(EXTRACTORS)}")
        if self.precision not in PRECISIONS:
            raise OptionError(f"{P}precision", f"unknown precision {self.precision!r}",
                              f"choose one of {list(PRECISIONS)}")
        if self.reference_split not in ("train", "val"):
            raise OptionError(f"{P}reference_split", f"unknown split {self.reference_split!r}", "use train or val")
        if self.reference_stats is not None:  # the file itself here; its dimension against the extractor's later
            from lightning_modules.evaluation.sample_files import read_statistics

            read_statistics(self.reference_stats, f"{P}reference_stats")
        from .evaluation import EXTRA_EXTRACTORS  # late: evaluation imports the metric stack

        unknown = [name for name in self.extra_extractors if name not in EXTRA_EXTRACTORS]
        if unknown:
            raise OptionError(f"{P}extra_extractors", f"unknown extra extractor(s) {unknown}",
                              f"use any of {list(EXTRA_EXTRACTORS)}, or []")
        if "dinov2" in (self.extractor, *self.extra_extractors) and not self.dinov2_dir:
            # The directory's files are checked with the other extractors' (check_extractor_available).
            raise OptionError(f"{P}dinov2_dir", "the DINOv2 extractor needs a local model directory",
                              "pass --sweep.dinov2_dir DIR, a transformers Dinov2Model saved with save_pretrained")
        self.sampling.check(timesteps, prefix=f"{P}sampling.")
        self.guidance.check(timesteps, prefix=f"{P}guidance.")
        if timesteps is not None and any(m != "none" for m in self.methods):  # 'none' ignores the bands
            check_guided_steps(self.guidance, timesteps, self.sampling.steps,
                               None if schedule is None else NoiseSchedule(schedule, timesteps), f"{P}guidance.")
        if timesteps is not None and schedule is not None:  # a rule that derives settings from the steps (FBG)
            ts = respaced_timesteps(timesteps, self.sampling.steps)
            for rule in self.rules().values():
                rule.prepare(NoiseSchedule(schedule, timesteps), list(zip(ts, ts[1:] + [-1])))
        trained_in = [m for m, rule in RULES.items() if rule.trained_with]
        stray = sorted(set(self.trained_ckpts or {}) - (set(trained_in) & set(self.methods)))
        if stray:
            raise OptionError(f"{P}trained_ckpts", f"keys {stray} are not trained-in methods among the swept ones "
                              f"{self.methods}", f"name only swept methods of {trained_in}, each with its "
                              "model's checkpoint")
        if self.needs_guide and not self.guide_ckpt:
            raise OptionError(f"{P}guide_ckpt", "autoguidance needs a guide network",
                              "pass --sweep.guide_ckpt=snapshot:1/16 (a snapshot the diffusion fit kept) or a path "
                              "to a weaker diffusion model's checkpoint")
        if self.needs_clean_classifier and not self.clean_classifier_ckpt:
            raise OptionError(f"{P}clean_classifier_ckpt", "cg_clean needs a classifier trained on clean images",
                              "train one (configs/experiments/digits_clean_classifier.yaml) and pass its checkpoint")
        if self.needs_classifier and not self.classifier_ckpt:
            raise OptionError(f"{P}classifier_ckpt", f"methods {self.methods} take classifier gradients",
                              "pass a noisy-classifier checkpoint: --sweep.classifier_ckpt=PATH/last.ckpt")

    def rules(self) -> dict:
        """The rule object of every swept method."""
        return {m: make_rule(m, self.guidance) for m in self.methods}

    @property
    def needs_guide(self) -> bool:
        return any(rule.uses_guide for rule in self.rules().values())

    @property
    def needs_classifier(self) -> bool:
        return any(rule.gradient_at == "x_t" and rule.needs_gradient(s)
                   for (m, grid), rule in zip(self.grids.items(), self.rules().values()) for s in grid)

    @property
    def needs_clean_classifier(self) -> bool:
        return any(rule.gradient_at == "x0" for rule in self.rules().values())
