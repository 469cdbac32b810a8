"""Training objectives that build guidance into the network, so it samples guided in one evaluation (pure torch).

`none` is the label-dropout loss (`losses.denoising_loss`). Both others keep label dropout: they need the null label.

* `mg`, model guidance (Tang et al. 2025, arXiv 2502.12154; code tzco/Diffusion-wo-CFG `train.py`, read in its fork
  Peterande/Diffusion-wo-CFG): the target of a labelled sample is moved by the EMA network's own CFG direction,
      target' = target + w·sg(F̃(x_t, c) − F̃(x_t, ∅)),
  F̃ the EMA network in eval mode, in the network's own output space (their flow model corrects its velocity). Their
  code adds (mgw − 1)·(pred_c − pred_u) with mgw = 1.45, so their mgw is 1 + w here (default w = 0.45). Samples whose
  label was dropped regress the plain target (scale 0 there), and the correction acts only where their time t < 0.75
  (t = 1 is noise); on this schedule their t is σ_t/(√ᾱ_t + σ_t), the same signal-to-noise ratio (`mg_high`).
  For v-prediction the correction is the v-difference: v = ε/√ᾱ_t − (σ_t/√ᾱ_t)·x_t at fixed x_t, so
  v_c − v_u = (ε_c − ε_u)/√ᾱ_t and the v-target v + w·(v_c − v_u) is, in ε, exactly ε + w·(ε_c − ε_u).
  Fixed point (EMA = network, ε_u = ε*_u): ε_c = ε*_c + w·(ε_c − ε*_u), i.e. CFG at s = γ = 1/(1 − w).
* `gft`, guidance-free training (Chen et al., ICML 2025, arXiv 2501.15420; thu-ml/GFT DiT/diffusion/
  gaussian_diffusion.py `training_losses`, the `rm_guidance` branch): β ~ U(β_min, β_max) per sample (their range
  [0, 1]) is an input of the network; the loss is
      ‖target − (β·F_θ(x_t, c, β) + (1 − β)·sg[F_θ(x_t, ∅, 1)])‖²,
  the gradient through the conditional branch only, the unconditional one the *online* network in eval mode without
  grad. A dropped label enters the network at β = 1 (their DiT.forward: where(drop_ids, 1, β)) while the loss mixes
  with the drawn β: its value is the plain unconditional loss, its gradient scaled by β. At the optimum
  F_θ(c, β) = F_u + (1/β)·(F*_c − F_u): the β-network is CFG at s = 1/β (their sample_ddp.py: beta = 1/cfg_scale).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import noised
from .options import OptionError
from .schedule import NoiseSchedule

OBJECTIVES = ("none", "mg", "gft")


def check_training_options(guidance_training: str, mg_scale: float, mg_high: float,
                           gft_beta_range: Sequence[float], p_uncond: float) -> None:
    """OptionError for the first setting these objectives cannot train with (called before any step)."""
    p = "model.init_args."
    if guidance_training not in OBJECTIVES:
        raise OptionError(f"{p}guidance_training", f"unknown objective {guidance_training!r}",
                          f"choose one of {list(OBJECTIVES)}")
    if guidance_training == "none":
        return
    if not p_uncond > 0:
        raise OptionError(f"{p}p_uncond", f"{guidance_training} needs the null label, but p_uncond = {p_uncond}",
                          "train with label dropout, e.g. --model.init_args.p_uncond 0.1")
    if not (math.isfinite(mg_scale) and mg_scale < 1):
        raise OptionError(f"{p}mg_scale", f"{mg_scale} is not a finite number below 1 (the trained model is CFG at "
                          "γ = 1/(1 − w), unbounded at w = 1)", "use e.g. 0.45 (the paper's 1.45 is 1 + w)")
    if not 0 < mg_high <= 1:
        raise OptionError(f"{p}mg_high", f"{mg_high} is not in (0, 1]", "use 0.75 (the paper's) or 1 (every step)")
    lo, hi = (float(v) for v in gft_beta_range)
    if not 0 <= lo <= hi <= 1 or hi == 0:
        raise OptionError(f"{p}gft_beta_range", f"[{lo}, {hi}] is not a range 0 <= lo <= hi <= 1 with hi > 0",
                          "use [0.0, 1.0] (the paper's)")


def beta_for_scale(scale: Tensor | float) -> Tensor | float:
    """The β at which a GFT network is CFG at scale s (conventions: s = 1 conditional): β = 1/s (Ho & Salimans'
    w = s − 1 gives β = 1/(1 + w))."""
    return 1.0 / scale


def scale_for_beta(beta: Tensor | float) -> Tensor | float:
    """The CFG scale (= γ) a GFT network at β samples: s = 1/β."""
    return 1.0 / beta


def mg_gamma(mg_scale: float) -> float:
    """The CFG scale an MG-trained network samples at, from the fixed point of its target: 1/(1 − w)."""
    return 1.0 / (1.0 - mg_scale)


@contextlib.contextmanager
def evaluating(net: nn.Module) -> Iterator[nn.Module]:
    """`net` in eval mode (no dropout: both papers' guiding branch), its mode restored afterwards."""
    was = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was)


@torch.no_grad()
def mg_correction(ema_net: nn.Module, schedule: NoiseSchedule, x_t: Tensor, t: Tensor, y: Tensor, null_label: int,
                  mg_scale: float, mg_high: float = 1.0) -> Tensor:
    """w·(F̃(x_t, c) − F̃(x_t, ∅)) per sample in the network's output space, from one batched forward of both
    branches (conditional first); 0 for a dropped label and where σ_t/(√ᾱ_t + σ_t) >= mg_high."""
    with evaluating(ema_net):
        both = ema_net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
    cond, uncond = both.float().chunk(2)
    a, s = schedule.coef("sqrt_ab", t, cond), schedule.coef("sqrt_1m_ab", t, cond)
    on = (y != null_label).view_as(a) & (s / (a + s) < mg_high)
    return torch.where(on, mg_scale * (cond - uncond), torch.zeros_like(cond))


def model_guidance_loss(net: nn.Module, ema_net: nn.Module, schedule: NoiseSchedule, x0: Tensor, y: Tensor,
                        null_label: int, mg_scale: float, mg_high: float = 1.0, target: str = "eps",
                        generator: torch.Generator | None = None) -> Tensor:
    """MG: MSE between F_θ(x_t, y) and the plain target plus `mg_correction` (labels already dropped)."""
    t, noise, x_t = noised(schedule, x0, generator)
    out = net(x_t, t, y)
    goal = schedule.training_target(target, x0, noise, t).float()
    return F.mse_loss(out.float(), goal + mg_correction(ema_net, schedule, x_t, t, y, null_label, mg_scale, mg_high))


def guidance_free_loss(net: nn.Module, schedule: NoiseSchedule, x0: Tensor, y: Tensor, null_label: int,
                       beta_range: Sequence[float] = (0.0, 1.0), target: str = "eps",
                       generator: torch.Generator | None = None) -> Tensor:
    """GFT: MSE between the plain target and β·F_θ(x_t, y, β) + (1 − β)·sg[F_θ(x_t, ∅, 1)] (labels already
    dropped; a dropped label's network input is β = 1, its mixing weight the drawn β, as in thu-ml/GFT)."""
    t, noise, x_t = noised(schedule, x0, generator)
    lo, hi = (float(v) for v in beta_range)
    beta = torch.rand(len(x0), device=x0.device, generator=generator) * (hi - lo) + lo
    out = net(x_t, t, y, beta=torch.where(y == null_label, torch.ones_like(beta), beta))
    with torch.no_grad(), evaluating(net):
        uncond = net(x_t, t, torch.full_like(y, null_label), beta=torch.ones_like(beta))
    b = beta.view(-1, *([1] * (x0.ndim - 1)))
    mixed = b * out.float() + (1 - b) * uncond.float()
    return F.mse_loss(mixed, schedule.training_target(target, x0, noise, t).float())


def cost_totals(cost: dict | None) -> dict[str, float]:
    """A model's whole training cost from its checkpoint's `training_cost`: its own steps × FLOPs per step and wall
    seconds, plus those of the checkpoint it was fine-tuned from (`init`, recursively), so a fine-tune is charged for
    its start. NaN where nothing was recorded (a diffusers model, a checkpoint from before costs were recorded)."""
    if not cost or cost.get("unrecorded"):
        return {"flops": math.nan, "seconds": math.nan, "steps": math.nan}
    start = cost_totals(cost["init"]) if cost.get("init") else {"flops": 0.0, "seconds": 0.0, "steps": 0}
    steps = int(cost.get("steps", 0))
    return {"flops": float(cost.get("flops_per_step", 0.0)) * steps + start["flops"],
            "seconds": float(cost.get("seconds", 0.0)) + start["seconds"], "steps": steps + start["steps"]}


def objective_text(hparams: dict) -> str:
    """What a diffusion model was trained with, in one short line for rows and reports: `none` (label dropout),
    `mg w=0.45 t<0.75`, `gft β∈[0, 1]`; `+ init` when it was fine-tuned from another checkpoint."""
    objective = hparams.get("guidance_training", "none")
    text = {"mg": f"mg w={hparams.get('mg_scale', 0.45):g} t<{hparams.get('mg_high', 1.0):g}",
            "gft": "gft β∈[{:g}, {:g}]".format(*hparams.get("gft_beta_range", (0.0, 1.0)))}.get(objective, objective)
    return text + (" + init" if hparams.get("init_from") else "")


def step_flops(loss: Callable[[], Tensor]) -> float:
    """FLOPs of one training step: the loss's forwards (the no-grad guiding ones included) and its backward, counted
    by torch.utils.flop_counter as the sweep counts sampling cost (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss().backward()
    return float(counter.get_total_flops())
