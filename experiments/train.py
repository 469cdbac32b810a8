"""Command line for both models: `python -m experiments.train {fit,validate,test} --config ...`.

A guidance sweep on a trained checkpoint (`validate` runs the sweep; no training):
    python -m experiments.train validate --config configs/experiments/digits_diffusion.yaml \
        --config configs/experiments/digits_sweep.yaml --ckpt_path DIFFUSION.ckpt --sweep.classifier_ckpt CLS.ckpt

The DataModule's num_classes / image_size / channels are linked into whichever model is chosen,
so a user never types them twice. `--sweep.*` are the options of lightning_modules.sweep.SweepConfig.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from callbacks import GuidanceSweep, RunConfigSaver
from callbacks.checkpoint_io import CheckpointTempCleanup, SafeCheckpointIO
from callbacks.console import FitSummary, StepProgressBar, quiet_known_noise, tidy_wandb
from datamodules import ImageDataModule
from lightning_modules.diffusion import OptionError
from lightning_modules.files import is_url
from lightning_modules.sweep import SweepConfig
from lightning_modules.sweep.loading import read_checkpoint


class GuideCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The sweep is a top-level group (--sweep.sampling.steps=50, --sweep.classifier_ckpt=...), inactive
        # until `sweep.methods` lists something; W&B sweeps pass its knobs the same way.
        parser.add_class_arguments(SweepConfig, "sweep", instantiate=True)
        for name in ("num_classes", "image_size", "channels"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # Lightning reads --ckpt_path here, first of all; a URL (Lightning would unpickle a download unchecked),
        # a missing, empty, corrupt or unsafe file must fail naming itself.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        # A local path that does not exist (yet) is left to Lightning's own error at fit/validate time, so a
        # command can be parsed or printed (--print_config, W&B sweep templates) before its checkpoint exists.
        if path and not _lightning_ckpt_value(str(path)) and (is_url(path) or Path(path).exists()):
            read_checkpoint(str(path), "ckpt_path")
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())  # total steps and ETA for step-limited fits
        if self.subcommand in ("validate", "test", "predict") or config.get("enable_checkpointing") is False:
            # Nothing is trained, so nothing is checkpointed: the recipes' ModelCheckpoint goes (Lightning refuses
            # one with enable_checkpointing=False), and restoring --ckpt_path no longer warns on every sweep run
            # that the checkpoint's dirpath changed.
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
            kwargs["enable_checkpointing"] = False
        kwargs["callbacks"] = [*callbacks, FitSummary(), GuidanceSweep(self._get(self.config_init, "sweep")),
                               CheckpointTempCleanup()]
        kwargs["plugins"] = _with_safe_checkpoint_io(config.get("plugins"))
        trainer = super().instantiate_trainer(**kwargs)
        tidy_wandb(trainer)
        return trainer


def _lightning_ckpt_value(path: str) -> bool:
    """Lightning's special --ckpt_path values, resolved by it to the run's own local checkpoints (read through
    SafeCheckpointIO); `registry[:name]` only where litmodels is installed (otherwise Lightning takes it for a
    file name)."""
    registry = path.lower() == "registry" or path.lower().startswith("registry:")
    return path in ("last", "best", "hpc") or (registry and importlib.util.find_spec("litmodels") is not None)


def _with_safe_checkpoint_io(plugins: object) -> list:
    """The user's trainer.plugins plus SafeCheckpointIO: every checkpoint is loaded weights_only and saved
    atomically beside its target. Another CheckpointIO would silently undo both, so it is refused."""
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [] if plugins is None else [plugins]
    other = [p for p in plugins if isinstance(p, CheckpointIO) and not isinstance(p, SafeCheckpointIO)]
    if other:
        raise OptionError("trainer.plugins", f"{type(other[0]).__name__} would replace guidelab's checkpoint IO "
                          "(weights_only loads, atomic saves beside the target)",
                          "drop it, or subclass callbacks.checkpoint_io.SafeCheckpointIO")
    return plugins if any(isinstance(p, SafeCheckpointIO) for p in plugins) else [*plugins, SafeCheckpointIO()]


def main(args: list[str] | None = None, run: bool = True) -> GuideCLI:
    quiet_known_noise()
    return GuideCLI(
        L.LightningModule,
        ImageDataModule,
        subclass_mode_model=True,
        save_config_callback=RunConfigSaver,
        parser_kwargs={
            "description": "Train the diffusion model or the noisy classifier (fit), or run the guidance sweep on a "
                           "checkpoint (validate). Recipes: configs/experiments/*.yaml.",
            "fit": {"description": "Train a model (--config configs/experiments/digits_diffusion.yaml). With "
                                   "sweep.methods set, the guidance sweep runs at the end (and every "
                                   "sweep.every_n_epochs)."},
            "validate": {"description": "Run the guidance sweep (the sweep.* options) on --ckpt_path, e.g. "
                                        "--config digits_diffusion.yaml --config digits_sweep.yaml; also computes "
                                        "val/loss on the validation batches."},
        },
        args=args,
        run=run,
    )


if __name__ == "__main__":
    try:
        main()
    except OptionError as err:  # a bad setting: one message, no traceback
        sys.exit(f"error: {err}")
