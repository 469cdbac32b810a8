"""Sample grids during training: what the EMA model draws, every N optimiser steps, in W&B and on disk.

One row per guidance scale, one column per image (classes cycling through `classes`); every row starts from
the same keyed noise (docs/conventions.md: paired noise), so rows differ only by the scale. The noise is a
hash of (seed, i), not the global RNG: sampling here leaves training's random stream (and an exact resume)
untouched. Logged under `train/samples` against `trainer/global_step` and saved as
`<run dir>/samples/step<N>.png`. Rank 0 only; cheap by default (10 images × 2 scales, 10 DDIM steps).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from lightning_modules.diffusion import SamplerOptions, sample_keys

from .run_dir import run_dir


class SampleGrids(Callback):
    """Log a class × scale grid of CFG samples from the EMA network every `every_n_steps` training steps.

    Args:
        every_n_steps: optimiser steps between grids (0 = never); a grid at every multiple of it.
        classes: class labels of the columns (None = every class of the model, 0..K-1).
        per_class: images per class in each row.
        scales: CFG scales, one row each (1.0 = the plain conditional model).
        steps: DDIM sampling steps.
        seed: the noise seed (the same noise at every step, so grids of a run compare).
        at_end: also draw a grid when training ends, if the last step was not a multiple of every_n_steps.
        key: the W&B key.
    """

    def __init__(self, every_n_steps: int = 500, classes: list[int] | None = None, per_class: int = 1,
                 scales: list[float] | None = None, steps: int = 10, seed: int = 0, at_end: bool = False,
                 key: str = "train/samples") -> None:
        if every_n_steps < 0 or per_class < 1 or steps < 1:
            raise ValueError(f"SampleGrids: every_n_steps ({every_n_steps}) must be >= 0, per_class ({per_class}) "
                             f"and steps ({steps}) >= 1")
        self.every_n_steps, self.classes, self.per_class = every_n_steps, classes, per_class
        self.scales = list(scales) if scales is not None else [1.0, 3.0]
        self.steps, self.seed, self.at_end, self.key = steps, seed, at_end, key
        self.last_step = -1
        self.last_path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not (hasattr(pl_module, "sample") and hasattr(pl_module, "ema_net")):
            raise TypeError("SampleGrids needs a ConditionalDiffusion module (it samples from its EMA network)")
        num_classes = pl_module.hparams.num_classes
        bad = [c for c in self.classes or [] if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"SampleGrids: classes {bad} are outside 0..{num_classes - 1}")
        SamplerOptions(steps=self.steps).check(pl_module.hparams.timesteps, prefix="SampleGrids.")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.log_grid(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end:
            self.log_grid(trainer, pl_module)

    def grid(self, pl_module: L.LightningModule) -> Tensor:
        """The images in [-1, 1], row-major: len(scales) rows of len(classes) * per_class images."""
        classes = self.classes if self.classes is not None else list(range(pl_module.hparams.num_classes))
        labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(self.per_class)
        keys = sample_keys(self.seed, torch.arange(len(labels)))
        n = len(self.scales)
        scales = torch.tensor(self.scales, dtype=torch.float32).repeat_interleave(len(labels))
        return pl_module.sample(labels.repeat(n), keys.repeat(n), method="cfg", scales=scales.tolist(),
                                sampling=SamplerOptions(steps=self.steps))

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sample, save the PNG in the run directory and log it to every WandbLogger (rank 0; once per step)."""
        step = trainer.global_step
        if not trainer.is_global_zero or step == self.last_step:
            return
        self.last_step = step
        from torchvision.utils import save_image

        images = self.grid(pl_module).cpu()
        columns = len(images) // len(self.scales)
        path = run_dir(trainer) / "samples" / f"step{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image((images + 1) / 2, path, nrow=columns, padding=1)
        self.last_path = path
        caption = f"step {step}: rows = CFG scales {', '.join(f'{s:g}' for s in self.scales)}; EMA, {self.steps} steps"
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=self.key, images=[str(path)], step=step, caption=[caption])
