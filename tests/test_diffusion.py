"""Closed forms of the diffusion core: schedules, q_sample, targets, noise, samplers."""

import math

import pytest
import torch

from lightning_modules.diffusion import (
    GuidedDenoiser,
    NoiseSchedule,
    SamplerOptions,
    keyed_normal,
    make_betas,
    respaced_timesteps,
    sample,
    sample_keys,
)
from lightning_modules.diffusion.losses import drop_labels


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_decreases_from_one_to_near_zero(kind):
    s = NoiseSchedule(kind, 1000)
    ab = s.alphas_cumprod
    assert torch.all(ab[1:] < ab[:-1])
    assert 0.98 < float(ab[0]) < 1.0 and float(ab[-1]) < 1e-3
    assert torch.all((make_betas(kind, 1000) > 0) & (make_betas(kind, 1000) < 1))


def test_unknown_schedule_names_choices():
    with pytest.raises(ValueError, match="linear"):
        make_betas("quadratic", 10)


def test_q_sample_mean_and_variance_match_closed_form():
    s = NoiseSchedule("linear", 1000)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    t = torch.full((200_000,), 300)
    xt = s.q_sample(x0, t, torch.randn_like(x0))
    ab = float(s.alphas_cumprod[300])
    assert abs(xt.mean().item() - math.sqrt(ab) * 0.7) < 5e-3
    assert abs(xt.var().item() - (1 - ab)) < 5e-3


def test_v_target_round_trips_to_eps():
    s = NoiseSchedule("cosine", 1000)
    x0, eps = torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4)
    t = torch.randint(0, 1000, (8,))
    xt = s.q_sample(x0, t, eps)
    v = s.training_target("v", x0, eps, t)
    torch.testing.assert_close(s.eps_from_output("v", v, xt, t), eps, atol=1e-5, rtol=1e-5)


def test_respacing_keeps_original_indices():
    ts = respaced_timesteps(1000, 10)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 10 and ts == sorted(ts, reverse=True)
    assert respaced_timesteps(1000, 1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        respaced_timesteps(100, 101)


def test_keyed_noise_depends_only_on_key_and_stream():
    keys = sample_keys(3, torch.arange(100))
    full = keyed_normal(keys, 5, (2, 3))
    part = keyed_normal(keys[40:47], 5, (2, 3))
    torch.testing.assert_close(full[40:47], part)  # independent of batch composition
    assert not torch.allclose(keyed_normal(keys, 6, (2, 3)), full)
    assert not torch.allclose(keyed_normal(sample_keys(4, torch.arange(100)), 5, (2, 3)), full)
    big = keyed_normal(sample_keys(0, torch.arange(2000)), 0, (64,))
    assert abs(big.mean().item()) < 0.01 and abs(big.std().item() - 1) < 0.01
    corr = torch.corrcoef(big[:, :8].T)  # neighbouring elements uncorrelated
    assert (corr - torch.eye(8)).abs().max() < 0.1  # ~4.5 standard errors at n=2000


def test_label_dropout_rate_is_binomial_and_exact_null():
    y = torch.randint(0, 10, (20_000,))
    dropped = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(0))
    rate = (dropped == 10).float().mean().item()
    half_width = 2.576 * math.sqrt(0.1 * 0.9 / len(y))  # binomial 99% interval
    assert abs(rate - 0.1) < half_width
    kept = dropped != 10
    assert torch.equal(dropped[kept], y[kept])
    assert set(dropped.unique().tolist()) <= set(range(11))


class GaussianOracle(torch.nn.Module):
    """The exact ε-predictor E[ε | x_t] for data x_0 ~ N(mu, sigma² I)."""

    def __init__(self, schedule, mu, sigma):
        super().__init__()
        self.ab, self.mu, self.sigma = schedule.alphas_cumprod.float(), mu, sigma

    def forward(self, x, t, y):
        ab = self.ab[t].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.sigma**2 + 1 - ab)


@pytest.mark.parametrize("sampler,eta,steps", [("ddim", 0.0, 50), ("ddim", 1.0, 1000), ("ddpm", 0.0, 1000)])
def test_samplers_recover_a_known_gaussian(sampler, eta, steps):
    # Stochastic samplers use the fixed-small posterior variance, which is exact only with many steps.
    s = NoiseSchedule("linear", 1000)
    mu, sigma = 0.3, 0.5
    den = GuidedDenoiser(GaussianOracle(s, mu, sigma), s, torch.zeros(4000, dtype=torch.long), 10)
    x = sample(den, (1, 2, 2), sample_keys(0, torch.arange(4000)),
               SamplerOptions(sampler, steps, eta, clip_x0=False))
    assert abs(x.mean().item() - mu) < 0.02
    assert abs(x.std().item() - sigma) < 0.03


def test_ddim_eta0_is_deterministic_and_paired_by_key():
    s = NoiseSchedule("cosine", 1000)
    oracle = GaussianOracle(s, 0.0, 0.5)
    labels = torch.zeros(16, dtype=torch.long)
    keys = sample_keys(1, torch.arange(16))
    a = sample(GuidedDenoiser(oracle, s, labels, 10), (1, 3, 3), keys, SamplerOptions(steps=20))
    b = sample(GuidedDenoiser(oracle, s, labels, 10), (1, 3, 3), keys, SamplerOptions(steps=20))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = sample(GuidedDenoiser(oracle, s, labels[:5], 10), (1, 3, 3), keys[3:8], SamplerOptions(steps=20))
    torch.testing.assert_close(c, a[3:8])
