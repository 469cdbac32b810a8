"""Guarantees of the guidance rules on one sampler loop (DESIGN.md conventions)."""

import pytest
import torch
from torch import nn

from lightning_modules.diffusion import (
    GuidedDenoiser,
    NoiseSchedule,
    classifier_grad,
    gamma,
    method_scales,
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
    torch.testing.assert_close(GuidedDenoiser(net, schedule, labels, NUM_CLASSES, cfg_scale=1.0).eps(x, 500), cond)
    torch.testing.assert_close(GuidedDenoiser(net, schedule, labels, NUM_CLASSES, cfg_scale=0.0).eps(x, 500), uncond)
    s = 3.0
    torch.testing.assert_close(GuidedDenoiser(net, schedule, labels, NUM_CLASSES, cfg_scale=s).eps(x, 500),
                               uncond + s * (cond - uncond))


def test_batched_cfg_is_one_forward_with_fixed_chunk_order(setup):
    schedule, labels, x = setup
    net = TinyNet()
    den = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, cfg_scale=2.0)
    den.eps(x, 300)
    assert len(net.calls) == 1 and net.calls[0][0] == 12  # one forward of 2B
    y_in = net.calls[0][1]
    assert torch.equal(y_in[:6], labels) and torch.all(y_in[6:] == NUM_CLASSES)  # cond first, null second
    assert den.nfe == 2


def test_cg_scale_zero_gives_exactly_the_unguided_samples(setup):
    schedule, labels, _ = setup
    keys = sample_keys(0, torch.arange(6))
    for sampler in ("ddim", "ddpm"):
        plain = sample(GuidedDenoiser(TinyNet(), schedule, labels, NUM_CLASSES), SHAPE, keys, 8, sampler)
        cg0 = sample(GuidedDenoiser(TinyNet(), schedule, labels, NUM_CLASSES, cg_scale=0.0,
                                    classifier=TinyClassifier()), SHAPE, keys, 8, sampler)
        assert torch.equal(plain, cg0)
        guided = sample(GuidedDenoiser(TinyNet(), schedule, labels, NUM_CLASSES, cg_scale=5.0,
                                       classifier=TinyClassifier()), SHAPE, keys, 8, sampler)
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
    den = GuidedDenoiser(TinyNet(), schedule, labels, NUM_CLASSES, cg_scale=1.0, classifier=clf)
    sample(den, SHAPE, sample_keys(0, torch.arange(6)), 10, "ddim")
    seen = [int(t[0]) for t in clf.seen_t]
    assert seen == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert all(torch.all(t == t[0]) for t in clf.seen_t)
    assert den.classifier_grads == 10 and den.nfe == 10


@pytest.mark.parametrize("method", ["cfg", "cg_cond", "cg_uncond", "cfg+cg"])
def test_per_sample_scale_vector_equals_separate_runs(setup, method):
    schedule, _, _ = setup
    scales = [0.0, 1.0, 2.5]
    n = 4
    labels = torch.arange(n) % NUM_CLASSES
    keys = sample_keys(7, torch.arange(n))
    pairs = [method_scales(method, s, 0.5) for s in scales]
    batched = sample(GuidedDenoiser(TinyNet(), schedule, labels.repeat(3), NUM_CLASSES,
                                    cfg_scale=[p[0] for p in pairs for _ in range(n)],
                                    cg_scale=[p[1] for p in pairs for _ in range(n)], classifier=TinyClassifier()),
                     SHAPE, keys.repeat(3), 6, "ddim")
    for j, (s_cfg, s_cg) in enumerate(pairs):
        alone = sample(GuidedDenoiser(TinyNet(), schedule, labels, NUM_CLASSES, cfg_scale=s_cfg, cg_scale=s_cg,
                                      classifier=TinyClassifier()), SHAPE, keys, 6, "ddim")
        torch.testing.assert_close(batched[j * n:(j + 1) * n], alone, atol=1e-5, rtol=1e-5)


def test_gamma_common_axis():
    assert gamma("cfg", 3.0) == 3.0
    assert gamma("cg_cond", 2.0) == 3.0
    assert gamma("cg_uncond", 2.0) == 2.0
    with pytest.raises(ValueError, match="cfg"):
        method_scales("bogus", 1.0)


def test_guidance_interval_and_schedule_modulate_only_the_excess(setup):
    schedule, labels, x = setup
    net = TinyNet()
    cond = net(x, torch.full((6,), 900), labels)
    den = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, cfg_scale=4.0, interval=(0, 500))
    torch.testing.assert_close(den.eps(x, 900), cond)  # outside the band: plain conditional
    assert not torch.allclose(den.eps(x, 400), net(x, torch.full((6,), 400), labels))
    lin = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, cfg_scale=4.0, scale_schedule="linear")
    assert lin.weight(999) == 0.0 and lin.weight(0) == 1.0
    cos = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, cfg_scale=4.0, scale_schedule="cosine")
    assert abs(cos.weight(999)) < 1e-12 and abs(cos.weight(0) - 1.0) < 1e-12
    uncond_cg = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, cfg_scale=0.0, cg_scale=2.0,
                               classifier=TinyClassifier(), interval=(0, 500))
    assert uncond_cg.grad(x, 900) is None  # no classifier gradient outside the band
    torch.testing.assert_close(uncond_cg.eps(x, 900), net(x, torch.full((6,), 900), torch.full_like(labels, 3)))


def test_cfg_rescale_matches_conditional_std(setup):
    schedule, labels, x = setup
    net = TinyNet()
    den = GuidedDenoiser(net, schedule, labels, NUM_CLASSES, cfg_scale=6.0, cfg_rescale=1.0)
    out = den.eps(x, 500)
    cond = net(x, torch.full((6,), 500), labels)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), atol=1e-5, rtol=1e-4)


def test_classifier_guidance_without_classifier_is_a_clear_error(setup):
    schedule, labels, _ = setup
    with pytest.raises(ValueError, match="classifier"):
        GuidedDenoiser(TinyNet(), schedule, labels, NUM_CLASSES, cg_scale=1.0)


def test_cell_cost_counts_what_a_cell_needs_by_itself():
    from lightning_modules.diffusion import guidance_cost

    schedule = NoiseSchedule("cosine", 1000)
    assert guidance_cost(schedule, 10, *method_scales("cfg", 0.0)) == (10, 0)  # unconditional: one branch
    assert guidance_cost(schedule, 10, *method_scales("cfg", 1.0)) == (10, 0)  # conditional: one branch
    assert guidance_cost(schedule, 10, *method_scales("cfg", 2.0)) == (20, 0)
    assert guidance_cost(schedule, 10, *method_scales("cg_cond", 0.0)) == (10, 0)
    assert guidance_cost(schedule, 10, *method_scales("cg_uncond", 3.0)) == (10, 10)
    # Respaced steps 999, 888, ..., 0: four of them (333, 222, 111, 0) fall inside a [0, 400] interval.
    assert guidance_cost(schedule, 10, *method_scales("cfg+cg", 2.0, 1.0), interval=(0, 400)) == (14, 4)
