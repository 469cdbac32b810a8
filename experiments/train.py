"""Command line for both models: `python -m experiments.train {fit,validate,test} --config ...`.

A guidance sweep on a trained checkpoint (no training):
    python -m experiments.train validate --config configs/experiments/digits_diffusion.yaml \
        --config configs/experiments/digits_sweep.yaml --ckpt_path DIFFUSION.ckpt --sweep.classifier_ckpt CLS.ckpt

The DataModule's num_classes / image_size / channels are linked into whichever model is chosen,
so a user never types them twice.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks import GuidanceSweep, RunConfigSaver
from datamodules import ImageDataModule


class GuideCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The sweep is a top-level group (--sweep.steps=50, --sweep.classifier_ckpt=...), inactive
        # until `sweep.methods` lists something; W&B sweeps pass its knobs the same way.
        parser.add_lightning_class_args(GuidanceSweep, "sweep")
        for name in ("num_classes", "image_size", "channels"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")


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
    main()
