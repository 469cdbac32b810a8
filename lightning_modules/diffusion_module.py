"""The class-conditional diffusion model, trained with label dropout so one network does CFG.

This module wires parts: the UNet (networks/), the schedule, loss and sampler (diffusion/), an EMA
twin that generates every evaluation sample. Sampling-time knobs (scales, steps, sampler, seeds)
are arguments of `sample`, never hyperparameters: a checkpoint must not override them.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn

from .diffusion import GuidanceOptions, GuidedDenoiser, NoiseSchedule, OptionError, SamplerOptions, make_rule, sample
from .diffusion.guidance import GradFn
from .diffusion.guidance_training import (
    check_training_options,
    guidance_free_loss,
    model_guidance_loss,
    step_flops,
)
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
        guidance_training: the training objective (diffusion/guidance_training.py): none (label dropout only), mg
            (model guidance: the EMA's CFG direction moves the target) or gft (guidance-free training: the network
            also takes β and samples CFG at s = 1/β).
        mg_scale: MG's w, target' = target + w·(F̃_c − F̃_u); the paper's scale 1.45 is 1 + w. γ = 1/(1 − w).
        mg_high: MG corrects only where σ_t/(√ᾱ_t + σ_t) (the paper's flow time) is below this; 1 = every step.
        gft_beta_range: GFT's β ~ U(lo, hi) per sample; the model then samples CFG scales 1/hi .. 1/lo.
        init_from: a ConditionalDiffusion checkpoint whose EMA weights start both the network and its EMA (a
            fine-tune, e.g. MG or GFT from a label-dropout model); read weights-only. A resumed fit ignores it.
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
        guidance_training: Literal["none", "mg", "gft"] = "none",
        mg_scale: float = 0.45,
        mg_high: float = 0.75,
        gft_beta_range: tuple[float, float] = (0.0, 1.0),
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        check_training_options(guidance_training, mg_scale, mg_high, gft_beta_range, p_uncond)
        self.save_hyperparameters()
        self.net = UNet.from_hparams(self.hparams)
        self.ema_net = copy.deepcopy(self.net).requires_grad_(False)
        self.ema = EMA(ema_decay)
        self.schedule = NoiseSchedule(schedule, timesteps)
        self.null_label = num_classes
        # Not a registered sub-module: the compiled wrapper shares self.net's parameters.
        object.__setattr__(self, "_train_net", compiled(self.net, compile))
        # What a fit cost (`training_cost` in every checkpoint): FLOPs per optimiser step, measured once on the
        # first batch; wall seconds summed over the fit and the runs it resumed from.
        self._flops_per_batch: float | None = None
        self._batch_size = 0
        self._seconds_before, self._fit_started = 0.0, None
        self._init_cost: dict | None = None  # the training_cost of the init_from checkpoint (a fine-tune's start)
        self._loaded_cost: dict | None = None  # the training_cost of the checkpoint this module was loaded from

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.net(x, t, y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        x = maybe_channels_last(x, self.hparams.channels_last)
        y = drop_labels(y, self.hparams.p_uncond, self.null_label)
        if self._flops_per_batch is None:
            self._flops_per_batch, self._batch_size = self.count_step_flops(x, y), len(x)
        loss = self.objective(self._train_net, self.ema_net, x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}; the run stops "
                "here and the last good checkpoint is last.ckpt in the run's checkpoints/ folder. Lower "
                "--model.init_args.lr or train with --trainer.precision=32.")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def objective(self, net: nn.Module, ema_net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The training loss of `guidance_training` on a batch whose labels are already dropped."""
        hp = self.hparams
        if hp.guidance_training == "mg":
            return model_guidance_loss(net, ema_net, self.schedule, x, y, self.null_label, hp.mg_scale, hp.mg_high,
                                       hp.prediction)
        if hp.guidance_training == "gft":
            return guidance_free_loss(net, self.schedule, x, y, self.null_label, hp.gft_beta_range, hp.prediction)
        return denoising_loss(net, self.schedule, x, y, hp.prediction)

    def count_step_flops(self, x: Tensor, y: Tensor) -> float:
        """FLOPs of one training step on this batch, counted on the device it trains on (so they convert to the
        sweep's sampling FLOPs, counted there too) with an eager copy of the network: the real one's gradients, its
        compiled graph and DDP's hooks stay untouched, and the random generators are put back (an exact resume
        stays exact). The EMA (MG's guiding branch) is used as it is: it runs without grad, in eval mode."""
        net = copy.deepcopy(self.net)
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return step_flops(lambda: self.objective(net, self.ema_net, x, y))

    def on_train_start(self) -> None:
        self._fit_started = time.perf_counter()

    def training_cost(self) -> dict:
        """FLOPs per optimiser step (all ranks and accumulated batches), per sample, steps, wall seconds and the
        `init` checkpoint's own training_cost (None from scratch): `guidance_training.cost_totals` sums them."""
        if self._flops_per_batch is None and self._loaded_cost is not None:
            return self._loaded_cost  # nothing trained in this process yet (validate, test): the checkpoint's own
        trainer = self._trainer
        accumulate, world = (trainer.accumulate_grad_batches, trainer.world_size) if trainer is not None else (1, 1)
        per_batch = self._flops_per_batch or 0.0
        running = 0.0 if self._fit_started is None else time.perf_counter() - self._fit_started
        return {"objective": self.hparams.guidance_training, "flops_per_step": per_batch * world * accumulate,
                "flops_per_sample": per_batch / max(1, self._batch_size), "batch_size": self._batch_size * world
                * accumulate, "steps": int(self.global_step), "seconds": self._seconds_before + running,
                "init": self._init_cost}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["training_cost"] = self.training_cost()

    def setup(self, stage: str) -> None:
        # A fine-tune's start (not on resume: the checkpoint being resumed holds the fit's own weights).
        if stage == "fit" and self.hparams.init_from and not self.trainer.ckpt_path:
            load_initial_weights(self, self.hparams.init_from)

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
        # A resumed fit adds its wall time to the runs before it (its FLOPs are counted again on its first batch).
        cost = checkpoint.get("training_cost") or {}
        self._loaded_cost = cost or None
        self._seconds_before, self._init_cost = float(cost.get("seconds", 0.0)), cost.get("init")

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
        rule, labels = make_rule(method, options), labels.to(self.device)
        den = GuidedDenoiser(net, self.schedule, labels, self.null_label, rule, scales, grad_fn=grad_fn,
                             prediction=self.hparams.prediction)
        shape = (self.hparams.channels, self.hparams.image_size, self.hparams.image_size)
        enabled = autocast_dtype is not None
        with torch.autocast(self.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
            images = sample(den, shape, keys.to(self.device), sampling, progress=progress)  # options whole
        net.train(was_training)
        return images.float()


# What a checkpoint must share with the model it initialises: the network's shape, the schedule and what it predicts.
INIT_KEYS = ("num_classes", "image_size", "channels", "base_channels", "channel_mult", "num_res_blocks",
             "attention_resolutions", "cross_attention_resolutions", "num_heads", "norm", "schedule", "timesteps",
             "prediction")


def load_initial_weights(module: ConditionalDiffusion, path: str) -> None:
    """Start the network and its EMA from the EMA weights of a ConditionalDiffusion checkpoint (thu-ml/GFT's fine-tune
    loads the pretrained EMA into both), read weights-only; a β-embedding the checkpoint lacks keeps its zero init,
    so the fine-tune starts as exactly that model. Any mismatch is an OptionError before the first step."""
    from .sweep.loading import read_checkpoint  # the one safe reader (a sweep module: imported when needed)

    option = "model.init_args.init_from"
    ckpt = read_checkpoint(path, option)
    hp = dict(ckpt["hyper_parameters"])
    if "p_uncond" not in hp:
        raise OptionError(option, f"{path} is not a ConditionalDiffusion checkpoint", "pass a diffusion fit's "
                          "checkpoints/last.ckpt")

    def plain(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    differ = [f"{k}: {plain(hp.get(k))!r} there, {plain(module.hparams.get(k))!r} here" for k in INIT_KEYS
              if plain(hp.get(k)) != plain(module.hparams.get(k))]
    if differ:
        raise OptionError(option, f"{path} describes another network ({'; '.join(differ)})",
                          "give the same network, schedule and prediction options as the checkpoint's")
    state = {k[len("ema_net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema_net.")}
    missing, unexpected = module.net.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"beta_embed.weight"}:
        raise OptionError(option, f"the weights in {path} do not fit this network (missing {list(missing)[:3]}, "
                          f"unexpected {list(unexpected)[:3]}; a GFT checkpoint fine-tunes only as gft)",
                          "pass a checkpoint of the same architecture")
    module.ema_net.load_state_dict(module.net.state_dict())
    # Its cost is the fine-tune's too: a fine-tuned model is charged for the fit it started from.
    module._init_cost = ckpt.get("training_cost") or {"objective": hp.get("guidance_training", "none"),
                                                       "unrecorded": True}
