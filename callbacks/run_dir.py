"""Where a run's files go: the same directory Lightning's ModelCheckpoint puts `checkpoints/` in.

With a logger that is <save_dir>/<name>/<version> (a W&B run id, or version_N for CSV), so two runs
never share a directory; without one, the trainer's default_root_dir.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L


def run_dir(trainer: L.Trainer) -> Path:
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(save_dir) / str(logger.name) / version
