"""Save the resolved LightningCLI config per run, and hand it to W&B.

Lightning's SaveConfigCallback writes to `trainer.log_dir`, which for WandbLogger is the shared
save_dir: the second run then fails on the existing file. This one writes into the run's own
directory (next to checkpoints/) and records the config in every logger's hyperparameters.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback

from .run_dir import run_dir


class RunConfigSaver(SaveConfigCallback):
    def __init__(self, *args, **kwargs) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        directory = run_dir(trainer)
        directory.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(directory / self.config_filename), skip_none=False, overwrite=True,
                         multifile=self.multifile)
        flat = self.parser.dump(self.config, skip_none=False, format="json")
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": flat})
