"""The maths of CFG-Zero* and FBG against their references: diffusers' guider, and the FBG recursion re-implemented
here in float64 on EDM's σ axis as the paper's code runs it (FelixKoulischer/FBG_using_edm2, generate_images_FBG.py)."""

import math

import pytest
import torch
from diffusers.guiders import ClassifierFreeZeroStarGuidance
from torch.testing import assert_close

from lightning_modules.diffusion.methods import feedback as fb
from lightning_modules.diffusion.methods import zero_star as zs
from lightning_modules.diffusion.schedule import NoiseSchedule, respaced_timesteps

SCHEDULE = NoiseSchedule("cosine", 1000)
F32, F64, COL = torch.float32, torch.float64, (-1, 1, 1, 1)


def _rand(*seeds, shape=(2, 3, 4, 4), dtype=F64):
    return [torch.randn(*shape, generator=torch.Generator().manual_seed(s), dtype=dtype) for s in seeds]


def _coefs(t, dtype=F64):
    ab = SCHEDULE.alpha_bar(t)
    return torch.tensor(math.sqrt(ab), dtype=dtype), torch.tensor(math.sqrt(1 - ab), dtype=dtype)


def _diffusers(p_c, p_u, scale, step, original=False):
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=scale, zero_init_steps=1, use_original_formulation=original)
    guider.set_state(step=step, num_inference_steps=10, timestep=torch.tensor(500))
    return guider.forward(pred_cond=p_c, pred_uncond=p_u).pred


def test_rectified_flow_state_has_velocity_eps_minus_x0():
    x0, eps = _rand(1, 2)
    path = {}
    for t in (900, 300):
        a, s = _coefs(t)
        x = a * x0 + s * eps
        path[t] = tau, z = s / (a + s), x / (a + s)
        assert_close(z, (1 - tau) * x0 + tau * eps)  # the rectified-flow interpolant
        assert_close(zs.eps_to_velocity(x, eps, a, s), eps - x0)  # u = ε − x̂0 for the true ε
        assert_close(zs.velocity_to_eps(x, eps - x0, a, s), eps)
        zero = zs.velocity_to_eps(x, torch.zeros_like(x), a, s)  # u = 0: ε̂ = x̂0 = z
        assert_close(torch.stack([zero, (x - s * zero) / a]), torch.stack([z, z]))
    assert_close((path[900][1] - path[300][1]) / (path[900][0] - path[300][0]), eps - x0)  # dz/dτ along the path


@pytest.mark.parametrize("w", [0.0, 1.0, 1.5, 4.0])
def test_combine_matches_diffusers(w):
    p_c, p_u = _rand(3, 4, shape=(3, 4, 8, 8), dtype=F32)
    ours = zs.zero_star_combine(p_c, p_u + 0.3, w)
    # diffusers' default formulation uses w itself; use_original_formulation=True guides around p_c with w − 1.
    assert_close(_diffusers(p_c, p_u + 0.3, w, step=1), ours, atol=1e-6, rtol=1e-6)
    assert_close(_diffusers(p_c, p_u + 0.3, w - 1, step=1, original=True), ours, atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(_diffusers(p_c, p_u, w, step=0)) == 0  # zero-init step


def test_zero_star_eps_is_diffusers_in_velocity_space():
    (x, e_c, e_u), (a, s) = _rand(5, 6, 7, shape=(4, 3, 8, 8), dtype=F32), _coefs(500, F32)
    u_c, u_u = zs.eps_to_velocity(x, e_c, a, s), zs.eps_to_velocity(x, e_u, a, s)
    zero = torch.tensor([False, True, False, True]).view(COL)
    ours = zs.zero_star_eps(x, e_c, e_u, a, s, 3.0, zero)
    expect = torch.where(zero, zs.velocity_to_eps(x, _diffusers(u_c, u_u, 3.0, step=0), a, s),
                         zs.velocity_to_eps(x, _diffusers(u_c, u_u, 3.0, step=1), a, s))
    assert_close(ours, expect, atol=1e-6, rtol=1e-6)
    assert_close(zs.eps_to_velocity(x, ours, a, s)[1::2], torch.zeros(2, 3, 8, 8), atol=1e-5, rtol=0)
    w = torch.tensor([1.0, 2.0, 3.0, 5.0])  # per-sample w: each row as if the whole batch had its scale
    rows = torch.stack([zs.zero_star_eps(x, e_c, e_u, a, s, float(v), zero)[i] for i, v in enumerate(w)])
    for fn in (zs.zero_star_eps, torch.compile(zs.zero_star_eps, fullgraph=True, backend="eager")):  # no graph breaks
        assert_close(fn(x, e_c, e_u, a, s, w, zero), rows)


def test_unit_scale_is_cfg_in_eps():
    (x, e_c, e_u), (a, s) = _rand(8, 9, 10, shape=(3, 2, 6, 6)), _coefs(700)
    w = torch.tensor([0.5, 2.0, 7.0], dtype=F64).view(COL)
    # velocity-space CFG is ε-space CFG: ε ↔ u is affine and the weights (1 − w, w) sum to 1
    u_c, u_u = zs.eps_to_velocity(x, e_c, a, s), zs.eps_to_velocity(x, e_u, a, s)
    assert_close(zs.velocity_to_eps(x, u_u + w * (u_c - u_u), a, s), e_u + w * (e_c - e_u))
    # make s* = 1 exactly: u_c = u_u + d with d ⟂ u_u per sample; then CFG-Zero* is CFG
    d = u_c - (u_c * u_u).sum((1, 2, 3), keepdim=True) / (u_u * u_u).sum((1, 2, 3), keepdim=True) * u_u
    e_c = zs.velocity_to_eps(x, u_u + d, a, s)
    assert_close(zs.optimal_scale(u_u + d, u_u).flatten(), torch.ones(3, dtype=F64))
    assert_close(zs.zero_star_eps(x, e_c, e_u, a, s, w.flatten(), torch.tensor(False)), e_u + w * (e_c - e_u))


def test_eps_or_v_network_gives_the_same_guidance():
    x, e_c, e_u = _rand(11, 12, 13, shape=(2, 3, 8, 8), dtype=F32)
    t, zero = torch.full((2,), 400), torch.zeros(2, 1, 1, 1, dtype=torch.bool)
    a, s = SCHEDULE.coef("sqrt_ab", t, x), SCHEDULE.coef("sqrt_1m_ab", t, x)
    v_c, v_u = (a * e - s * (x - s * e) / a for e in (e_c, e_u))  # the same predictions as a v-network gives them
    want = zs.zero_star_eps(x, e_c, e_u, a, s, 4.0, zero)
    from_v = [SCHEDULE.eps_from_output("v", v, x, t) for v in (v_c, v_u)]
    assert_close(zs.zero_star_eps(x, *from_v, a, s, 4.0, zero), want, atol=1e-5, rtol=1e-5)
    # whereas projecting in whatever space the network outputs would not be the same method
    naive = SCHEDULE.eps_from_output("v", zs.zero_star_combine(v_c, v_u, 4.0), x, t)
    assert not torch.allclose(naive, want, atol=1e-3)


def test_posterior_is_ddpm_and_edm():
    x, x0 = _rand(14, 15)
    ab_t, ab_s = SCHEDULE.alpha_bar(600), SCHEDULE.alpha_bar(550)
    beta = 1 - ab_t / ab_s  # Ho et al. 2020, Eq. 7, on the respaced pair (t, s)
    mean, var = fb.posterior_mean(x, x0, ab_t, ab_s)
    assert_close(mean, math.sqrt(ab_s) * beta / (1 - ab_t) * x0 + math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t) * x)
    sc, sn = math.sqrt((1 - ab_t) / ab_t), math.sqrt((1 - ab_s) / ab_s)  # EDM: x/√ᾱ at σ = √((1−ᾱ)/ᾱ)
    assert_close(mean / math.sqrt(ab_s), sn**2 / sc**2 * x / math.sqrt(ab_t) + (1 - sn**2 / sc**2) * x0)
    assert math.isclose(float(var), beta * (1 - ab_s) / (1 - ab_t), rel_tol=1e-12)
    assert math.isclose(float(var) / ab_s, (sc**2 - sn**2) * sn**2 / sc**2, rel_tol=1e-12)
    assert float(fb.posterior_mean(x, x0, ab_t, 1.0)[1]) == 0.0


def _reference_constants(sigmas, pi, t0, t1):
    """delta_from_t0 / Temp_from_t1 of the reference, on an EDM σ grid (σ_0 > ... > σ_{N−1}, then 0)."""
    n, sq = len(sigmas), [v * v for v in sigmas] + [0.0]
    arr = [(sq[i] - sq[i + 1]) * sq[i + 1] / sq[i] for i in range(n)][::-1]  # arr[k]: step N−1−k; arr[0] = 0
    delta = math.log((1 - pi) * 3 / 2) / ((1 - t0) * n)
    k = math.floor(t1 * n)
    return delta, abs(2 * ((1 - (t1 * n - k)) * arr[k] + (t1 * n - k) * arr[k + 1]) / 10 * delta)


def test_constants_reproduce_the_reference_on_edm2_grid():
    sig = [(80 ** (1 / 7) + i / 63 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(64)]  # EDM2: 64 steps
    abs_ = [1 / (1 + v * v) for v in sig] + [1.0]
    c = fb.fbg_constants(fb.FeedbackSettings(), list(zip(abs_[:-1], abs_[1:])))
    delta, tau = _reference_constants(sig, 0.999, 0.556, 0.429)
    assert math.isclose(c.delta, delta, rel_tol=1e-12) and math.isclose(c.tau, tau, rel_tol=1e-9)
    assert (round(c.delta, 4), round(c.tau, 4)) == (-0.2288, 0.0173)  # what the reference prints and uses
    assert math.isclose(float(fb.fbg_lambda(torch.tensor(c.l_min, dtype=F64), 0.999)), 10.0)


def test_recursion_agrees_with_float64_reference_loop():
    settings, steps, shape = fb.FeedbackSettings(t0=0.7, t1=0.5), 12, (4, 3, 4, 4)
    abs_ = [SCHEDULE.alpha_bar(t) for t in respaced_timesteps(1000, steps)] + [1.0]
    sig = [math.sqrt((1 - ab) / ab) for ab in abs_]
    delta, tau = _reference_constants(sig[:-1], settings.pi, settings.t0, settings.t1)
    c = fb.fbg_schedule_constants(settings, SCHEDULE, steps)
    assert math.isclose(c.delta, delta, rel_tol=1e-12) and math.isclose(c.tau, tau, rel_tol=1e-9)
    m_c = _rand(16, shape=shape)[0].mean((2, 3), keepdim=True) * torch.tensor([0, 1, 2, 4.0], dtype=F64).view(COL)
    spread_c = torch.tensor([1.0, 0.5, 0.5, 0.5], dtype=F64).view(COL)  # sample 0: D_c = D_u
    noise = _rand(*range(100, 101 + steps), shape=shape)
    x_ref, l_ref = noise[0] * sig[0], torch.zeros(4, dtype=F64)  # the reference, in EDM's VE form
    x, log_p = math.sqrt(abs_[0]) * x_ref, torch.zeros(4, dtype=F64)  # ours, in VP
    def toy_d(x_ve, sigma, m, sd):  # the exact E[x0 | x0 + σn] for x0 ~ N(m, sd²·I)
        return m + sd**2 / (sd**2 + sigma**2) * (x_ve - m)

    inside = False
    for i in range(steps):
        sc, sn, ab_t, ab_s = sig[i], sig[i + 1], abs_[i], abs_[i + 1]
        lam, r = torch.exp(l_ref) / (torch.exp(l_ref) - (1 - settings.pi)), sn**2 / sc**2
        d_u, d_c = toy_d(x_ref, sc, 0.0, 1.0), toy_d(x_ref, sc, m_c, spread_c)
        mu_c, mu_u = (r * x_ref + (1 - r) * d for d in (d_c, d_u))
        x_ref = r * x_ref + (1 - r) * (d_u + lam.view(COL) * (d_c - d_u)) + math.sqrt(1 - r) * sn * noise[i + 1]
        if sn > 0:  # L after the step into the data is never used (σ̃² = 0 there)
            err = ((x_ref - mu_c) ** 2).sum((1, 2, 3)) - ((x_ref - mu_u) ** 2).sum((1, 2, 3))
            l_ref = torch.clamp(l_ref - tau / (2 * (1 - r) * sn**2) * err + delta, min=settings.l_min, max=3.0)
        # ours: ε of the VP branches, guided ε at λ(L), the DDPM posterior step, the L update
        a, s = math.sqrt(ab_t), math.sqrt(1 - ab_t)
        e_u, e_c = ((x - a * d) / s for d in (d_u, d_c))
        lam_ours = fb.fbg_lambda(log_p, settings.pi)
        assert_close(lam_ours, lam, rtol=1e-10, atol=0)
        mean, var = fb.posterior_mean(x, (x - s * fb.fbg_combine(e_c, e_u, lam_ours)) / a, ab_t, ab_s)
        mus = [fb.posterior_mean(x, (x - s * e) / a, ab_t, ab_s)[0] for e in (e_c, e_u)]
        x = mean + var.sqrt() * noise[i + 1]
        log_p = fb.fbg_log_posterior_update(log_p, x, *mus, var, c.delta, c.tau, c.l_min, c.l_max)
        assert_close(x / math.sqrt(ab_s), x_ref, rtol=1e-10, atol=1e-10)
        assert_close(log_p, l_ref, rtol=1e-9, atol=1e-9)
        inside |= bool(((log_p > c.l_min + 1e-6) & (log_p < c.l_max - 1e-6) & (log_p != delta * (i + 1))).any())
    assert inside  # the feedback term acted unclipped at some step


def test_frozen_posterior_is_cfg_at_its_lambda_and_lambda_is_bounded():
    l0, pi = torch.tensor([-6.0, -3.0, 0.0, 2.5], dtype=F64), 0.999
    lam, (x, e_c, e_u), (a, s) = fb.fbg_lambda(l0, pi), _rand(20, 21, 22, shape=(4, 3, 4, 4)), _coefs(400)
    assert_close(lam, torch.exp(l0) / (torch.exp(l0) - (1 - pi)))
    guided, d_c, d_u = fb.fbg_combine(e_c, e_u, lam), (x - s * e_c) / a, (x - s * e_u) / a
    assert_close(guided, e_u + lam.view(COL) * (e_c - e_u))
    assert_close((x - s * guided) / a, d_u + lam.view(COL) * (d_c - d_u))  # = D_u + λ(D_c − D_u)
    # λ within [1, λ_max] on the clip bounds
    c = fb.fbg_constants(fb.FeedbackSettings(), [(0.01, 0.2), (0.2, 0.7), (0.7, 1.0)])
    for x_next, mu_c, mu_u in ((10.0, 0.0, 10.0), (0.0, 0.0, 10.0)):  # far toward μ_u, then toward μ_c
        x_next, mu_c, mu_u = (torch.full((2, 3, 4, 4), v) for v in (x_next, mu_c, mu_u))
        lp = fb.fbg_log_posterior_update(torch.zeros(2), x_next, mu_c, mu_u, 0.01, c.delta, c.tau, c.l_min, c.l_max)
        assert lp.min() >= c.l_min - 1e-6 and lp.max() <= c.l_max + 1e-6
        lam = fb.fbg_lambda(lp, 0.999)
        assert (lam >= 1).all() and (lam <= 10.0 * (1 + 1e-5)).all()  # up to float32 rounding of L_min
    assert float(fb.fbg_lambda(torch.tensor(c.l_max, dtype=F64), 0.999)) >= 1.0


def test_coinciding_means_move_by_delta_until_clipped():
    c = fb.fbg_schedule_constants(fb.FeedbackSettings(), SCHEDULE, 20)
    assert c.delta < 0  # no feedback: L falls by |δ| a step, so λ rises towards λ_max
    (x, mu), log_p = _rand(30, 31, shape=(3, 3, 4, 4), dtype=F32), torch.zeros(3)
    update = torch.compile(fb.fbg_log_posterior_update, fullgraph=True, backend="eager")  # tensor-only: no graph breaks
    for n in range(1, 40):
        log_p = update(log_p, x, mu, mu, torch.tensor(0.05), c.delta, c.tau, c.l_min, c.l_max)
        assert_close(log_p, torch.full((3,), max(n * c.delta, c.l_min)))
    same = fb.fbg_log_posterior_update(log_p, x, mu, 2 * mu, torch.zeros(3), c.delta, c.tau, c.l_min, c.l_max)
    assert_close(same, log_p)  # σ̃² = 0 (no transition yet, or the step into the data): no update
