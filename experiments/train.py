"""Command line for both models: `python -m experiments.train {fit,validate,test} --config ...`.

The DataModule's num_classes / image_size / channels are linked into whichever model is chosen,
so a user never types them twice.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks import RunConfigSaver
from datamodules import ImageDataModule


class GuideCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
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
