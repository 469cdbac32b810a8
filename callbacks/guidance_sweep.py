"""The guidance sweep: CFG and classifier guidance over scale grids, scored with FID and friends,
written to sweep.csv/json and PNG plots as cells finish, and logged to W&B.

All scales of one method run as one batched pass (per-sample scale vectors), every cell starts
from the same per-sample noise (paired evaluation), samples come from the EMA weights, and
under DDP the samples are split across ranks and the features summed back exactly.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from torchvision.utils import make_grid, save_image

from lightning_modules.diffusion import METHODS, gamma, guidance_cost, method_scales, sample_keys
from lightning_modules.diffusion.samplers import COMPILE_MODES

from . import sweep_setup as setup_
from .run_dir import run_dir
from .sweep_io import SweepTable, format_table
from .sweep_plots import METRICS, log_to_wandb, save_plots

DEFAULT_SCALES = {"cfg": [0.0, 1.0, 1.5, 2.0, 3.0, 5.0], "cg_cond": [0.0, 0.5, 1.0, 2.0, 4.0],
                  "cg_uncond": [0.0, 1.0, 2.0, 4.0, 8.0, 16.0], "cfg+cg": [1.0, 2.0, 3.0], "none": [1.0]}
PRINT_COLUMNS = ["method", "scale", "gamma", "seed", "fid", "kid", "score", "precision", "recall", "accuracy",
                 "nfe_per_sample", "classifier_grads_per_sample", "seconds"]


class GuidanceSweep(Callback):
    """Sweep guidance methods × scales × seeds on the diffusion module being trained or evaluated.

    Runs every `every_n_epochs` during fit (0 = never), at the end of fit (`on_fit_end`), and in
    `validate` / `test`. Sampling knobs live here, never in the model's hyperparameters. With no
    `methods` it does nothing (the CLI always adds it; configs switch it on by listing methods).
    `compile` (a torch.compile mode, e.g. "default" or "reduce-overhead" for CUDA graphs) compiles the
    whole sampler step once per method kind; worth it on GPUs, where it is paid back within a sweep.
    """

    def __init__(
        self,
        methods: list[str] = (),
        scales: dict[str, list[float]] | None = None,
        combo_cg_scale: float = 1.0,
        num_samples: int = 500,
        batch_size: int = 2048,
        sampler: str = "ddim",
        steps: int = 25,
        eta: float = 0.0,
        seeds: list[int] = (0,),
        classifier_ckpt: str | None = None,
        every_n_epochs: int = 0,
        on_fit_end: bool = True,
        extractor: str = "auto",
        inception_weights: str | None = None,
        reference_split: str = "train",
        cache_dir: str = ".cache/guidelab",
        output_dir: str | None = None,
        interval: tuple[int, int] | None = None,
        scale_schedule: str = "constant",
        cfg_rescale: float = 0.0,
        clip_x0: bool = True,
        grid_size: int = 40,
        precision: str = "auto",
        compile: str | None = None,
        progress: bool = True,
    ) -> None:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown sweep methods {unknown}; choose from {METHODS}")
        self.scales = {m: list((scales or {}).get(m, DEFAULT_SCALES[m])) for m in methods}
        needs_classifier = any(method_scales(m, s, combo_cg_scale)[1] != 0 for m in methods for s in self.scales[m])
        if needs_classifier and classifier_ckpt is None:
            raise ValueError(f"methods {list(methods)} include classifier guidance: set classifier_ckpt to a "
                             "NoisyClassifier checkpoint (--sweep.classifier_ckpt=PATH)")
        if precision not in ("auto", "32", "bf16"):
            raise ValueError(f"precision must be 'auto', '32' or 'bf16', got {precision!r}")
        if compile is not None and compile not in COMPILE_MODES:
            raise ValueError(f"compile must be null (eager) or a torch.compile mode {COMPILE_MODES}, got {compile!r}")
        self.methods, self.combo_cg_scale = list(methods), combo_cg_scale
        self.num_samples, self.batch_size, self.seeds = num_samples, batch_size, list(seeds)
        self.sampler, self.steps, self.eta, self.clip_x0 = sampler, steps, eta, clip_x0
        self.classifier_ckpt, self.every_n_epochs, self.run_on_fit_end = classifier_ckpt, every_n_epochs, on_fit_end
        self.extractor_kind, self.inception_weights = extractor, inception_weights
        self.reference_split, self.cache_dir, self.output_dir = reference_split, Path(cache_dir), output_dir
        self.guidance_options = {"interval": tuple(interval) if interval else None,
                                 "scale_schedule": scale_schedule, "cfg_rescale": cfg_rescale}
        self.grid_size, self.precision, self.progress, self.compile = grid_size, precision, progress, compile
        self._prepared = False
        self.last_rows: list[dict] = []
        self.last_output_dir: Path | None = None

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Everything that can be wrong is checked here, before any training or sampling.
        if not self.methods:
            return
        if not hasattr(pl_module, "sample"):
            raise TypeError("GuidanceSweep needs a ConditionalDiffusion module (it calls module.sample)")
        dm = trainer.datamodule
        self.extractor_kind = setup_.resolve_extractor_kind(self.extractor_kind, getattr(dm, "name", ""))
        setup_.check_extractor_available(self.extractor_kind, self.inception_weights)
        self.classifier = setup_.load_classifier(self.classifier_ckpt, pl_module.hparams, torch.device("cpu"))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_on_fit_end:
            self.run(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self.run(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module)

    # ------------------------------------------------------------------ the sweep
    def _prepare(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        device = module.device
        if self.classifier is not None:
            self.classifier.to(device)
        if self._prepared:
            return
        # Rank 0 trains/caches the evaluator and reference features first; the others then load them.
        for turn in ("first", "rest"):
            if (turn == "first") == trainer.is_global_zero:
                dm = trainer.datamodule
                self.extractor = setup_.build_extractor(self.extractor_kind, dm, self.cache_dir,
                                                        self.inception_weights, device)
                self.ref_feats, self.ref_stats = setup_.build_reference(dm, self.extractor, self.cache_dir,
                                                                        self.reference_split, device)
            trainer.strategy.barrier("guidance-sweep-prepare")
        self._prepared = True

    def signature(self, module: L.LightningModule) -> str:
        """Everything that makes two cells comparable; cells with the same signature are not redone."""
        spec = {"step": module.global_step, "model": dict(module.hparams), "sampler": self.sampler,
                "steps": self.steps, "eta": self.eta, "n": self.num_samples, "clip": self.clip_x0,
                "extractor": self.extractor.extractor_id, "combo": self.combo_cg_scale,
                "classifier": _file_id(self.classifier_ckpt), **self.guidance_options}
        return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def run(self, trainer: L.Trainer, module: L.LightningModule) -> list[dict]:
        """Run every cell not yet in sweep.csv; returns all rows of this signature."""
        if not self.methods:
            return []
        with torch.inference_mode(False), torch.no_grad():
            self._prepare(trainer, module)
            out_dir = Path(self.output_dir) if self.output_dir else run_dir(trainer) / "sweep"
            out_dir = Path(trainer.strategy.broadcast(str(out_dir)))  # rank 0's run dir for everyone
            table = SweepTable(out_dir)
            signature = self.signature(module)
            todo = [(seed, m, [s for s in self.scales[m] if not table.done(signature, m, s, seed)])
                    for seed in self.seeds for m in self.methods]
            todo = trainer.strategy.broadcast([job for job in todo if job[2]])  # rank 0's file decides
            wandb_run = _wandb_run(trainer)
            for seed, method, scales in todo:
                rows, grid = self._run_method(trainer, module, method, scales, seed, signature)
                if trainer.is_global_zero:
                    table.append(rows)
                    self._save_grids(out_dir, method, scales, seed, grid)
                    if wandb_run is not None:
                        _log_cells(wandb_run, method, rows, grid, module.null_label)
            rows = table.select(signature)
            if trainer.is_global_zero and rows:
                plots = save_plots(rows, out_dir)
                if wandb_run is not None:
                    log_to_wandb(wandb_run, rows, plots)
                print(f"\nGuidance sweep ({out_dir / 'sweep.csv'}):\n{format_table(rows, PRINT_COLUMNS)}")
            self.last_rows, self.last_output_dir = rows, out_dir
            return rows

    def _run_method(self, trainer, module, method, scales, seed, signature) -> tuple[list[dict], torch.Tensor]:
        """One batched pass over all remaining scales of a method; rank r takes items r, r+W, ..."""
        n, rank, world = self.num_samples, trainer.global_rank, trainer.world_size
        num_classes, device = module.null_label, module.device
        total, g = n * len(scales), min(self.grid_size, n)
        items = torch.arange(rank, total, world)
        feats = torch.zeros(total, self.extractor.num_features, device=device)
        shape = (module.hparams.channels, module.hparams.image_size, module.hparams.image_size)
        # Logit width differs by extractor (dataset classes, or Inception's 1008): ask it once.
        logit_dim = self.extractor.extract(torch.zeros(1, *shape, device=device))[1].shape[1]
        logits = torch.zeros(total, logit_dim, device=device)
        grid = torch.zeros(len(scales) * g, *shape, device=device)
        pairs = [method_scales(method, s, self.combo_cg_scale) for s in scales]
        autocast = torch.bfloat16 if self._bf16(trainer) else None
        start = time.perf_counter()
        chunks = items.split(self.batch_size)
        for i, chunk in enumerate(chunks):
            sample_idx, scale_idx = chunk % n, chunk // n
            out = module.sample(
                sample_idx % num_classes, sample_keys(seed, sample_idx), steps=self.steps, sampler=self.sampler,
                eta=self.eta, cfg_scale=[pairs[j][0] for j in scale_idx.tolist()],
                cg_scale=[pairs[j][1] for j in scale_idx.tolist()], classifier=self.classifier,
                clip_x0=self.clip_x0, autocast_dtype=autocast, progress=self.progress and trainer.is_global_zero,
                compile=self.compile, **self.guidance_options)
            f, lg = self.extractor.extract(out.images)
            feats[chunk.to(device)], logits[chunk.to(device)] = f.to(device), lg.to(device)
            in_grid = sample_idx < g
            grid[(scale_idx[in_grid] * g + sample_idx[in_grid]).to(device)] = out.images[in_grid.to(device)]
            if self.progress and trainer.is_global_zero:
                print(f"  {method} seed {seed}: batch {i + 1}/{len(chunks)} done", flush=True)
        if world > 1:  # each item was produced by exactly one rank: summing the zero-padded tensors is exact
            for tensor in (feats, logits, grid):
                dist.all_reduce(tensor)
        seconds = time.perf_counter() - start
        labels = torch.arange(n) % num_classes
        rows = []
        for j, scale in enumerate(scales):
            part = slice(j * n, (j + 1) * n)
            # Metrics on the sampling device (float64 matrix work: milliseconds per cell on a GPU).
            metrics = setup_.cell_metrics_for(self.ref_feats, self.ref_stats, feats[part], logits[part], labels,
                                              self.extractor_kind)
            # The cost a cell needs by itself (a mixed chunk may have evaluated more for it).
            nfe, grads = guidance_cost(module.schedule, self.steps, *pairs[j], self.guidance_options["interval"],
                                       self.guidance_options["scale_schedule"])
            rows.append({"method": method, "scale": scale, "gamma": gamma(method, scale, self.combo_cg_scale),
                         "seed": seed, "num_samples": n, "steps": self.steps, "sampler": self.sampler,
                         "nfe_per_sample": nfe, "classifier_grads_per_sample": grads, **metrics,
                         "seconds": seconds / len(scales), "seconds_per_sample": seconds / total,
                         "global_step": module.global_step, "extractor": self.extractor.extractor_id,
                         "signature": signature})
        return rows, grid.cpu()

    def _bf16(self, trainer: L.Trainer) -> bool:
        if self.precision == "auto":
            return str(trainer.precision).startswith("bf16")
        return self.precision == "bf16"

    def _save_grids(self, out_dir: Path, method: str, scales: list[float], seed: int, grid: torch.Tensor) -> None:
        g = len(grid) // len(scales)
        for j, scale in enumerate(scales):
            path = out_dir / "grids" / f"{method}_s{scale:g}_seed{seed}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image((grid[j * g:(j + 1) * g] + 1) / 2, path, nrow=min(g, 10), padding=1)


def _file_id(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    return f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.exists() else str(p)


def _wandb_run(trainer: L.Trainer):
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    return None


def _log_cells(run, method: str, rows: list[dict], grid: torch.Tensor, num_classes: int) -> None:
    """Per-cell scalars against the method's own scale axis (exact metric names, no globs) + grids."""
    import wandb

    axis = f"sweep/{method}/scale"
    run.define_metric(axis)
    for name in (*METRICS, "gamma", "samples"):
        run.define_metric(f"sweep/{method}/{name}", step_metric=axis)
    g = len(grid) // len(rows)
    for j, row in enumerate(rows):
        images = make_grid((grid[j * g:(j + 1) * g] + 1) / 2, nrow=min(g, 10), padding=1)
        payload = {axis: row["scale"], f"sweep/{method}/gamma": row["gamma"],
                   **{f"sweep/{method}/{m}": row[m] for m in METRICS},
                   f"sweep/{method}/samples": wandb.Image(images, caption=f"{method} s={row['scale']:g} "
                                                                        f"seed={row['seed']}")}
        run.log(payload)
