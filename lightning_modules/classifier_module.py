"""The noise-aware classifier for classifier guidance (Dhariwal & Nichol 2021).

Trained on x_t = q_sample(x_0, t) with t ~ U{0..T-1} on the SAME schedule as the diffusion model
(configured by the same `schedule` / `timesteps` settings, recorded in the checkpoint so a
guidance run can check compatibility), plain cross-entropy, AdamW. Loss and accuracy are logged
overall and per timestep quartile: q0 = least noisy t < T/4, ..., q3 = most noisy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from .diffusion import NoiseSchedule
from .networks import EncoderClassifier
from .training import adamw_with_warmup, compiled, maybe_channels_last

QUARTILES = 4


class NoisyClassifier(L.LightningModule):
    """p(y | x_t, t): the half-UNet encoder with time-conditioned AdaGN.

    Args:
        num_classes: classes of the data (linked from the DataModule).
        image_size: image side in pixels (linked from the DataModule).
        channels: image channels (linked from the DataModule).
        base_channels: channels of the encoder's first level.
        channel_mult: channel multiplier per resolution level.
        num_res_blocks: residual blocks per level.
        attention_resolutions: feature-map sizes with self-attention.
        dropout: dropout inside the residual blocks.
        num_heads: attention heads (also of the attention pooling).
        pool: how the last feature map becomes logits: adaptive (average) or attention pooling.
        schedule: noise schedule: must equal the diffusion model's (checked before a sweep).
        timesteps: training timesteps T: must equal the diffusion model's.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up.
        compile: torch.compile the training network: false, true or a mode.
        channels_last: train in channels_last memory format.
        train_on: noisy (x_t at t ~ U{0..T-1}: classifier guidance, cg_*) or clean (the data itself at t = 0:
            the classifier of cg_clean, applied to the predicted x̂0; never the evaluator).
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 8,
        channels: int = 1,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        num_heads: int = 4,
        pool: Literal["adaptive", "attention"] = "adaptive",
        schedule: Literal["cosine", "linear"] = "cosine",
        timesteps: int = 1000,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        compile: bool | str = False,
        channels_last: bool = False,
        train_on: Literal["noisy", "clean"] = "noisy",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = EncoderClassifier.from_hparams(self.hparams)
        self.schedule = NoiseSchedule(schedule, timesteps)
        object.__setattr__(self, "_train_net", compiled(self.net, compile))
        # One running mean per (stage, quantity, quartile); weights mask the quartile, so no
        # boolean indexing (and no host sync) in the step.
        names = [f"{stage}_{what}_q{q}" for stage in ("train", "val") for what in ("loss", "acc")
                 for q in range(QUARTILES)]
        self.quartile_metrics = nn.ModuleDict({name: MeanMetric() for name in names})

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str, generator: torch.Generator | None) -> Tensor:
        x0, y = batch
        x0 = maybe_channels_last(x0, self.hparams.channels_last)
        T = self.schedule.timesteps
        t = torch.randint(0, T, (len(x0),), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        if self.hparams.get("train_on", "noisy") == "clean":  # the data itself, time input 0 (cg_clean)
            t = torch.zeros_like(t)
            x_in = x0
        else:
            x_in = self.schedule.q_sample(x0, t, noise)
        logits = self._train_net(x_in, t).float()
        per_sample = F.cross_entropy(logits, y, reduction="none")
        correct = (logits.argmax(-1) == y).float()
        loss = per_sample.mean()
        # Train: per step (names stay exactly train/loss, train/acc); val: epoch means over ranks.
        on_step = stage == "train"
        for what, value in (("loss", loss), ("acc", correct.mean())):
            self.log(f"{stage}/{what}", value, prog_bar=True, on_step=on_step, on_epoch=not on_step,
                     sync_dist=not on_step, batch_size=len(x0))
        quartile = torch.div(t * QUARTILES, T, rounding_mode="floor")
        for q in range(QUARTILES):
            mask = (quartile == q).float()
            for what, values in (("loss", per_sample), ("acc", correct)):
                metric = self.quartile_metrics[f"{stage}_{what}_q{q}"]
                metric.update(values.detach(), weight=mask)
                self.log(f"{stage}/{what}_q{q}", metric, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train", None)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite classifier loss ({loss.item()}) at global step {self.global_step}; the last good "
                "checkpoint is last.ckpt in the run's checkpoints/ folder. Lower --model.init_args.lr.")
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        gen = torch.Generator(device=batch[0].device).manual_seed(batch_idx)
        self._step(batch, "val", gen)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        return adamw_with_warmup(self.net.parameters(), hp.lr, hp.weight_decay, hp.warmup_steps, self.device)

    def compatibility(self) -> dict:
        """What a diffusion model must share with this classifier for guidance to be meaningful."""
        hp = self.hparams
        return {"num_classes": hp.num_classes, "image_size": hp.image_size, "channels": hp.channels,
                "schedule": hp.schedule, "timesteps": hp.timesteps}
