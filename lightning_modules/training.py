"""Pieces both LightningModules share: optimiser with warm-up, compile / channels_last, EMA."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def adamw_with_warmup(params, lr: float, weight_decay: float, warmup_steps: int, device: torch.device) -> dict:
    """AdamW (fused on CUDA) with a linear learning-rate warm-up, stepped per optimiser step."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    warmup = max(1, warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def maybe_channels_last(x: Tensor, enabled: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if enabled else x


def compiled(net: nn.Module, compile: bool | str) -> nn.Module:
    """torch.compile'd view of `net` sharing its parameters (state_dict keys stay un-prefixed).

    `compile`: False (eager), True / "default", or another torch.compile mode ("max-autotune", ...).
    """
    if compile is False or compile is None:
        return net
    mode = None if compile is True or compile == "default" else compile
    return torch.compile(net, mode=mode)


class EMA:
    """Exponential moving average of a network's parameters, kept in a frozen twin network.

    The twin is a registered sub-module, so it moves with the LightningModule, is saved in every
    checkpoint (resume continues it) and is identical on all DDP ranks because every rank applies
    the same update to the same all-reduced weights. Its parameters do not require grad, so DDP
    neither reduces nor re-broadcasts them. One `_foreach_lerp_` per step, no Python loop.
    """

    def __init__(self, decay: float, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup

    def decay_at(self, step: int) -> float:
        # Warm-up (1+n)/(10+n) lets short CPU runs use an average of what they actually trained.
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, ema_net: nn.Module, net: nn.Module, step: int) -> None:
        ema_params = [p for p in ema_net.parameters()]
        params = [p.detach() for p in net.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay_at(step))
        for b_ema, b in zip(ema_net.buffers(), net.buffers()):
            b_ema.copy_(b)
