"""Guarantees of the guidance rules on one sampler loop (docs/conventions.md)."""

from functools import partial

import pytest
import torch
from torch import nn

from lightning_modules.diffusion import (
    GuidanceOptions,
    GuidedDenoiser,
    NoiseSchedule,
    OptionError,
    SamplerOptions,
    cell_cost,
    classifier_grad,
    make_rule,
    sample,
    sample_keys,
)

NUM_CLASSES = 3
SHAPE = (1, 4, 4)


class TinyNet(nn.Module):
    """A label- and time-dependent ε-network with no cross-sample interaction."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(NUM_CLASSES + 1, 16)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((len(x), y.clone()))
        bias = self.embed(y).view(-1, 1, 4, 4) * 0.3
        return torch.tanh(self.conv(x) + bias + t.view(-1, 1, 1, 1) / 1000)


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(16 + 1, NUM_CLASSES)
        self.seen_t = []

    def forward(self, x, t):
        self.seen_t.append(t.clone())
        return self.lin(torch.cat([x.flatten(1).tanh(), t.view(-1, 1).float() / 1000], 1))


@pytest.fixture
def setup():
    schedule = NoiseSchedule("cosine", 1000)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    return schedule, labels, torch.randn(6, *SHAPE)


def test_cfg_at_one_is_conditional_and_at_zero_unconditional(setup):
    schedule, labels, x = setup
    net = TinyNet()
    t = torch.full((6,), 500)
    cond = net(x, t, labels)
    uncond = net(x, t, torch.full_like(labels, NUM_CLASSES))
    torch.testing.assert_close(GuidedDenoiser(net, schedule, labels, NUM_CLASSES, "cfg", 1.0).at(x, 500).eps, cond)
    torch.testing.assert_close(GuidedDenoiser(net, schedule, labels, NUM_CLASSES, "cfg", 0.0).at(x, 500).eps, uncond)
    s = 3.0
    torch.testing.assert_close(GuidedDenoiser(net, schedule, labels, NUM_CLASSES, "cfg", s).at(x, 500).eps,
                               uncond + s * (cond - uncond))


def test_batched_cfg_is_one_forward_with_fixed_chunk_order(setup):
    schedule, labels, x = setup
    net = TinyNet()
    den = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, "cfg", 2.0)
    den.at(x, 300)
    assert len(net.calls) == 1 and net.calls[0][0] == 12  # one forward of 2B
    y_in = net.calls[0][1]
    assert torch.equal(y_in[:6], labels) and torch.all(y_in[6:] == NUM_CLASSES)  # cond first, null second
    assert den.mode(300).network_evaluations == 2


def test_cg_scale_zero_gives_exactly_the_unguided_samples(setup):
    schedule, labels, _ = setup
    keys = sample_keys(0, torch.arange(6))
    for sampler in ("ddim", "ddpm"):
        options = SamplerOptions(sampler, 8)
        plain = sample(GuidedDenoiser(TinyNet(), schedule, labels, NUM_CLASSES), SHAPE, keys, options)
        cg0 = sample(GuidedDenoiser(TinyNet(), schedule, labels, NUM_CLASSES, "cg_cond", 0.0,
                                    grad_fn=partial(classifier_grad, TinyClassifier())), SHAPE, keys, options)
        assert torch.equal(plain, cg0)
        guided = sample(GuidedDenoiser(TinyNet(), schedule, labels, NUM_CLASSES, "cg_cond", 5.0,
                                       grad_fn=partial(classifier_grad, TinyClassifier())), SHAPE, keys, options)
        assert not torch.allclose(plain, guided)


def test_classifier_gradient_matches_finite_differences():
    clf = TinyClassifier().double()
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    t, y = torch.tensor([10, 700]), torch.tensor([2, 0])
    g = classifier_grad(clf, x, t, y)

    def logp(z):
        return torch.log_softmax(clf(z, t), -1).gather(1, y.view(-1, 1)).sum()

    eps = 1e-6
    for idx in [(0, 0, 1, 2), (1, 0, 3, 0), (1, 0, 0, 0)]:
        bump = torch.zeros_like(x)
        bump[idx] = eps
        fd = (logp(x + bump) - logp(x - bump)) / (2 * eps)
        assert abs(fd.item() - g[idx].item()) < 1e-6


def test_classifier_gradient_works_inside_no_grad_and_inference_mode():
    clf = TinyClassifier()
    x, t, y = torch.randn(2, *SHAPE), torch.tensor([1, 2]), torch.tensor([0, 1])
    with torch.no_grad():
        assert classifier_grad(clf, x, t, y).abs().sum() > 0


def test_classifier_sees_original_timesteps_under_respacing(setup):
    schedule, labels, _ = setup
    clf = TinyClassifier()
    den = GuidedDenoiser(TinyNet(), schedule, labels, NUM_CLASSES, "cg_cond", 1.0,
                         grad_fn=partial(classifier_grad, clf))
    sample(den, SHAPE, sample_keys(0, torch.arange(6)), SamplerOptions(steps=10))
    seen = [int(t[0]) for t in clf.seen_t]
    assert seen == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert all(torch.all(t == t[0]) for t in clf.seen_t)


@pytest.mark.parametrize("method", ["cfg", "cg_cond", "cg_uncond", "cfg+cg", "apg", "cfgpp", "autoguidance",
                                    "cg_clean"])
def test_per_sample_scale_vector_equals_separate_runs(setup, method):
    from lightning_modules.diffusion import clean_log_prob

    schedule, _, _ = setup
    scales = [0.0, 0.5, 1.0] if method == "cfgpp" else [0.0, 1.0, 2.5]
    n = 4
    labels = torch.arange(n) % NUM_CLASSES
    keys = sample_keys(7, torch.arange(n))
    rule = make_rule(method, GuidanceOptions(cfg_cg={"cg_scale": 0.5}, apg={"threshold": 1.0}))
    extra = {"grad_fn": partial(classifier_grad, TinyClassifier()), "guide": _weaker(TinyNet()),
             "log_prob_x0": clean_log_prob(TinyClassifier())}
    batched = sample(GuidedDenoiser(TinyNet(), schedule, labels.repeat(3), NUM_CLASSES, rule,
                                    [s for s in scales for _ in range(n)], **extra),
                     SHAPE, keys.repeat(3), SamplerOptions(steps=6))
    for j, scale in enumerate(scales):
        alone = sample(GuidedDenoiser(TinyNet(), schedule, labels, NUM_CLASSES, rule, scale, **extra),
                       SHAPE, keys, SamplerOptions(steps=6))
        torch.testing.assert_close(batched[j * n:(j + 1) * n], alone, atol=1e-5, rtol=1e-5)


def _weaker(net):
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    return net


def test_gamma_common_axis():
    assert make_rule("cfg").gamma(3.0) == 3.0
    assert make_rule("cg_cond").gamma(2.0) == 3.0
    assert make_rule("cg_uncond").gamma(2.0) == 2.0
    assert make_rule("cfg+cg", GuidanceOptions(cfg_cg={"cg_scale": 0.5})).gamma(2.0) == 2.5
    with pytest.raises(OptionError, match="methods.*cfg"):
        make_rule("bogus")


def test_guidance_interval_and_schedule_modulate_only_the_excess(setup):
    schedule, labels, x = setup
    net = TinyNet()
    cond = net(x, torch.full((6,), 900), labels)
    den = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, "cfg", 4.0, options=GuidanceOptions(interval=(0, 500)))
    torch.testing.assert_close(den.at(x, 900).eps, cond)  # outside the band: plain conditional
    assert not torch.allclose(den.at(x, 400).eps, net(x, torch.full((6,), 400), labels))
    lin = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, "cfg", 4.0,
                         options=GuidanceOptions(scale_schedule="linear"))
    assert lin.weight(999) == 0.0 and lin.weight(0) == 1.0
    cos = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, "cfg", 4.0,
                         options=GuidanceOptions(scale_schedule="cosine"))
    assert abs(cos.weight(999)) < 1e-12 and abs(cos.weight(0) - 1.0) < 1e-12
    uncond_cg = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, "cg_uncond", 2.0,
                               grad_fn=partial(classifier_grad, TinyClassifier()),
                               options=GuidanceOptions(interval=(0, 500)))
    out = uncond_cg.at(x, 900)
    assert out.score is None  # no classifier gradient outside the band
    torch.testing.assert_close(out.eps, net(x, torch.full((6,), 900), torch.full_like(labels, 3)))


def test_cfg_rescale_matches_conditional_std(setup):
    schedule, labels, x = setup
    net = TinyNet()
    den = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, "cfg", 6.0, options=GuidanceOptions(cfg_rescale=1.0))
    out = den.at(x, 500).eps
    cond = net(x, torch.full((6,), 500), labels)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), atol=1e-5, rtol=1e-4)


def test_classifier_guidance_without_gradient_function_is_a_clear_error(setup):
    schedule, labels, _ = setup
    with pytest.raises(ValueError, match="classifier"):
        GuidedDenoiser(TinyNet(), schedule, labels, NUM_CLASSES, "cg_cond", 1.0)
    GuidedDenoiser(TinyNet(), schedule, labels, NUM_CLASSES, "cg_cond", 0.0)  # s = 0 takes no gradient


@pytest.mark.parametrize("bad,option", [
    ({"interval": (600, 100)}, "interval"), ({"interval": (-1, 100)}, "interval"),
    ({"scale_schedule": "cubic"}, "scale_schedule"), ({"cfg_rescale": 1.5}, "cfg_rescale"),
    ({"cfg_cg": {"cg_scale": float("nan")}}, "cfg_cg.cg_scale"),
])
def test_bad_guidance_options_name_the_option(bad, option):
    with pytest.raises(OptionError, match=f"`{option}`.*Fix"):
        GuidanceOptions(**bad).check()
    with pytest.raises(OptionError, match=f"`{option}`"):  # the denoiser refuses them before sampling
        GuidedDenoiser(TinyNet(), NoiseSchedule(), torch.zeros(2, dtype=torch.long), NUM_CLASSES, "cfg", 2.0,
                       options=GuidanceOptions(**bad))
    with pytest.raises(OptionError, match="interval"):
        GuidanceOptions(interval=(0, 1000)).check(timesteps=1000)


def test_score_is_applied_in_eps_form_and_mean_form():
    from lightning_modules.diffusion import condition_mean, condition_score

    eps, mean, g = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    torch.testing.assert_close(condition_score(eps, g, torch.tensor(0.5)), eps - 1.0)
    torch.testing.assert_close(condition_mean(mean, g, torch.tensor(0.25)), mean + 0.5)
    assert condition_score(eps, None, torch.tensor(0.5)) is eps


def test_cell_cost_counts_what_a_cell_needs_by_itself():
    def cost(method, scale, **options):
        return cell_cost(make_rule(method, GuidanceOptions(**options)), scale, NoiseSchedule(), 10)

    assert cost("cfg", 0.0) == (10, 0, 0)  # unconditional: one branch
    assert cost("cfg", 1.0) == (10, 0, 0)  # conditional: one branch
    assert cost("cfg", 2.0) == (20, 0, 0)
    assert cost("cg_cond", 0.0) == (10, 0, 0)
    assert cost("cg_uncond", 3.0) == (10, 10, 0)
    # Respaced steps 999, 888, ..., 0: four of them (333, 222, 111, 0) fall inside a [0, 400] interval.
    assert cost("cfg+cg", 2.0, cfg_cg={"cg_scale": 1.0}, interval=(0, 400)) == (14, 4, 0)
