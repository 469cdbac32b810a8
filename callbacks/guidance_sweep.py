"""The guidance sweep as a Lightning callback: hooks, ranks and W&B around the engine in
`lightning_modules.sweep`, nothing else.

It runs every `every_n_epochs` during fit, at the end of fit, and in `validate` / `test`. Everything that
can be wrong (every sweep option, the classifier checkpoint, the extractor's weights, a writable output
directory) is checked in `setup`, before any training or sampling.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from lightning_modules.sweep import (
    Evaluation,
    Network,
    SweepConfig,
    SweepModels,
    build_evaluation,
    check_extractor_available,
    check_writable,
    format_table,
    resolve_extractor,
)
from lightning_modules.sweep.loading import load_guide, load_helper_networks, load_trained_networks
from lightning_modules.sweep.orchestration import protocol_of, sweep_and_report

from .artifacts import wandb_run as fit_wandb_run
from .run_dir import run_dir
from .sweep_wandb import WandbSweepLogger, add_tags, sweep_tags

PRINT_COLUMNS = ["method", "scale", "gamma", "seed", "fid", "kid", "score", "precision", "recall", "accuracy",
                 "nfe_per_sample", "classifier_grads_per_sample", "seconds"]


class TrainerDistributed:
    """The engine's view of the trainer's process group."""

    def __init__(self, trainer: L.Trainer) -> None:
        self.trainer, self.rank, self.world = trainer, trainer.global_rank, trainer.world_size

    def all_sum(self, tensor: Tensor) -> None:
        if self.world > 1:
            dist.all_reduce(tensor)

    def broadcast(self, obj: object) -> object:
        return self.trainer.strategy.broadcast(obj)


class GuidanceSweep(Callback):
    """Sweep guidance methods × scales × seeds on the diffusion module being trained or evaluated."""

    def __init__(self, config: SweepConfig | None = None) -> None:
        self.config = config or SweepConfig()
        self.classifier: Network | None = None
        self.guide: Network | None = None
        self.clean_classifier: Network | None = None
        self.trained: dict[str, Network] = {}
        self.evaluation: Evaluation | None = None

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self.config
        if not config.methods:
            return
        if not hasattr(pl_module, "ema_net"):
            raise TypeError("GuidanceSweep needs a ConditionalDiffusion module (it samples from its EMA network)")
        config.check(timesteps=pl_module.hparams.timesteps, schedule=pl_module.hparams.get("schedule"))
        check_extractor_available(resolve_extractor(config.extractor, getattr(trainer.datamodule, "name", "")),
                                  config.inception_weights, config.dinov2_dir, config.extra_extractors)
        # A guide snapshot:1/16 the running fit writes later (at 1/16 of max_steps) is loaded at sweep time.
        self.classifier, self.guide, self.clean_classifier = load_helper_networks(
            config, dict(pl_module.hparams), self._guide_base(trainer), allow_missing_snapshot=True)
        self.trained = load_trained_networks(config, dict(pl_module.hparams))
        if trainer.is_global_zero:
            check_writable(self._output_dir(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        every = self.config.every_n_epochs
        if every and (trainer.current_epoch + 1) % every == 0:
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.config.on_fit_end:
            self.run(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self.run(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module)

    # ------------------------------------------------------------------ the sweep
    def _guide_base(self, trainer: L.Trainer) -> str | None:
        # snapshot:1/16 lives next to the checkpoint being evaluated (validate) or the fit's own checkpoints.
        if not self.config.needs_guide:  # nothing to resolve (and without checkpointing there is no dirpath)
            return None
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)  # None when nothing is checkpointed (validate)
        return trainer.ckpt_path or str(Path(dirpath or run_dir(trainer)) / "last.ckpt")

    def _output_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.config.output_dir) if self.config.output_dir else run_dir(trainer) / "sweep"

    def _prepare_evaluation(self, trainer: L.Trainer, device: torch.device) -> Evaluation:
        if self.evaluation is None:
            # Rank 0 trains/caches the evaluator and reference features first; the others then load them.
            c = self.config
            for turn in ("first", "rest"):
                if (turn == "first") == trainer.is_global_zero:
                    self.evaluation = build_evaluation(c.extractor, trainer.datamodule, c.cache_dir,
                                                       c.inception_weights, c.reference_split, device,
                                                       c.extra_extractors, c.dinov2_dir, c.reference_stats)
                trainer.strategy.barrier("guidance-sweep-prepare")
        return self.evaluation

    def _autocast(self, trainer: L.Trainer) -> torch.dtype | None:
        precision = self.config.precision
        bf16 = str(trainer.precision).startswith("bf16") if precision == "auto" else precision == "bf16"
        return torch.bfloat16 if bf16 else None

    def run(self, trainer: L.Trainer, module: L.LightningModule) -> list[dict]:
        """Run every cell not yet in sweep.csv; returns all rows of this signature (rank 0; [] elsewhere)."""
        if not self.config.methods:
            return []
        with torch.inference_mode(False), torch.no_grad():
            device = module.device
            evaluation = self._prepare_evaluation(trainer, device)
            if self.config.needs_guide and self.guide is None:  # a snapshot the fit made after setup
                self.guide = load_guide(self.config, dict(module.hparams), self._guide_base(trainer))
            network = Network(module.ema_net, dict(module.hparams), module.trained_steps,
                              training_cost=module.training_cost())
            models = SweepModels(network, self.classifier, self.guide, self.clean_classifier, self.trained).to(device)
            out_dir = Path(trainer.strategy.broadcast(str(self._output_dir(trainer))))  # rank 0's run dir
            wandb_run = fit_wandb_run(trainer)
            if wandb_run is not None:
                add_tags(wandb_run, sweep_tags(self.config, getattr(trainer.datamodule, "name", None)))
            data, bf16 = trainer.datamodule, self._autocast(trainer)
            protocol = protocol_of(self.config, dataset=getattr(data, "name", None),
                                   dataset_id=getattr(data, "dataset_id", None),
                                   image_size=module.hparams.get("image_size"), diffusion=trainer.ckpt_path,
                                   bf16=bf16 is not None)
            outcome = sweep_and_report(
                self.config, models, evaluation, out_dir, protocol, _class_names(trainer),
                dist=TrainerDistributed(trainer), autocast_dtype=bf16,
                logger=WandbSweepLogger(wandb_run, models.num_classes) if wandb_run is not None else None)
            if trainer.is_global_zero and outcome.rows:
                print(f"\nGuidance sweep ({outcome.csv}):\n{format_table(outcome.rows, PRINT_COLUMNS)}\n"
                      f"report: {outcome.report}")
            return outcome.rows


def _class_names(trainer: L.Trainer) -> list[str] | None:
    """The datamodule's class names (the grids' column labels), or None: indices are shown instead."""
    try:
        names = getattr(trainer.datamodule, "class_names", None)
    except (OSError, ValueError, KeyError):  # e.g. a CIFAR meta file that cannot be read
        return None
    return [str(n) for n in names] if names else None
