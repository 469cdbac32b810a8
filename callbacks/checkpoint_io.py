"""How every checkpoint of a fit is written and read: `SafeCheckpointIO`, which GuideCLI installs on each trainer.

Loads are `weights_only=True` whatever the caller asks (Lightning itself unpickles `http*` paths with
`weights_only=False`, i.e. a crafted file runs code), and only local files are read. Saves never pass through
`$TMPDIR`: Lightning's fsspec transaction writes a temp file there and moves it, which across filesystems is a
copy onto the old file (a kill leaves a 0-byte last.ckpt, a full disk a partial one). Here the temp file lies
beside the target and replaces it atomically, so the previous checkpoint survives any failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_modules.files import atomic_save, is_url, remove_stale_temp_files
from lightning_modules.sweep.loading import load_weights_only


class SafeCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that reads local files with `weights_only=True` only and saves atomically beside the
    target. Remote save targets (`s3://...`) keep Lightning's own save."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
                        ) -> None:
        if storage_options is not None or is_url(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # its TypeError / fsspec upload
            return
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: str | Path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        # `weights_only` is ignored on purpose: False would let a crafted checkpoint run code.
        return load_weights_only(path, "ckpt_path", map_location)


class CheckpointTempCleanup(Callback):
    """When a fit starts, removes the temp files that killed saves left in the checkpoint directories."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for directory in {getattr(c, "dirpath", None) for c in trainer.checkpoint_callbacks}:
                remove_stale_temp_files(directory)
