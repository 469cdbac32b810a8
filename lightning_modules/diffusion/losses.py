"""Training objectives: label dropout and the denoising loss (pure torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .schedule import NoiseSchedule


def drop_labels(y: Tensor, p_uncond: float, null_label: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by the null index independently with probability p_uncond (CFG training)."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


def noised(schedule: NoiseSchedule, x0: Tensor, generator: torch.Generator | None = None
           ) -> tuple[Tensor, Tensor, Tensor]:
    """(t, ε, x_t): a uniformly drawn training timestep per sample, its noise and the noised batch. Every training
    objective draws them here, in this order, so on the same generator they see the same points."""
    t = torch.randint(0, schedule.timesteps, (len(x0),), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    return t, noise, schedule.q_sample(x0, t, noise)


def denoising_loss(net: nn.Module, schedule: NoiseSchedule, x0: Tensor, y: Tensor, target: str = "eps",
                   generator: torch.Generator | None = None) -> Tensor:
    """MSE between the network output at a uniformly drawn t and the chosen target (ε or v)."""
    t, noise, x_t = noised(schedule, x0, generator)
    out = net(x_t, t, y)
    return F.mse_loss(out.float(), schedule.training_target(target, x0, noise, t).float())
