"""Guidance trained into the network (diffusion/guidance_training.py): MG and GFT losses, the β input, their sampling
rules (methods/trained.py), fine-tuning, exact resume and the training FLOPs a fit records."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules import ConditionalDiffusion
from lightning_modules.diffusion import GuidedDenoiser, NoiseSchedule, OptionError, make_rule
from lightning_modules.diffusion.guidance import Predictions
from lightning_modules.diffusion.guidance_training import (
    beta_for_scale,
    guidance_free_loss,
    mg_correction,
    mg_gamma,
    model_guidance_loss,
    scale_for_beta,
    step_flops,
)
from lightning_modules.diffusion.losses import denoising_loss, noised
from lightning_modules.diffusion.methods.trained import BetaNetwork
from lightning_modules.diffusion_module import load_initial_weights
from lightning_modules.networks import UNet

from .helpers import CONFIGS, FAST_TRAINER, ROOT, TINY_NET
from .test_checkpointing import build, load

K, NULL = 10, 10
SCHEDULE = NoiseSchedule("cosine", 1000)


def unet(beta: bool = True, seed: int = 0) -> UNet:
    """A tiny UNet with every weight random (the zero-initialised output and β map too), so outputs depend on all."""
    torch.manual_seed(seed)
    net = UNet(8, 1, K, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
               beta_conditioning=beta)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def batch(n: int = 12):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, K, (n,), generator=g)
    y[::4] = NULL  # some labels dropped
    return torch.randn(n, 1, 8, 8, generator=g).clamp(-1, 1), y


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("target", ["eps", "v"])
def test_mg_at_w0_and_gft_at_beta1_are_the_label_dropout_loss(target):
    net, ema = unet(), unet(seed=1)
    x, y = batch()
    plain = denoising_loss(net, SCHEDULE, x, y, target, generator=gen())
    mg = model_guidance_loss(net, ema, SCHEDULE, x, y, NULL, 0.0, 1.0, target, generator=gen())
    gft = guidance_free_loss(net, SCHEDULE, x, y, NULL, (1.0, 1.0), target, generator=gen())
    assert plain > 0 and torch.equal(mg, plain) and torch.equal(gft, plain)


class Fixed(nn.Module):
    """A fixed 'EMA network' with a closed form, F(x, t, y) = x·(1 + y/10) + t/1000, and a dropout that would show if
    it ran in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x, t, y):
        return self.drop(x * (1 + y.view(-1, 1, 1, 1) / 10) + t.view(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("target", ["eps", "v"])
def test_mg_target_is_the_hand_computed_one(target):
    net, ema, (x, y), w, high = unet(), Fixed().train(), batch(), 0.45, 0.75
    t, noise, x_t = noised(SCHEDULE, x, gen())
    a, s = (SCHEDULE.alphas_cumprod[t].sqrt().float().view(-1, 1, 1, 1),
            (1 - SCHEDULE.alphas_cumprod[t]).sqrt().float().view(-1, 1, 1, 1))
    delta = x_t * (y.view(-1, 1, 1, 1) / 10 - NULL / 10)  # F(c) − F(∅), by hand
    on = ((y != NULL).view(-1, 1, 1, 1) & (s / (a + s) < high)).float()
    assert 0 < on.sum() < len(y)  # both kinds of sample occur
    plain = noise if target == "eps" else a * noise - s * x
    expected = F.mse_loss(net(x_t, t, y), plain + w * on * delta)
    got = model_guidance_loss(net, ema, SCHEDULE, x, y, NULL, w, high, target, generator=gen())
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert ema.training  # put back in its mode
    if target == "v":  # the v-correction is the ε-correction: ε(v + w·Δv) = ε + w·(ε_c − ε_u)
        corr = mg_correction(ema, SCHEDULE, x_t, t, y, NULL, w, high)
        as_eps = SCHEDULE.eps_from_output("v", plain + corr, x_t, t)
        ema.eval()
        eps_c, eps_u = (SCHEDULE.eps_from_output("v", ema(x_t, t, c), x_t, t) for c in (y, torch.full_like(y, NULL)))
        torch.testing.assert_close(as_eps, noise + w * on * (eps_c - eps_u), rtol=1e-4, atol=1e-5)


def test_no_gradient_reaches_the_ema_or_the_detached_branch():
    x, y = batch()
    net, ema = unet(), unet(seed=1).requires_grad_(True)  # even if the EMA could take gradients
    model_guidance_loss(net, ema, SCHEDULE, x, y, NULL, 0.45, 1.0, generator=gen()).backward()
    assert all(p.grad is None for p in ema.parameters()) and all(p.grad is not None for p in net.parameters())
    # MG's gradient is that of an MSE to a constant target.
    t, noise, x_t = noised(SCHEDULE, x, gen())
    goal = (noise + mg_correction(ema, SCHEDULE, x_t, t, y, NULL, 0.45)).detach()
    ref = unet()
    F.mse_loss(ref(x_t, t, y), goal).backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)

    # GFT: only the conditional branch carries the gradient; the unconditional one is a constant.
    net, ref = unet(), unet()
    guidance_free_loss(net, SCHEDULE, x, y, NULL, (0.0, 1.0), generator=gen()).backward()
    g = gen()
    t, noise, x_t = noised(SCHEDULE, x, g)
    beta = torch.rand(len(x), generator=g)
    with torch.no_grad():
        uncond = ref.eval()(x_t, t, torch.full_like(y, NULL), beta=torch.ones_like(beta))
    b = beta.view(-1, 1, 1, 1)
    out = ref.train()(x_t, t, y, beta=torch.where(y == NULL, torch.ones_like(beta), beta))
    F.mse_loss(b * out + (1 - b) * uncond, noise).backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_the_beta_input_is_off_by_default_and_starts_as_the_plain_network():
    plain, fresh = unet(beta=False), UNet(8, 1, K, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                          attention_resolutions=(), beta_conditioning=True)
    assert not any("beta" in k for k in plain.state_dict())
    assert set(fresh.state_dict()) - set(plain.state_dict()) == {"beta_embed.weight"}
    assert not fresh.beta_embed.weight.any()  # zero-initialised: a fine-tune starts as its checkpoint
    fresh.load_state_dict(plain.state_dict(), strict=False)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 300, 600, 999]), torch.arange(4)
    assert torch.equal(fresh(x, t, y, beta=torch.rand(4)), plain(x, t, y))
    with pytest.raises(ValueError, match="beta_conditioning"):
        plain(x, t, y, beta=torch.ones(4))
    hp = {**ConditionalDiffusion(guidance_training="gft").hparams}
    assert UNet.from_hparams(hp).beta_embed is not None
    assert UNet.from_hparams({**hp, "guidance_training": "mg"}).beta_embed is None


def test_scale_and_beta_round_trip_and_gft_at_beta_is_cfg_at_one_over_beta():
    for beta in (1.0, 0.8, 0.5, 0.25, 0.1):
        assert beta_for_scale(scale_for_beta(beta)) == pytest.approx(beta, rel=1e-15)
        assert make_rule("gft").gamma(scale_for_beta(beta)) == pytest.approx(1 / beta)
    s = torch.tensor([1.0, 1.5, 3.0])
    torch.testing.assert_close(scale_for_beta(beta_for_scale(s)), s)
    # The GFT optimum: F(c, β) with β·F + (1 − β)·ε_u = ε*_c is ε_u + (ε*_c − ε_u)/β, what CFG gives at s = 1/β.
    g = gen()
    eps_c, eps_u, x = (torch.randn(3, 1, 8, 8, generator=g) for _ in range(3))
    beta = torch.tensor([1.0, 0.5, 0.2]).view(-1, 1, 1, 1)
    optimum = eps_u + (eps_c - eps_u) / beta
    p = Predictions(x, torch.zeros(3, dtype=torch.long), x, x, {}, cond=eps_c, uncond=eps_u)
    cfg = make_rule("cfg").combine(p, scale_for_beta(beta.flatten()), torch.tensor(1.0)).eps
    torch.testing.assert_close(cfg, optimum)
    # MG's fixed point: iterating ε_c ← ε*_c + w·(ε_c − ε*_u) ends at CFG with γ = 1/(1 − w).
    w, e = 0.45, eps_c.clone()
    for _ in range(200):
        e = eps_c + w * (e - eps_u)
    torch.testing.assert_close(e, eps_u + mg_gamma(w) * (eps_c - eps_u))
    assert make_rule("mg").gamma(w) == pytest.approx(1 / 0.55) and make_rule("mg").plain(w) == "cond"


def gft_model() -> ConditionalDiffusion:
    model = ConditionalDiffusion(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                                 guidance_training="gft")
    model.ema_net.load_state_dict(unet().state_dict())
    return model


def test_gft_sampling_at_beta_1_is_plain_conditional_sampling_and_beta_reaches_the_network():
    from lightning_modules.diffusion import SamplerOptions

    model, labels, keys = gft_model(), torch.arange(4), torch.arange(4)
    opts = SamplerOptions("ddim", 5)
    at_1 = model.sample(labels, keys, method="gft", scales=1.0, sampling=opts)
    assert torch.equal(at_1, model.sample(labels, keys, method="cfg", scales=1.0, sampling=opts))
    at_2 = model.sample(labels, keys, method="gft", scales=2.0, sampling=opts)
    assert not torch.allclose(at_2, at_1)
    mixed = model.sample(labels, keys, method="gft", scales=[1.0, 2.0, 1.0, 2.0], sampling=opts)
    torch.testing.assert_close(mixed[1::2], at_2[1::2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[::2], at_1[::2], atol=1e-5, rtol=1e-5)
    x, net = torch.randn(4, 1, 8, 8), model.ema_net.eval()
    step = GuidedDenoiser(BetaNetwork(net, torch.full((4,), 0.5)), SCHEDULE, labels, NULL, "none").at(x, 500).eps
    torch.testing.assert_close(step, net(x, torch.full((4,), 500), labels, beta=torch.full((4,), 0.5)))
    # The denoiser feeds the rule's β = 1/s itself; a network without a β input is refused before sampling.
    torch.testing.assert_close(GuidedDenoiser(net, SCHEDULE, labels, NULL, "gft", 2.0).at(x, 500).eps, step)
    with pytest.raises(ValueError, match="guidance_training gft"):
        GuidedDenoiser(unet(beta=False), SCHEDULE, labels, NULL, "gft", 2.0)


@pytest.mark.parametrize("bad, option", [({"guidance_training": "cfg"}, "guidance_training"),
                                         ({"guidance_training": "mg", "p_uncond": 0.0}, "p_uncond"),
                                         ({"guidance_training": "mg", "mg_scale": 1.0}, "mg_scale"),
                                         ({"guidance_training": "mg", "mg_high": 0.0}, "mg_high"),
                                         ({"guidance_training": "gft", "gft_beta_range": (0.5, 0.2)},
                                          "gft_beta_range")])
def test_bad_settings_fail_before_training(bad, option):
    with pytest.raises(OptionError, match=option):
        ConditionalDiffusion(**bad)


def objective(kind: str, *extra: str) -> list[str]:
    return [f"--model.init_args.guidance_training={kind}", *extra]


@pytest.mark.parametrize("kind", ["mg", "gft"])
def test_killed_and_resumed_fit_ends_with_the_uninterrupted_weights(tmp_path, kind):
    # 23 steps per epoch at batch 64: the kill at step 8 is mid-epoch, on a periodic (every 4) checkpoint.
    extra = ["--trainer.max_steps=12", "--data.batch_size=64", *objective(kind)]
    full = build("diffusion", tmp_path / "full", every=4, extra=extra)
    full.trainer.fit(full.model, full.datamodule)
    killed = build("diffusion", tmp_path / "killed", every=4, kill=8, extra=extra)
    with pytest.raises(RuntimeError, match="killed"):
        killed.trainer.fit(killed.model, killed.datamodule)
    last = killed.trainer.checkpoint_callback.last_model_path
    assert load(last)["global_step"] == 8 and load(last)["training_cost"]["steps"] == 8
    resumed = build("diffusion", tmp_path / "killed", every=4, extra=extra)
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=last)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert resumed.trainer.global_step == 12 and a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # network and EMA, bit for bit
    cost = load(resumed.trainer.checkpoint_callback.last_model_path)["training_cost"]
    assert cost["steps"] == 12 and cost["seconds"] >= load(last)["training_cost"]["seconds"] > 0


def test_recorded_training_flops_are_a_flop_count_of_one_step(tmp_path):
    flops = {}
    for kind in ("none", "mg", "gft"):
        cli = build("diffusion", tmp_path / kind, extra=["--trainer.max_steps=2", "--data.batch_size=64",
                                                          *objective(kind)])
        cli.trainer.fit(cli.model, cli.datamodule)
        cost = load(cli.trainer.checkpoint_callback.last_model_path)["training_cost"]
        model = cli.model
        x, y = next(iter(cli.datamodule.train_dataloader()))
        expected = step_flops(lambda m=model, x=x, y=y: m.objective(m.net, m.ema_net, x, y))
        assert cost["objective"] == kind and cost["steps"] == 2 and cost["batch_size"] == 64
        assert cost["flops_per_step"] == expected and cost["flops_per_sample"] == expected / 64
        flops[kind] = expected
    forward = flops["none"] / 3  # backward ≈ 2 forwards on this network (convolutions and linears only)
    assert flops["mg"] - flops["none"] == pytest.approx(2 * forward, rel=0.01)  # the EMA's two branches
    assert flops["gft"] - flops["none"] == pytest.approx(forward, rel=0.02)  # the unconditional branch


@pytest.mark.parametrize("kind, prediction", [("gft", "eps"), ("mg", "v")])
def test_fine_tune_starts_from_a_label_dropout_checkpoint(tmp_path, kind, prediction):
    base = build("diffusion", tmp_path / "base", extra=["--trainer.max_steps=3", "--data.batch_size=64",
                                                         f"--model.init_args.prediction={prediction}"])
    base.trainer.fit(base.model, base.datamodule)
    path = base.trainer.checkpoint_callback.last_model_path
    ema = {k[len("ema_net."):]: v for k, v in load(path)["state_dict"].items() if k.startswith("ema_net.")}
    hp = {k: v for k, v in base.model.hparams.items() if not k.startswith("_")}
    model = ConditionalDiffusion(**{**hp, "guidance_training": kind})
    load_initial_weights(model, path)
    for net in (model.net, model.ema_net):
        state = net.state_dict()
        assert all(torch.equal(state[k], v) for k, v in ema.items())
        assert set(state) - set(ema) == ({"beta_embed.weight"} if kind == "gft" else set())
    with pytest.raises(OptionError, match="init_from"):
        load_initial_weights(ConditionalDiffusion(**{**hp, "base_channels": 32}), path)
    tuned = build("diffusion", tmp_path / "tuned", extra=["--trainer.max_steps=2", "--data.batch_size=64",
                                                           f"--model.init_args.prediction={prediction}",
                                                           *objective(kind, f"--model.init_args.init_from={path}")])
    before = {k: v.clone() for k, v in tuned.model.net.state_dict().items()}
    tuned.trainer.fit(tuned.model, tuned.datamodule)
    assert tuned.trainer.global_step == 2 and not torch.equal(before["conv_in.weight"], ema["conv_in.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mg", "gft"])
def test_ddp_fit_counts_every_rank_and_resumes(tmp_path, kind):
    """Two CPU processes (gloo), as tests/test_ddp.py: the objective trains under DDP, resumes, and its recorded
    FLOPs per step are both ranks' (twice one rank's batch)."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    args = ["fit", "--config", str(CONFIGS / "digits_diffusion.yaml"), *TINY_NET, *FAST_TRAINER,
            "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=32",
            *objective(kind)]
    for steps, out, resume in ((4, tmp_path / "a", []), (6, tmp_path / "b", None)):
        if resume is None:
            (first,) = (tmp_path / "a").glob("guidelab/*/checkpoints/last.ckpt")
            resume = [f"--ckpt_path={first}"]
        result = subprocess.run([sys.executable, "-m", "experiments.train", *args, f"--trainer.max_steps={steps}",
                                 f"--trainer.logger.init_args.save_dir={out}", *resume], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    (last,) = (tmp_path / "b").glob("guidelab/*/checkpoints/last.ckpt")
    ckpt = load(last)
    assert ckpt["global_step"] == 6 and ckpt["training_cost"]["batch_size"] == 32 * 2
    model = ConditionalDiffusion(**{k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")})
    x, y = torch.zeros(32, 1, 8, 8), torch.zeros(32, dtype=torch.long)  # one rank's batch
    one_rank = step_flops(lambda: model.objective(model.net, model.ema_net, x, y))
    assert ckpt["training_cost"]["flops_per_step"] == 2 * one_rank


def test_trained_in_methods_are_refused_on_a_model_trained_otherwise(tmp_path):
    from lightning_modules.diffusion import OptionError
    from lightning_modules.sweep.planning import check_trained_guidance

    from .test_sweep_engine import config, make_models

    models = make_models()  # guidance_training unset: the plain label-dropout objective
    check_trained_guidance(config(tmp_path), models)
    for method in ("mg", "gft"):
        with pytest.raises(OptionError, match=f"sweep.methods.*{method} samples a model trained with"):
            check_trained_guidance(config(tmp_path, methods=[method], scales=None), models)
    models.diffusion.hparams["guidance_training"] = "gft"
    check_trained_guidance(config(tmp_path, methods=["gft", "cfg"], scales=None), models)
