"""Save the resolved LightningCLI config per run, and hand it to W&B.

Lightning's SaveConfigCallback writes to `trainer.log_dir`, which for WandbLogger is the shared
save_dir: the second run then fails on the existing file. This one writes into the run's own
directory (next to checkpoints/) and records the config in every logger's hyperparameters, flattened to one
key per option (`sweep.sampling.steps`, `model.init_args.lr`, `trainer.max_steps`: the names W&B sweeps and
`--` flags use), so runs can be filtered and grouped by any option.
"""

from __future__ import annotations

import json
from typing import Any

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
        resolved = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
        flat = flatten(resolved)
        for logger in trainer.loggers:
            logger.log_hyperparams(flat)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys; lists and scalars stay values (`{"a": {"b": [1]}}` -> `{"a.b": [1]}`).

    An empty mapping stays a value (`{}`), so no option disappears from the config.
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
