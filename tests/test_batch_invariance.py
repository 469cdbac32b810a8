"""A sample depends only on its seed, index, label and settings, never on what shares its batch.

For every guidance method, with every option that changes a rule switched on, each (scale, sample index) is
drawn (a) alone, (b) in a batch of only its own scale, (c) in one batch mixing all the method's scales and
(d) in chunks of another size that cut across scales. The four must agree up to the float rounding that a
different batch size gives a convolution; a branch evaluated (or not) for the neighbours' sake must not
change a row.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lightning_modules.diffusion import (
    METHODS,
    GuidanceOptions,
    GuidedDenoiser,
    NoiseSchedule,
    SamplerOptions,
    sample,
    sample_keys,
)
from lightning_modules.networks import EncoderClassifier, UNet
from lightning_modules.sweep import Network, SweepModels

from .test_sweep_engine import HP, make_models

N = 3  # samples per scale: labels 0, 1, 2
SEED = 11
# every other method: [0, 1, 2.5]
GRIDS = {"cfgpp": [0.0, 0.5, 1.0], "cg_uncond": [0.0, 1.0, 3.0], "gft": [1.0, 1.5, 2.5]}
# Guidance only at 599, 400, 200 of the six respaced steps 999, 799, 599, 400, 200, 0: the interval drops 999
# and 799, the σ band (0.1, 2] drops 0 (σ ≈ 0.006), so steps with and without guidance alternate in one chain.
BANDS = dict(interval=(0, 700), sigma_interval=(0.1, 2.0))
SETTINGS = [  # (sampler options, scale schedule): every sampler, every schedule
    (SamplerOptions(sampler="ddim", steps=6, eta=0.5), "constant"),
    (SamplerOptions(sampler="ddpm", steps=6, threshold=0.995), "linear"),
    (SamplerOptions(sampler="dpmpp_2m", steps=6), "cosine"),
]


@pytest.fixture(scope="module")
def models() -> SweepModels:
    base = make_models()
    torch.manual_seed(3)
    guide = UNet.from_hparams(HP)
    for p in guide.parameters():  # a different, non-zero network (fresh UNets output zeros)
        p.data.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(4)
    clean = EncoderClassifier.from_hparams(HP)
    return SweepModels(base.diffusion, base.classifier, Network(guide, dict(HP), 2),
                       Network(clean, {**HP, "train_on": "clean"}, 3))


def _net(models: SweepModels, method: str):
    """The diffusion network; for gft one with GFT's β input (the same weights elsewhere, the β map random)."""
    if method != "gft":
        return models.diffusion.net
    torch.manual_seed(7)
    return make_models(guidance_training="gft").diffusion.net


def _options(schedule: str, exact: bool) -> GuidanceOptions:
    return GuidanceOptions(**BANDS, scale_schedule=schedule, cfg_rescale=0.7, cfg_cg={"cg_scale": 0.5},
                           apg={"eta": 0.3, "momentum": -0.5, "threshold": 0.5},
                           cg_clean={"temperature": 2.0, "exact": exact})


def _draw(models: SweepModels, method: str, options: GuidanceOptions, sampling: SamplerOptions,
          items: list[tuple[float, int]]) -> torch.Tensor:
    """One sampler call over (scale, sample index) items, as the sweep engine builds it."""
    index = torch.tensor([i for _, i in items])
    den = GuidedDenoiser(_net(models, method), models.schedule, index % models.num_classes, models.num_classes,
                         method, [s for s, _ in items], grad_fn=models.grad_fn, prediction=models.prediction,
                         options=options, guide=models.guide.net, guide_prediction="eps",
                         log_prob_x0=models.clean_log_prob)
    return sample(den, models.shape, sample_keys(SEED, index), sampling)


@pytest.mark.parametrize("sampling,schedule", SETTINGS, ids=[s.sampler for s, _ in SETTINGS])
@pytest.mark.parametrize("method", METHODS)
def test_a_cell_does_not_depend_on_what_shares_its_batch(models, method, sampling, schedule):
    options = _options(schedule, exact=sampling.sampler == "ddim")  # cg_clean's exact Jacobian on one sampler
    grid = GRIDS.get(method, [0.0, 1.0, 2.5])
    items = [(s, i) for s in grid for i in range(N)]  # scale-major, like a sweep job

    def draw(part: list[tuple[float, int]]) -> dict[tuple[float, int], torch.Tensor]:
        return dict(zip(part, _draw(models, method, options, sampling, part)))

    mixed = draw(items)  # (c)
    alone = {k: v for s in grid for k, v in draw([(s, N - 1)]).items()}  # (a), one index per scale: time
    own = {k: v for s in grid for k, v in draw([(s, i) for i in range(N)]).items()}  # (b)
    shuffled = items[::2] + items[1::2]  # (d): chunks of 4 that cut across scales, in another order
    chunked = {k: v for c in range(0, len(items), 4) for k, v in draw(shuffled[c:c + 4]).items()}
    for item in items:
        for name, other in (("alone", alone), ("own scale", own), ("rechunked", chunked)):
            if item not in other:
                continue
            torch.testing.assert_close(other[item], mixed[item], atol=1e-5, rtol=1e-5,
                                       msg=lambda m, n=name, k=item: f"{method} {k} {n} vs mixed: {m}")
    if method == "none":  # the scale is ignored: every cell is the conditional model
        for s, i in items:
            torch.testing.assert_close(mixed[(s, i)], mixed[(grid[0], i)], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
@pytest.mark.parametrize("method", METHODS)
def test_one_step_of_a_row_does_not_depend_on_the_other_scales(models, method, schedule):
    """Every output of one denoiser step (ε, score, renoising ε), with no band (the guidance weight is 1, or the
    ramp's value) and at noise levels from pure noise to the data end."""
    options = replace(_options(schedule, exact=True), interval=None, sigma_interval=None)
    grid = GRIDS.get(method, [0.0, 1.0, 2.5])
    index = torch.arange(N)
    x = torch.randn(N, *models.shape, generator=torch.Generator().manual_seed(0))

    def step(scales: list[float], rows: torch.Tensor, t: int):
        den = GuidedDenoiser(_net(models, method), models.schedule, rows % models.num_classes, models.num_classes,
                             method, scales, grad_fn=models.grad_fn, options=options, guide=models.guide.net,
                             log_prob_x0=models.clean_log_prob)
        out = den.at(x[rows], t, keys=sample_keys(SEED, rows))
        zeros = torch.zeros_like(out.eps)
        return out.eps, zeros if out.score is None else out.score, out.eps if out.eps_renoise is None \
            else out.eps_renoise

    for t in (999, 500, 0):
        mixed = step([s for s in grid for _ in index], index.repeat(len(grid)), t)
        for j, s in enumerate(grid):
            own = step([s] * N, index, t)
            for name, a, b in zip(("eps", "score", "renoise"), own, mixed):
                torch.testing.assert_close(a, b[j * N:(j + 1) * N], atol=1e-5, rtol=1e-5,
                                           msg=lambda m, n=name, s=s, t=t: f"{method} s={s} t={t} {n}: {m}")


def test_cfg_rescale_leaves_unguided_rows_alone():
    """The reported case: with cfg_rescale, CFG s = 0 rows (the unconditional model) were rescaled towards the
    conditional std whenever an s ≠ 0 row shared the batch (by up to 0.48 on this step); s = 1 rows must
    stay the conditional model in both batches."""
    from .test_guidance import NUM_CLASSES, SHAPE, TinyNet

    net, schedule = TinyNet(), NoiseSchedule("cosine", 1000)
    labels, x = torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(0))

    def eps(method: str, scales: list[float]) -> torch.Tensor:
        grad_fn = (lambda z, t, y: torch.ones_like(z)) if method == "cfg+cg" else None
        return GuidedDenoiser(net, schedule, labels, NUM_CLASSES, method, scales, grad_fn=grad_fn,
                              options=GuidanceOptions(cfg_rescale=0.7)).at(x, 500).eps

    for method in ("cfg", "cfg+cg"):
        for plain in (0.0, 1.0):
            torch.testing.assert_close(eps(method, [plain, 2.0] * 3)[::2], eps(method, [plain] * 6)[::2], atol=1e-6,
                                       rtol=1e-6)
