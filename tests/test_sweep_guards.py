"""Sweep settings that would silently sample the wrong thing fail up front: a guidance band that holds no
sampling step, a guide that is the main model; and SweepModels.to moves every network it holds."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_modules.diffusion import (
    GuidanceOptions,
    NoiseSchedule,
    OptionError,
    SamplerOptions,
    check_guided_steps,
    respaced_timesteps,
)
from lightning_modules.diffusion.guidance import guidance_weight, noise_level
from lightning_modules.networks import EncoderClassifier, UNet
from lightning_modules.sweep import Network, SweepConfig, SweepModels, run_sweep

from .test_sweep_engine import HP, make_models

STEPS = 6  # respaced: 999, 799, 599, 400, 200, 0; cosine σ ≈ 2e4, 3.1, 1.39, 0.74, 0.337, 0.0064


def _config(**guidance) -> SweepConfig:
    return SweepConfig(methods=["cfg"], scales={"cfg": [0.0, 2.0]}, num_samples=4, sampling=SamplerOptions(steps=STEPS),
                       guidance=GuidanceOptions(**guidance), progress=False)


@pytest.mark.parametrize("guidance,option", [
    (dict(sigma_interval=(0.4, 0.5)), "sweep.guidance.sigma_interval"),  # between 0.337 and 0.74
    (dict(sigma_interval=(5.0, 100.0)), "sweep.guidance.sigma_interval"),  # between 3.1 and 2e4
    (dict(interval=(810, 990)), "sweep.guidance.interval"),  # between 799 and 999
    (dict(interval=(700, 990), sigma_interval=(0.1, 1.0)), "sweep.guidance.sigma_interval"),  # each holds a step
])
def test_a_band_that_holds_no_sampling_step_is_an_error_naming_the_steps(guidance, option):
    config = _config(**guidance)  # nothing is known about the model yet: accepted
    with pytest.raises(OptionError) as err:
        config.check(timesteps=1000, schedule="cosine")
    message = str(err.value)
    assert err.value.option == option and "Fix:" in message and "more steps" in message
    assert "t=799" in message and ("σ=0.74" in message if "sigma" in option else True)


def test_a_band_on_training_indices_is_checked_with_the_timesteps_alone():
    with pytest.raises(OptionError, match=r"sweep\.guidance\.interval.*t=799"):
        _config(interval=(810, 990)).check(timesteps=1000)
    _config(sigma_interval=(0.4, 0.5)).check(timesteps=1000)  # σ needs the schedule: checked by the engine
    _config(interval=(790, 990), sigma_interval=(1.0, 4.0)).check(timesteps=1000, schedule="cosine")  # t=799
    SweepConfig(methods=["none"], sampling=SamplerOptions(steps=STEPS), progress=False,
                guidance=GuidanceOptions(interval=(810, 990))).check(timesteps=1000)  # 'none' is never guided


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_the_check_fails_exactly_when_no_step_gets_guidance(kind):
    schedule = NoiseSchedule(kind, 1000)
    ts = respaced_timesteps(1000, STEPS)
    sigmas = sorted(noise_level(schedule, t) for t in ts)
    bands = [(a * 0.9, b * 1.1) for a, b in zip(sigmas, sigmas[1:])] + [(a * 1.01, b * 0.99) for a, b in
                                                                        zip(sigmas, sigmas[1:])]
    for band in bands:
        for interval in (None, (0, 500), (500, 999), (650, 750)):
            for ramp in ("constant", "linear"):
                options = GuidanceOptions(interval=interval, sigma_interval=band, scale_schedule=ramp)
                guided = any(guidance_weight(t, schedule, options) > 0 for t in ts)
                try:
                    check_guided_steps(options, 1000, STEPS, schedule)
                except OptionError:
                    assert not guided, (band, interval, ramp)
                else:
                    assert guided, (band, interval, ramp)


def test_the_engine_checks_the_band_with_the_models_schedule_before_any_work():
    models = make_models()
    # No store and no evaluation: the check comes first, so nothing else is touched.
    with pytest.raises(OptionError, match=r"sweep\.guidance\.sigma_interval.*σ=0\.74"):
        run_sweep(_config(sigma_interval=(0.4, 0.5)), models, None, None)


def test_a_guide_equal_to_the_main_model_is_refused():
    models = make_models()
    twin = copy.deepcopy(models.diffusion.net)  # another object, the same weights
    with pytest.raises(OptionError) as err:
        SweepModels(models.diffusion, models.classifier, Network(twin, dict(HP), 2))
    assert err.value.option == "sweep.guide_ckpt" and "snapshot:1/16" in str(err.value)
    assert models.diffusion.sha in str(err.value)
    torch.manual_seed(7)
    SweepModels(models.diffusion, models.classifier, Network(UNet.from_hparams(HP), dict(HP), 2))  # weaker: fine


def _all_models() -> SweepModels:
    base = make_models()
    torch.manual_seed(7)
    guide, clean = UNet.from_hparams(HP), EncoderClassifier.from_hparams(HP)
    return SweepModels(base.diffusion, base.classifier, Network(guide, dict(HP), 2),
                       Network(clean, {**HP, "train_on": "clean"}, 3))


@pytest.mark.parametrize("target", ["meta", torch.float64])
def test_to_moves_every_network(target):
    models = _all_models().to(target)
    nets = {"diffusion": models.diffusion, "classifier": models.classifier, "guide": models.guide,
            "clean_classifier": models.clean_classifier}
    for name, network in nets.items():
        for p in network.net.parameters():
            got = p.device.type if target == "meta" else p.dtype
            assert got == target, name
