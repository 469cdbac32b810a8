"""What a run prints: one training bar over the fit's steps (with total and ETA), the paths a fit leaves,
and none of the known third-party noise (each silenced by its exact message, never by category)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n
from lightning.pytorch.loggers import WandbLogger

from .run_dir import run_dir


class StepProgressBar(TQDMProgressBar):
    """With `max_steps`, one bar over optimiser steps `global_step / max_steps` with its ETA (Lightning's own
    bar restarts every epoch and shows no total for step-limited fits). A resumed fit starts where it was."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:
            bar.reset(total=trainer.max_steps)
            bar.initial = 0
            _update_n(bar, trainer.global_step)
        bar.set_description(f"Training (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, n = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(n, bar.total):
            _update_n(bar, n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class FitSummary(Callback):
    """Ends every fit by printing its run directory and checkpoint paths (what a sweep needs next)."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        lines = [f"\nrun directory:   {run_dir(trainer)}  (global step {trainer.global_step})"]
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "last_model_path", ""):
                lines.append(f"last checkpoint: {callback.last_model_path}")
            if getattr(callback, "best_model_path", ""):
                lines.append(f"best checkpoint: {callback.best_model_path}")
        print("\n".join(dict.fromkeys(lines)), flush=True)


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def tidy_wandb(trainer: L.Trainer) -> None:
    """Before a trainer's W&B runs start: drop the `anonymous` argument Lightning always passes (wandb 0.31 warns
    on every run that it has no effect), and create the run's directory, which wandb looks for a git repository
    from (a missing one printed "git root <dir> does not exist" on every run; inside a clone it now finds the
    repository and records its commit)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is None:  # the run is created lazily
            logger._wandb_init.pop("anonymous", None)
            if logger._wandb_init.get("dir"):
                Path(logger._wandb_init["dir"]).mkdir(parents=True, exist_ok=True)


def quiet_known_noise() -> None:
    """Silence messages that say nothing about this run, each matched exactly at its source."""
    # Lightning 2.6 advertises a logging product on every Trainer.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages("💡 Tip:"))
    # Lightning's pytree helper still uses an API newer torch deprecates (harmless, printed every run).
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
