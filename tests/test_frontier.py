"""The newer guidance rules and the fast sampler: identities the maths guarantees and oracle checks."""

import math

import pytest
import torch

from lightning_modules.diffusion import (
    RULES,
    GuidanceOptions,
    GuidedDenoiser,
    NoiseSchedule,
    SamplerOptions,
    cell_cost,
    make_rule,
    respaced_timesteps,
    sample,
    sample_keys,
)
from lightning_modules.diffusion.samplers import _dpmpp_row, _lambda

from .test_diffusion import GaussianOracle
from .test_guidance import NUM_CLASSES, SHAPE, TinyNet


class AsV(torch.nn.Module):
    """The same predictor as an ε-network, reparameterised to predict v = (ε − σ_t·x_t)/a_t."""

    def __init__(self, eps_net, schedule):
        super().__init__()
        self.eps_net, self.ab = eps_net, schedule.alphas_cumprod.float()

    def forward(self, x, t, y):
        ab = self.ab[t].view(-1, 1, 1, 1)
        return (self.eps_net(x, t, y) - (1 - ab).sqrt() * x) / ab.sqrt()


def draw(rule, scales, sampler="ddim", steps=8, net=None, prediction="eps", log_prob_x0=None, **kw):
    schedule = NoiseSchedule("cosine", 1000)
    labels = torch.arange(6) % NUM_CLASSES
    den = GuidedDenoiser(net or TinyNet(), schedule, labels, NUM_CLASSES, rule, scales, prediction=prediction,
                         log_prob_x0=log_prob_x0)
    return sample(den, SHAPE, sample_keys(3, torch.arange(6)), SamplerOptions(sampler, steps, **kw))


SCALES = [0.5, 1.0, 2.0, 3.0, 4.0, 6.0]


def test_apg_with_eta_one_no_momentum_no_threshold_is_cfg():
    apg = make_rule("apg", GuidanceOptions(apg={"eta": 1.0, "momentum": 0.0, "threshold": None}))
    torch.testing.assert_close(draw(apg, SCALES), draw("cfg", SCALES), atol=1e-5, rtol=1e-5)


def test_apg_defaults_differ_from_cfg_and_do_not_depend_on_the_parameterisation():
    apg = make_rule("apg", GuidanceOptions(apg={"threshold": 2.0}))  # paper: η = 0, β < 0
    eps_samples = draw(apg, SCALES)
    assert not torch.allclose(eps_samples, draw("cfg", SCALES), atol=1e-3)
    schedule = NoiseSchedule("cosine", 1000)
    v_samples = draw(apg, SCALES, net=AsV(TinyNet(), schedule), prediction="v")
    torch.testing.assert_close(v_samples, eps_samples, atol=2e-4, rtol=1e-4)


def test_cfgpp_at_zero_is_unconditional_ddim_and_renoises_with_the_unconditional_eps():
    torch.testing.assert_close(draw("cfgpp", 0.0, clip_x0=False), draw("cfg", 0.0, clip_x0=False), atol=1e-6,
                               rtol=1e-6)
    assert not torch.allclose(draw("cfgpp", 0.6), draw("cfg", 0.6), atol=1e-4)  # renoising with ε_u differs
    # One DDIM step by hand: x_s = √ᾱ_s·x̂0(ε_λ) + √(1−ᾱ_s)·ε_u.
    schedule, net = NoiseSchedule("cosine", 1000), TinyNet()
    labels, x = torch.arange(6) % NUM_CLASSES, torch.randn(6, *SHAPE)
    out = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, "cfgpp", 1.0).at(x, 500)
    t = torch.full((6,), 500)
    eps_c, eps_u = net(x, t, labels), net(x, t, torch.full_like(labels, NUM_CLASSES))
    torch.testing.assert_close(out.eps, eps_c)  # λ = 1: x̂0 from ε_c ...
    torch.testing.assert_close(out.eps_renoise, eps_u)  # ... but renoised with ε_u (the issue's "λ = 1 is DDIM-CFG
    # at s = 1" does not follow from the update)


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_cfgpp_at_zero_is_the_unconditional_model_on_every_sampler(sampler):
    torch.testing.assert_close(draw("cfgpp", 0.0, sampler, clip_x0=False), draw("cfg", 0.0, sampler, clip_x0=False),
                               atol=1e-6, rtol=1e-6)


def test_cfgpp_on_first_order_dpmpp_is_cfgpp_on_ddim():
    """Below 15 steps the last three DPM-Solver++ steps are first order, so a 4-step chain is first order
    throughout: from the CFG++ point √ᾱ_t·x̂0 + σ_t·ε_u it is DDIM's √ᾱ_s·x̂0 + σ_s·ε_u, clipping included."""
    lams = [0.2, 0.5, 0.8, 1.0, 0.0, 0.6]
    torch.testing.assert_close(draw("cfgpp", lams, "dpmpp_2m", steps=4), draw("cfgpp", lams, "ddim", steps=4),
                               atol=1e-5, rtol=1e-5)


def test_cfgpp_dpmpp_chain_equals_a_hand_written_loop():
    """CFG++ on DPM-Solver++(2M): each update starts from x' = a_t·D_λ + σ_t·ε_u and extrapolates D_λ."""
    schedule, net, steps, lam = NoiseSchedule("cosine", 1000), TinyNet(), 16, 0.7
    labels, null = torch.arange(6) % NUM_CLASSES, torch.full((6,), NUM_CLASSES)
    keys = sample_keys(3, torch.arange(6))
    ours = sample(GuidedDenoiser(net, schedule, labels, NUM_CLASSES, "cfgpp", lam), SHAPE, keys,
                  SamplerOptions("dpmpp_2m", steps, clip_x0=False))
    from lightning_modules.diffusion import keyed_normal

    x = keyed_normal(keys, 0, SHAPE).double()
    ts, ab = respaced_timesteps(1000, steps), schedule.alphas_cumprod
    d_prev = lam_prev = None
    with torch.no_grad():
        for i, t in enumerate(ts):
            tt = torch.full((6,), t)
            eps_c, eps_u = (net(x.float(), tt, y).double() for y in (labels, null))
            a_t, s_t = ab[t].sqrt(), (1 - ab[t]).sqrt()
            d = (x - s_t * (eps_u + lam * (eps_c - eps_u))) / a_t
            if i == steps - 1:
                x = d
                break
            a_s, s_s = ab[ts[i + 1]].sqrt(), (1 - ab[ts[i + 1]]).sqrt()
            lam_t, lam_s = torch.log(a_t / s_t), torch.log(a_s / s_s)
            h = lam_s - lam_t
            first = d_prev is None or i >= steps - 2
            d_eff = d if first else (1 + h / (2 * (lam_t - lam_prev))) * d - h / (2 * (lam_t - lam_prev)) * d_prev
            x = (s_s / s_t) * (a_t * d + s_t * eps_u) - a_s * torch.expm1(-h) * d_eff
            d_prev, lam_prev = d, lam_t
    torch.testing.assert_close(ours.double(), x, atol=2e-4, rtol=1e-4)


def test_thresholding_leaves_in_range_samples_alone_and_bounds_the_rest():
    s = NoiseSchedule("linear", 1000)
    labels, keys = torch.zeros(200, dtype=torch.long), sample_keys(0, torch.arange(200))
    inside = GuidedDenoiser(GaussianOracle(s, 0.0, 0.15), s, labels, 10)
    stats = {}
    plain = sample(inside, (1, 2, 2), keys, SamplerOptions(steps=20, clip_x0=False))
    thresholded = sample(inside, (1, 2, 2), keys, SamplerOptions(steps=20, clip_x0=False, threshold=0.995),
                         stats=stats)
    torch.testing.assert_close(thresholded, plain, atol=1e-5, rtol=1e-5)
    assert stats["thresholded_steps"].sum() == 0
    outside = GuidedDenoiser(GaussianOracle(s, 2.5, 0.3), s, labels, 10)
    out = sample(outside, (1, 2, 2), keys, SamplerOptions(steps=20, clip_x0=False, threshold=0.995), stats=stats)
    assert out.abs().max() <= 1.0 and stats["thresholded_steps"].float().mean() > 1


def test_sigma_interval_guides_only_inside_the_noise_band():
    schedule = NoiseSchedule("cosine", 1000)
    options = GuidanceOptions(sigma_interval=(0.34, 1.02))
    rule = make_rule("cfg", options)
    den = GuidedDenoiser(TinyNet(), schedule, torch.zeros(2, dtype=torch.long), NUM_CLASSES, rule, 3.0)
    inside = []
    for t in respaced_timesteps(1000, 20):
        ab = schedule.alpha_bar(t)
        sigma = math.sqrt((1 - ab) / ab)
        assert (den.weight(t) == 1.0) == (0.34 < sigma <= 1.02)
        inside.append(den.weight(t) == 1.0)
    assert 0 < sum(inside) < 20
    assert cell_cost(rule, 3.0, schedule, 20) == (20 + sum(inside), 0, 0)


def test_dpmpp_first_order_step_is_ddim():
    """x_s = (σ_s/σ_t)·x_t + a_s(1 − e^{−h})·D equals DDIM's a_s·D + σ_s·ε with ε = (x_t − a_t·D)/σ_t."""
    ab_t, ab_s = 0.3, 0.6
    ratio, c_d, c_cur, c_prev = _dpmpp_row(ab_t, ab_s, None, 0, 20, SamplerOptions(sampler="dpmpp_2m"))
    x, d = torch.randn(5), torch.randn(5)
    a_t, s_t, a_s, s_s = (math.sqrt(v) for v in (ab_t, 1 - ab_t, ab_s, 1 - ab_s))
    ddim = a_s * d + s_s * (x - a_t * d) / s_t
    torch.testing.assert_close(ratio * x + c_d * (c_cur * d + c_prev * torch.zeros(5)), ddim)


def test_dpmpp_recovers_a_known_gaussian_in_few_steps():
    s = NoiseSchedule("linear", 1000)
    mu, sigma = 0.3, 0.5
    den = GuidedDenoiser(GaussianOracle(s, mu, sigma), s, torch.zeros(4000, dtype=torch.long), 10)
    x = sample(den, (1, 2, 2), sample_keys(0, torch.arange(4000)), SamplerOptions("dpmpp_2m", 20, clip_x0=False))
    assert abs(x.mean().item() - mu) < 0.02 and abs(x.std().item() - sigma) < 0.03
    # The point of a second-order solver: at equal steps it is closer than DDIM (std 0.484 vs 0.437 here).
    ddim = sample(den, (1, 2, 2), sample_keys(0, torch.arange(4000)), SamplerOptions("ddim", 20, clip_x0=False))
    assert abs(x.std().item() - sigma) < abs(ddim.std().item() - sigma) / 2


def test_dpmpp_chain_equals_an_independent_float64_implementation():
    """The paper's Algorithm 2 (DPM-Solver++(2M)) in float64 on the same timesteps, lower order at the end."""
    s = NoiseSchedule("cosine", 1000)
    oracle = GaussianOracle(s, 0.2, 0.4)
    keys = sample_keys(5, torch.arange(64))
    steps = 12
    ours = sample(GuidedDenoiser(oracle, s, torch.zeros(64, dtype=torch.long), 10), (1, 2, 2), keys,
                  SamplerOptions("dpmpp_2m", steps, clip_x0=False))
    from lightning_modules.diffusion import keyed_normal

    x = keyed_normal(keys, 0, (1, 2, 2)).double()
    ts = respaced_timesteps(1000, steps)
    ab = s.alphas_cumprod  # float64
    d_prev, lam_prev = None, None
    for i, t in enumerate(ts):
        a_t, s_t = ab[t].sqrt(), (1 - ab[t]).sqrt()
        eps = _oracle64(s, 0.2, 0.4, x, t)
        d = (x - s_t * eps) / a_t
        if i == steps - 1:
            x = d  # to the data end
            break
        t_next = ts[i + 1]
        a_s, s_s = ab[t_next].sqrt(), (1 - ab[t_next]).sqrt()
        lam_t, lam_s = torch.log(a_t / s_t), torch.log(a_s / s_s)
        h = lam_s - lam_t
        if d_prev is None or i >= steps - (3 if steps < 15 else 2):
            d_eff = d
        else:
            r = (lam_t - lam_prev) / h
            d_eff = (1 + 1 / (2 * r)) * d - d_prev / (2 * r)
        x = (s_s / s_t) * x - a_s * torch.expm1(-h) * d_eff
        d_prev, lam_prev = d, lam_t
    torch.testing.assert_close(ours.double(), x, atol=2e-4, rtol=1e-4)
    assert _lambda(1.0) == math.inf


def _oracle64(schedule, mu, sigma, x, t):
    ab = schedule.alphas_cumprod[t]
    return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * sigma**2 + 1 - ab)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
@pytest.mark.parametrize("method", list(RULES))
def test_every_method_runs_on_every_sampler(method, sampler):
    """On a real (tiny, random) UNet, so the perturbation methods find their attention and time embedding."""
    from lightning_modules.diffusion import clean_log_prob

    from .test_sweep_engine import make_models

    # gft samples a network with GFT's β input (a model trained with guidance_training gft)
    models = make_models(**({"guidance_training": "gft"} if method == "gft" else {}))
    guide = make_models(seed=1).diffusion
    rule = make_rule(method)
    labels = torch.arange(4) % models.num_classes
    scales = [0.0, 0.3, 0.7, 1.0] if method == "cfgpp" else [1.0, 1.5, 2.0, 3.0] if method == "gft" \
        else [0.0, 1.0, 2.0, 3.0]
    den = GuidedDenoiser(models.diffusion.net, models.schedule, labels, models.num_classes, rule, scales,
                         grad_fn=models.grad_fn, guide=guide.net, log_prob_x0=clean_log_prob(models.classifier.net))
    stats = {}
    out = sample(den, models.shape, sample_keys(0, torch.arange(4)), SamplerOptions(sampler, 6, threshold=0.995),
                 stats=stats)
    assert out.shape == (4, *models.shape) and torch.isfinite(out).all() and out.abs().max() <= 1
    assert stats["thresholded_steps"].shape == (4,)


def test_autoguidance_with_the_main_model_as_its_own_guide_is_the_conditional_model():
    net = TinyNet()
    schedule = NoiseSchedule("cosine", 1000)
    labels, keys = torch.arange(6) % NUM_CLASSES, sample_keys(3, torch.arange(6))
    own = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, "autoguidance", [1.0, 2.0, 3.0] * 2, guide=net)
    plain = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, "cfg", 1.0)
    eight = SamplerOptions(steps=8)
    torch.testing.assert_close(sample(own, SHAPE, keys, eight), sample(plain, SHAPE, keys, eight), atol=1e-6,
                               rtol=1e-6)
    weaker = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, "autoguidance", 2.0, guide=_perturbed(TinyNet()))
    x = torch.randn(6, *SHAPE)
    out = weaker.at(x, 500).eps
    t = torch.full((6,), 500)
    eps_c, eps_g = net(x, t, labels), weaker.guide(x, t, labels)
    torch.testing.assert_close(out, eps_g + 2.0 * (eps_c - eps_g))  # ε_g + w·(ε_c − ε_g)
    assert cell_cost(make_rule("autoguidance"), 2.0, schedule, 10) == (10, 0, 10)
    assert cell_cost(make_rule("autoguidance"), 1.0, schedule, 10) == (10, 0, 0)  # w = 1 skips the guide
    with pytest.raises(ValueError, match="guide"):
        GuidedDenoiser(net, schedule, labels, NUM_CLASSES, "autoguidance", 2.0)


def _perturbed(net):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    return net


class CleanClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.lin = torch.nn.Linear(16, NUM_CLASSES)
        self.seen_t = []

    def forward(self, x, t):
        self.seen_t.append(t.clone())
        return self.lin(x.flatten(1).tanh())


@pytest.mark.parametrize("exact", [False, True])
def test_cg_clean_gradient_matches_finite_differences(exact):
    from lightning_modules.diffusion import clean_log_prob

    schedule = NoiseSchedule("cosine", 1000)
    net, clf = TinyNet().double(), CleanClassifier().double()
    labels = torch.tensor([0, 2])
    log_prob = clean_log_prob(clf)
    rule = make_rule("cg_clean", GuidanceOptions(cg_clean={"exact": exact, "temperature": 2.0}))
    den = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, rule, 1.0, log_prob_x0=log_prob)
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    t, ab = 400, schedule.alphas_cumprod[400]
    a, s = ab.sqrt(), (1 - ab).sqrt()
    tt = torch.full((2,), t)
    g = den.at(x, t).score  # scale 1, weight 1: the score term is the gradient itself

    def x0_of(z):
        return (z - s * net(z, tt, labels)) / a

    def objective(z):  # exact: through the network; cheap: ∇ at x̂0, divided by √ᾱ_t
        return log_prob(x0_of(z), labels, 2.0).sum()

    x0 = x0_of(x)
    for idx in [(0, 0, 1, 2), (1, 0, 3, 0)]:
        bump = torch.zeros_like(x)
        bump[idx] = 1e-6
        if exact:
            fd = (objective(x + bump) - objective(x - bump)) / 2e-6
        else:
            fd = (log_prob(x0 + bump, labels, 2.0).sum() - log_prob(x0 - bump, labels, 2.0).sum()) / 2e-6 / a
        assert abs(fd.item() - g[idx].item()) < 1e-6
    assert all(torch.all(seen == 0) for seen in clf.seen_t)  # the clean classifier always sees t = 0


def test_cg_clean_at_zero_is_the_conditional_model_and_needs_its_classifier():
    from lightning_modules.diffusion import clean_log_prob

    log_prob = clean_log_prob(CleanClassifier())
    torch.testing.assert_close(draw("cg_clean", 0.0, log_prob_x0=None), draw("cfg", 1.0))
    guided = GuidedDenoiser(TinyNet(), NoiseSchedule(), torch.arange(6) % NUM_CLASSES, NUM_CLASSES, "cg_clean",
                            3.0, log_prob_x0=log_prob)
    assert guided.mode(500).gradient and guided.mode(500).branches == ("cond",)
    with pytest.raises(ValueError, match="clean"):
        GuidedDenoiser(TinyNet(), NoiseSchedule(), torch.arange(6) % NUM_CLASSES, NUM_CLASSES, "cg_clean", 3.0)
