"""Command line for both models: `python -m experiments.train {fit,validate,test} --config ...`.

A guidance sweep on a trained checkpoint (`validate` runs the sweep; no training):
    python -m experiments.train validate --config configs/experiments/digits_diffusion.yaml \
        --config configs/experiments/digits_sweep.yaml --ckpt_path DIFFUSION.ckpt --sweep.classifier_ckpt CLS.ckpt

The DataModule's num_classes / image_size / channels are linked into whichever model is chosen,
so a user never types them twice. `--sweep.*` are the options of lightning_modules.sweep.SweepConfig.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks import GuidanceSweep, RunConfigSaver
from datamodules import ImageDataModule
from lightning_modules.diffusion import OptionError
from lightning_modules.sweep import SweepConfig
from lightning_modules.sweep.models import read_checkpoint


class GuideCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The sweep is a top-level group (--sweep.sampling.steps=50, --sweep.classifier_ckpt=...), inactive
        # until `sweep.methods` lists something; W&B sweeps pass its knobs the same way.
        parser.add_class_arguments(SweepConfig, "sweep", instantiate=True)
        for name in ("num_classes", "image_size", "channels"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        # Lightning reads --ckpt_path here, first of all; a corrupt or unsafe file must fail naming itself.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file():  # a missing file is Lightning's own clear error, later
            read_checkpoint(path, "ckpt_path")
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        sweep = self._get(self.config_init, "sweep")
        trainer.callbacks.append(GuidanceSweep(sweep))
        return trainer


def main(args: list[str] | None = None, run: bool = True) -> GuideCLI:
    return GuideCLI(
        L.LightningModule,
        ImageDataModule,
        subclass_mode_model=True,
        save_config_callback=RunConfigSaver,
        args=args,
        run=run,
    )


if __name__ == "__main__":
    try:
        main()
    except OptionError as err:  # a bad setting: one message, no traceback
        sys.exit(f"error: {err}")
