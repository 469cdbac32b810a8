"""A fit's checkpoints as a W&B Artifact, so a run's models can be fetched by name:

    run = wandb.init(project="guidelab")  # the run that uses them (W&B records the lineage)
    best = run.use_artifact("model-<run id>:best").download()  # <dir>/model.ckpt, the lowest val/loss
    last = run.use_artifact("model-<run id>:latest").download()  # <dir>/model.ckpt, the final step's last.ckpt
    # without a run: wandb.Api().artifact("<entity>/guidelab/model-<run id>:best").download()

Why not WandbLogger(log_model=True), which logs `model-<run id>` with the same aliases: it scans every
ModelCheckpoint of the fit and gives each checkpoint it logs the `latest` alias in turn, so with LastCheckpoint
beside the monitored best-checkpoint callback `latest` ends on whichever callback it scans last (it can be the
best checkpoint, not last.ckpt); with `save_top_k: -1` (the CIFAR recipes' every-50k snapshots, ~0.6 GB each)
it uploads every snapshot; and it refuses `offline=True` outright. This callback logs exactly two versions, best
then last, at the end of fit, and works offline (WANDB_MODE=offline records the artifacts; `wandb sync` uploads
them).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

MODEL_TYPE = "model"
CHECKPOINT_FILE = "model.ckpt"  # the file inside every version: scripts need not know best-step=N.ckpt's N


def artifact_name(text: str) -> str:
    """`text` as a W&B artifact name (letters, digits, '-', '_', '.'; anything else becomes '-')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def wandb_run(trainer: pl.Trainer) -> Any | None:
    """The fit's live W&B run on rank 0, else None (no WandbLogger, another rank)."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    return None


def fit_checkpoints(trainer: pl.Trainer) -> dict[str, tuple[Path, ModelCheckpoint]]:
    """alias → (file, the callback that wrote it): `best` = the monitored callback's best_model_path, `latest` =
    last.ckpt (LastCheckpoint, or any callback's last_model_path); only files that exist."""
    found: dict[str, tuple[Path, ModelCheckpoint]] = {}
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        if cb.monitor and cb.best_model_path and Path(cb.best_model_path).is_file():
            found.setdefault("best", (Path(cb.best_model_path), cb))
        if cb.last_model_path and Path(cb.last_model_path).is_file():
            found.setdefault("latest", (Path(cb.last_model_path), cb))
    return found


class CheckpointArtifacts(Callback):
    """At the end of fit, logs the best checkpoint (alias `best`) and then last.ckpt (alias `latest`) as versions
    of the artifact `model-<run id>`, type "model", each holding one file `model.ckpt`; metadata: the original
    file name (best-step=N.ckpt names its step), the step the fit ended at, the monitored metric and its best
    score. Nothing without a WandbLogger."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name  # default: model-<W&B run id>, Lightning's log_model name

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_fit_end runs after every callback's on_train_end, so LastCheckpoint has written the final step.
        run = wandb_run(trainer)
        if run is None:
            return
        import wandb

        name = artifact_name(self.name or f"model-{run.id}")
        found = fit_checkpoints(trainer)
        for alias in ("best", "latest"):  # latest last: W&B also moves `latest` to the newest version
            if alias not in found:
                continue
            path, cb = found[alias]
            score = cb.best_model_score if alias == "best" else None
            metadata = {"file": path.name, "fit_end_step": trainer.global_step, "monitor": cb.monitor,
                        "best_score": None if score is None else float(score)}
            artifact = wandb.Artifact(name, type=MODEL_TYPE, metadata=metadata)
            # The default "mutable" policy copies the file into W&B's staging area first: last.ckpt is
            # rewritten by a resumed fit before an offline run is synced.
            artifact.add_file(str(path), name=CHECKPOINT_FILE)
            run.log_artifact(artifact, aliases=[alias])
