"""Every field of SamplerOptions reaches the sampler through ConditionalDiffusion.sample and changes what it
should (the options travel whole: a field a caller forgets cannot be silently dropped)."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch

from lightning_modules.diffusion import OptionError, SamplerOptions, sample_keys
from lightning_modules.diffusion import samplers as samplers_module
from lightning_modules.diffusion_module import ConditionalDiffusion

N, SCALE = 6, 3.0  # a CFG scale whose unclipped x̂0 leaves [-1, 1] by far with this random network
BASE = SamplerOptions(steps=5)


@pytest.fixture(scope="module")
def model() -> ConditionalDiffusion:
    torch.manual_seed(0)
    m = ConditionalDiffusion(num_classes=3, image_size=8, channels=1, base_channels=16, channel_mult=(1, 2),
                             num_res_blocks=1, attention_resolutions=(), dropout=0.0, timesteps=100)
    for p in m.ema_net.parameters():  # fresh UNets output zeros (zero-init heads): make them say something
        p.data.add_(0.05 * torch.randn_like(p))
    return m


def draw(model: ConditionalDiffusion, **changes) -> torch.Tensor:
    idx = torch.arange(N)
    return model.sample(idx % 3, sample_keys(0, idx), scales=SCALE, sampling=replace(BASE, **changes))


def test_the_test_covers_every_field():
    assert {f.name for f in fields(SamplerOptions)} == {"sampler", "steps", "eta", "clip_x0", "threshold", "compile"}


def test_steps_set_how_often_the_network_runs(model):
    calls = []
    hook = model.ema_net.register_forward_hook(lambda *_: calls.append(1))
    try:
        five, eight = draw(model), draw(model, steps=8)
    finally:
        hook.remove()
    assert len(calls) == 5 + 8  # CFG at s ≠ 0, 1: one batched forward (2B) per step
    assert not torch.allclose(five, eight, atol=1e-3)


def test_each_sampler_draws_its_own_samples(model):
    out = {s: draw(model, sampler=s) for s in ("ddim", "ddpm", "dpmpp_2m")}
    assert not torch.allclose(out["ddim"], out["ddpm"], atol=1e-3)
    assert not torch.allclose(out["ddim"], out["dpmpp_2m"], atol=1e-3)
    assert not torch.allclose(out["ddpm"], out["dpmpp_2m"], atol=1e-3)


def test_eta_adds_noise_to_ddim_only(model):
    plain, noisy = draw(model), draw(model, eta=0.5)
    assert not torch.allclose(plain, noisy, atol=1e-3)
    torch.testing.assert_close(draw(model, eta=0.5), noisy, atol=0, rtol=0)  # keyed noise: reproducible
    for sampler in ("ddpm", "dpmpp_2m"):  # η is DDIM's: the other samplers ignore it
        torch.testing.assert_close(draw(model, sampler=sampler, eta=0.5), draw(model, sampler=sampler),
                                   atol=0, rtol=0)


def test_clip_x0_keeps_the_data_range(model):
    clipped, free = draw(model), draw(model, clip_x0=False)
    assert clipped.abs().max() <= 1.0
    assert free.abs().max() > 10.0  # the random network's guided x̂0 runs far outside [-1, 1]


def test_threshold_bounds_the_samples_and_is_not_the_static_clip(model):
    free = draw(model, clip_x0=False)
    thresholded = draw(model, clip_x0=False, threshold=0.995)
    assert thresholded.abs().max() <= 1.0 and free.abs().max() > 10.0
    assert not torch.allclose(thresholded, free.clamp(-1, 1), atol=1e-3)
    assert not torch.allclose(thresholded, draw(model), atol=1e-3)  # dynamic, not the static clip


def test_compile_gives_the_eager_samples(model, monkeypatch):
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real = samplers_module.compiled_step.__wrapped__
    # The step compiled as the sweep would, through a backend that only traces (no C++ compiler needed).
    monkeypatch.setattr(samplers_module, "compiled_step", lambda sampler, mode, backend: real(sampler, mode, counting))
    torch._dynamo.reset()
    try:
        compiled = draw(model, compile="default")
    finally:
        torch._dynamo.reset()
    assert graphs  # the step really went through torch.compile
    torch.testing.assert_close(compiled, draw(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,option", [(dict(steps=101), "steps"), (dict(threshold=0.2), "threshold"),
                                        (dict(sampler="euler"), "sampler"), (dict(eta=-1.0), "eta")])
def test_a_bad_field_is_refused_before_sampling(model, bad, option):
    calls = []
    hook = model.ema_net.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(OptionError) as err:
            draw(model, **bad)
    finally:
        hook.remove()
    assert err.value.option == option and not calls
