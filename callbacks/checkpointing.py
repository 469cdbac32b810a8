"""Checkpoints a killed fit resumes from exactly: `last.ckpt` on a step cadence and at the final step
(LastCheckpoint), with the random generators and the interrupted step completed (ExactResume).

The third piece is the training order: datamodules.datasets.ResumableLoader, a pure function of (seed, epoch)
that Lightning checkpoints mid-epoch. Together, on CPU, an interrupted-and-resumed fit ends with the same
weights (network and EMA) as an uninterrupted one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_modules.files import atomic_copy, is_url


class LastCheckpoint(ModelCheckpoint):
    """Owns `last.ckpt`: written every `every_n_train_steps` optimiser steps, after every validation and at the
    end of fit, whatever the validation cadence. A kill -9 loses at most `every_n_train_steps` steps, and a
    finished fit's `last.ckpt` holds its final step.

    Lightning 2.6's ModelCheckpoint does neither by itself: with a monitor, `last.ckpt` is written only with a
    monitored save (after validations), and its `on_train_end` writes `last.ckpt` only when nothing at all was
    saved before. Keep a monitored ModelCheckpoint (`save_last: false`) beside this one for `best-step=N.ckpt`.
    The name is always `last.ckpt` (no `last-v1.ckpt` next to an older one): resume and reuse look for it.
    Pair it with ExactResume: a step-cadence save precedes the LightningModule's own `on_train_batch_end`.
    """

    def __init__(self, dirpath: str | Path | None = None, every_n_train_steps: int = 100,
                 verbose: bool = False) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1 (the most steps a kill may lose), got "
                             f"{every_n_train_steps}.")
        super().__init__(dirpath=dirpath, monitor=None, save_top_k=0, save_last=True, verbose=verbose,
                         every_n_train_steps=every_n_train_steps, enable_version_counter=False)

    def _save_last_now(self, trainer: pl.Trainer) -> None:
        # Skips outside fit, in the sanity check and when this step is saved already.
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_last_now(trainer)  # never older than a best-step=N.ckpt

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_last_now(trainer)  # the final step (not called when training raised)


class ExactResume(Callback):
    """Makes a resumed fit continue as the uninterrupted one would have, bit for bit on CPU.

    Random generators: torch's (CPU and the current CUDA device), numpy's and Python's `random` are saved in
    every checkpoint and put back when a fit resumes, at `on_train_start`: after Lightning's restore and loader
    setup, right before the first resumed step. Label dropout, timestep and noise draws, dropout layers and
    flips draw from them. `validate`/`test` from a checkpoint leave them alone. Under DDP every rank restores
    rank 0's states, which equal its own: ranks seeded alike (seed_everything) draw alike.

    The interrupted step: a checkpoint written in `on_train_batch_end` (every `every_n_train_steps` save) is
    taken after the callbacks' hooks but before the LightningModule's own `on_train_batch_end`, which Lightning
    calls after them and does not call again on resume. The diffusion model's EMA update lives there, so that
    step's update would be lost. On such a resume this callback calls the module's hook once, with outputs and
    batch None (that step's outputs are gone), as the interrupted run did right after the save.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # Tensors, ints, floats, strs and tuples only: `torch.load(weights_only=True)` still reads the file.
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()  # the current device: this rank's
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict  # applied when training starts, not at restore

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._pending = self._pending, None
        if state is not None:
            torch.set_rng_state(state["torch"].cpu())
            n = state["numpy"]
            np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                                 n["gauss"]))
            version, internal, gauss_next = state["python"]
            random.setstate((version, tuple(internal), gauss_next))
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda"].cpu())
        epoch_loop = trainer.fit_loop.epoch_loop
        if epoch_loop.restarted_on_train_batch_end:
            pl_module.on_train_batch_end(None, None, epoch_loop.batch_progress.current.ready - 1)


class GuideSnapshots(Callback):
    """Keeps guide snapshots for autoguidance (Karras et al. 2024): at the given fractions of `max_steps` the
    whole module (network and its EMA) is saved as `guide-1of16.ckpt` etc. beside the fit's checkpoints, so a
    sweep can name `--sweep.guide_ckpt snapshot:1/16`. (EDM2's guides are the XS model at 1/16 of training, or
    M at 1/8 for XXL.) Saved in `on_train_batch_end`, i.e. before that step's EMA update. A fit resumed into
    another directory copies the resumed checkpoint's earlier snapshots into its own."""

    def __init__(self, fractions: list[str] = ("1/16", "1/8", "1/4")) -> None:
        self.fractions = list(fractions)
        for f in self.fractions:
            num, _, den = f.partition("/")
            if not (num.isdigit() and den.isdigit() and 0 < int(num) < int(den)):
                raise ValueError(f"guide snapshot fraction {f!r} is not a fraction like 1/16 strictly between 0 and 1")

    def _targets(self, trainer: pl.Trainer) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for f in self.fractions if trainer.max_steps > 0 else ():
            num, den = (int(v) for v in f.split("/"))
            out.setdefault(max(1, round(trainer.max_steps * num / den)), []).append(f.replace("/", "of"))
        return out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit resumed into a new run directory: the snapshots taken before the resumed step are in the old
        # one and would never be taken again, so `snapshot:1/16` would name nothing here. Copy them over.
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if not (trainer.ckpt_path and dirpath and trainer.is_global_zero) or is_url(trainer.ckpt_path):
            return
        old, new = Path(trainer.ckpt_path).parent, Path(dirpath)
        if old.resolve() == new.resolve():
            return
        for step, names in self._targets(trainer).items():
            for name in names if step <= trainer.global_step else ():
                src, dst = old / f"guide-{name}.ckpt", new / f"guide-{name}.ckpt"
                if src.is_file() and not dst.exists():
                    atomic_copy(src, dst)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        names = self._targets(trainer).get(trainer.global_step, [])
        if not names or trainer.checkpoint_callback is None or trainer.checkpoint_callback.dirpath is None:
            return
        for name in names:  # every rank calls save_checkpoint (it holds a barrier); rank 0 writes
            path = Path(trainer.checkpoint_callback.dirpath) / f"guide-{name}.ckpt"
            trainer.save_checkpoint(path, weights_only=True)
