"""The class-conditional diffusion model, trained with label dropout so one network does CFG.

This module wires parts: the UNet (networks/), the schedule, loss and sampler (diffusion/), an EMA
twin that generates every evaluation sample. Sampling-time knobs (scales, steps, sampler, seeds)
are arguments of `sample`, never hyperparameters: a checkpoint must not override them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from torch import Tensor

from .diffusion import GuidanceOptions, GuidedDenoiser, NoiseSchedule, SamplerOptions, make_rule, sample
from .diffusion.guidance import GradFn
from .diffusion.losses import denoising_loss, drop_labels
from .networks import UNet
from .training import EMA, adamw_with_warmup, compiled, maybe_channels_last


class ConditionalDiffusion(L.LightningModule):
    """ε- or v-prediction UNet conditioned on a class label, with the null label for CFG.

    Args:
        num_classes: classes of the data (linked from the DataModule); the null label is index num_classes.
        image_size: image side in pixels (linked from the DataModule).
        channels: image channels (linked from the DataModule).
        base_channels: channels of the UNet's first level.
        channel_mult: channel multiplier per resolution level (one level per entry).
        num_res_blocks: residual blocks per level.
        attention_resolutions: feature-map sizes with self-attention, e.g. [16].
        cross_attention_resolutions: feature-map sizes with cross-attention to learned label tokens.
        dropout: dropout inside the residual blocks.
        num_heads: attention heads.
        norm: how time and label condition the blocks: adagn (GroupNorm · (1 + scale) + shift) or additive.
        schedule: noise schedule, shared with the noisy classifier: cosine or linear.
        timesteps: training timesteps T.
        prediction: what the network predicts: eps or v.
        p_uncond: label-dropout probability during training (what makes CFG possible).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up.
        ema_decay: decay of the EMA weights that generate every evaluation sample.
        compile: torch.compile the training network: false, true or a mode (default, max-autotune, ...).
        channels_last: train in channels_last memory format (faster convolutions on GPUs).
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 8,
        channels: int = 1,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        cross_attention_resolutions: Sequence[int] = (),
        dropout: float = 0.1,
        num_heads: int = 4,
        norm: Literal["adagn", "additive"] = "adagn",
        schedule: Literal["cosine", "linear"] = "cosine",
        timesteps: int = 1000,
        prediction: Literal["eps", "v"] = "eps",
        p_uncond: float = 0.1,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 500,
        ema_decay: float = 0.9999,
        compile: bool | str = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = UNet.from_hparams(self.hparams)
        self.ema_net = copy.deepcopy(self.net).requires_grad_(False)
        self.ema = EMA(ema_decay)
        self.schedule = NoiseSchedule(schedule, timesteps)
        self.null_label = num_classes
        # Not a registered sub-module: the compiled wrapper shares self.net's parameters.
        object.__setattr__(self, "_train_net", compiled(self.net, compile))

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.net(x, t, y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        x = maybe_channels_last(x, self.hparams.channels_last)
        y = drop_labels(y, self.hparams.p_uncond, self.null_label)
        loss = denoising_loss(self._train_net, self.schedule, x, y, self.hparams.prediction)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}; the run stops "
                "here and the last good checkpoint is last.ckpt in the run's checkpoints/ folder. Lower "
                "--model.init_args.lr or train with --trainer.precision=32.")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.update(self.ema_net, self.net, self.global_step)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # EMA weights (what generates samples), with noise fixed per batch so epochs compare.
        x, y = batch
        gen = torch.Generator(device=x.device).manual_seed(batch_idx)
        loss = denoising_loss(self.ema_net, self.schedule, x, y, self.hparams.prediction, generator=gen)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(x))

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        return adamw_with_warmup(self.net.parameters(), hp.lr, hp.weight_decay, hp.warmup_steps, self.device)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # In `validate`/`test` the module's global_step stays 0: remember the checkpoint's own step.
        self._checkpoint_step = int(checkpoint.get("global_step", 0))

    @property
    def trained_steps(self) -> int:
        """Optimiser steps behind the current weights (during fit, or of the loaded checkpoint)."""
        return max(self.global_step, getattr(self, "_checkpoint_step", 0))

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor,
        keys: Tensor,
        *,
        method: str = "cfg",
        scales: float | Sequence[float] = 1.0,
        options: GuidanceOptions | None = None,
        grad_fn: GradFn | None = None,
        sampling: SamplerOptions | None = None,
        use_ema: bool = True,
        autocast_dtype: torch.dtype | None = None,
        progress: bool = False,
    ) -> Tensor:
        """One image per label in [-1, 1]; sample i starts from the noise of keys[i] (see diffusion.noise).

        `method` and per-sample `scales` pick the guidance rule (docs/conventions.md: cfg at 1 is the
        conditional model, at 0 the unconditional one); classifier-guided methods need `grad_fn(x, t, y)`,
        e.g. `functools.partial(classifier_grad, classifier)`.
        """
        sampling = sampling or SamplerOptions()
        sampling.check(self.hparams.timesteps)
        net = self.ema_net if use_ema else self.net
        was_training = net.training
        net.eval()
        den = GuidedDenoiser(net, self.schedule, labels.to(self.device), self.null_label, make_rule(method, options),
                             scales, grad_fn=grad_fn, prediction=self.hparams.prediction)
        shape = (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)
        enabled = autocast_dtype is not None
        with torch.autocast(self.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
            images = sample(den, shape, keys.to(self.device), sampling, progress=progress)  # options whole
        net.train(was_training)
        return images.float()
