"""The 2025 methods, each one class on the common hook: ICG, TSG, PAG, SEG, the degraded-guide autoguidance,
CFG-Zero* and FBG. Identities the maths guarantees, and the formulas against diffusers' guiders on the same
tensors. (Every method on every sampler: test_frontier; batch independence: test_batch_invariance; one graph
per step kind: test_compiled_sampling; DDP: test_ddp.)"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lightning_modules.diffusion import (
    GuidanceOptions,
    GuidedDenoiser,
    Predictions,
    SamplerOptions,
    StepMode,
    cell_cost,
    make_rule,
    sample,
    sample_keys,
)
from lightning_modules.diffusion.methods import GuidanceRule, feedback, zero_star

from .test_frontier import AsV
from .test_sweep_engine import make_models

N = 6


@pytest.fixture(scope="module")
def models():
    return make_models()


def draw(models, method, scales, options=None, sampler="ddim", steps=6, net=None, prediction="eps", stats=None):
    idx = torch.arange(len(scales))
    den = GuidedDenoiser(net or models.diffusion.net, models.schedule, idx % models.num_classes, models.num_classes,
                         make_rule(method, options), scales, prediction=prediction)
    return sample(den, models.shape, sample_keys(5, idx), SamplerOptions(sampler, steps), stats=stats)


def test_icg_with_the_random_class_equal_to_the_label_is_the_conditional_model(models, monkeypatch):
    conditional = draw(models, "cfg", [1.0] * N)
    guided = draw(models, "icg", [1.5, 2.0, 3.0] * 2)
    assert not torch.allclose(guided, conditional, atol=1e-3)
    monkeypatch.setattr(GuidedDenoiser, "random_labels", lambda self, keys, stream: self.labels)
    assert_close(draw(models, "icg", [1.5, 2.0, 3.0] * 2), conditional, atol=1e-6, rtol=0)


def test_icg_random_classes_are_keyed_and_cover_the_classes(models):
    den = GuidedDenoiser(models.diffusion.net, models.schedule, torch.zeros(64, dtype=torch.long), 3, "icg", 2.0)
    keys = sample_keys(0, torch.arange(64))
    first = den.random_labels(keys, torch.tensor(3))
    assert torch.equal(den.random_labels(keys[10:20], torch.tensor(3)), first[10:20])  # per sample, not per batch
    assert not torch.equal(den.random_labels(keys, torch.tensor(4)), first)  # a new class each step
    assert set(first.tolist()) == {0, 1, 2}  # real classes only, never the null label


@pytest.mark.parametrize("method,scale", [("pag", 0.0), ("seg", 0.0), ("tsg", 1.0), ("autoguidance_degraded", 1.0)])
def test_perturbation_methods_at_their_neutral_scale_are_the_conditional_model(models, method, scale):
    assert torch.equal(draw(models, method, [scale] * N), draw(models, "cfg", [1.0] * N))


def test_tsg_with_zero_strength_is_the_conditional_model(models):
    options = GuidanceOptions(tsg={"strength": 0.0})
    assert_close(draw(models, "tsg", [2.0, 3.0] * 3, options), draw(models, "cfg", [1.0] * N), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["pag", "seg", "tsg", "autoguidance_degraded"])
def test_the_clean_pass_is_the_unperturbed_network_and_the_perturbed_one_differs(models, method):
    seen = {}

    class Spy(type(make_rule(method))):
        def combine(self, p: Predictions, scale, w):
            seen.update(cond=p.cond, perturbed=p.perturbed)
            return super().combine(p, scale, w)

    net = models.diffusion.net
    labels = torch.arange(N) % 3
    den = GuidedDenoiser(net, models.schedule, labels, 3, Spy(), 2.0)
    x, t = torch.randn(N, *models.shape), 500
    den.at(x, t, keys=sample_keys(0, torch.arange(N)))
    clean = net(x, torch.full((N,), t), labels)
    assert torch.equal(seen["cond"], clean)  # bit-identical to a plain forward of the network
    assert not torch.allclose(seen["perturbed"], clean, atol=1e-4)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())  # nothing left on it


def test_pag_matches_diffusers_perturbed_attention_guidance():
    from diffusers.guiders import PerturbedAttentionGuidance

    torch.manual_seed(0)
    cond, uncond, pert = (torch.randn(4, 1, 8, 8) for _ in range(3))
    p = Predictions(cond, torch.zeros(4), torch.tensor(0.5), torch.tensor(0.8), {}, cond=cond, uncond=uncond,
                    perturbed=pert)
    s = torch.tensor([0.5, 1.0, 2.8, 4.0])
    for w in (1.0, 3.0):
        rule = make_rule("pag", GuidanceOptions(pag={"cfg_scale": w}))
        if w == 1.0:
            p.uncond = None  # no CFG part: no unconditional evaluation
        ours = rule.combine(p, s, torch.tensor(1.0)).eps
        for i, si in enumerate(s.tolist()):
            # The paper's form ε_c + s(ε_c − ε_pert) is diffusers' use_original_formulation (its default guides
            # around ε_pert); with CFG, diffusers' default is ε_u + w(ε_c − ε_u) + s(ε_c − ε_pert), ours.
            guider = PerturbedAttentionGuidance(guidance_scale=0.0 if w == 1.0 else w, perturbed_guidance_scale=si,
                                                perturbed_guidance_layers=[0], perturbed_guidance_start=0.0,
                                                perturbed_guidance_stop=1.0, use_original_formulation=w == 1.0)
            guider.set_state(step=1, num_inference_steps=10, timestep=torch.tensor(500))
            ref = guider.forward(cond[i:i + 1], None if w == 1.0 else uncond[i:i + 1], pert[i:i + 1]).pred
            assert_close(ours[i:i + 1], ref, atol=1e-6, rtol=1e-6)
        p.uncond = uncond


def test_cfg_zero_star_with_unit_projection_and_no_zeroed_steps_is_cfg(models, monkeypatch):
    options = GuidanceOptions(cfg_zero_star={"zero_steps": 0})
    scales = [1.0, 1.5, 2.0, 3.0, 0.5, 1.25]
    assert not torch.allclose(draw(models, "cfg_zero_star", scales, options), draw(models, "cfg", scales), atol=1e-3)
    monkeypatch.setattr(zero_star, "optimal_scale", lambda p_c, p_u, eps=1e-8: torch.ones(len(p_c), 1, 1, 1))
    assert_close(draw(models, "cfg_zero_star", scales, options), draw(models, "cfg", scales), atol=1e-5, rtol=1e-5)


def test_cfg_zero_star_zeroes_its_first_steps_without_evaluating_and_ignores_the_parameterisation(models):
    rule = make_rule("cfg_zero_star", GuidanceOptions(cfg_zero_star={"zero_steps": 2}))
    assert cell_cost(rule, 2.0, models.schedule, 6) == (8.0, 0.0, 0.0)  # 2 zeroed steps, then 4 × 2 branches
    assert rule.plain(1.0) is None  # w = 1 still has its zeroed steps
    scales = [1.0, 2.0, 3.0] * 2
    eps = draw(models, "cfg_zero_star", scales)
    as_v = draw(models, "cfg_zero_star", scales, net=AsV(models.diffusion.net, models.schedule), prediction="v")
    assert_close(as_v, eps, atol=2e-4, rtol=1e-4)


def _frozen_log_posterior(value: float):
    def update(log_posterior, *args, **kwargs):
        return torch.full_like(log_posterior, value)

    return update


def test_fbg_with_its_log_posterior_frozen_is_cfg_at_the_scale_it_implies(models, monkeypatch):
    pi, lam = 0.999, 2.0
    frozen = math.log((1 - pi) * lam / (lam - 1))  # λ = e^L/(e^L − (1 − π)) = 2
    monkeypatch.setattr(feedback, "fbg_log_posterior_update", _frozen_log_posterior(frozen))
    stats: dict = {}
    guided = draw(models, "fbg", [10.0] * N, stats=stats)
    assert_close(stats["trace"]["lambda"], torch.full((6, N), lam), atol=1e-4, rtol=0)  # λ per step and sample
    monkeypatch.setattr(feedback, "fbg_lambda", lambda log_posterior, pi: torch.full_like(log_posterior, lam))
    assert_close(draw(models, "fbg", [10.0] * N), draw(models, "cfg", [lam] * N), atol=1e-5, rtol=1e-5)
    assert guided.shape == (N, *models.shape)


def test_fbg_scale_stays_within_one_and_lambda_max_and_is_the_conditional_model_at_one(models):
    stats: dict = {}
    draw(models, "fbg", [1.0, 1.5, 3.0] * 2, stats=stats, steps=10)
    lam = stats["trace"]["lambda"]
    assert lam.shape == (10, N) and (lam >= 1).all()
    assert (lam[:, [0, 3]] == 1).all() and (lam[:, [1, 4]] <= 1.5 + 1e-6).all() and (lam[:, [2, 5]] <= 3.0 + 1e-6).all()
    assert torch.equal(draw(models, "fbg", [1.0] * N), draw(models, "cfg", [1.0] * N))


class BadBranches(GuidanceRule):
    name, label, default_scales = "bad", "bad", (1.0,)

    def __init__(self, branches):
        super().__init__()
        self.branches = branches

    def gamma(self, scale):
        return scale

    def mode(self, scales, w):
        return StepMode(self.branches, False)


@pytest.mark.parametrize("branches", [("cond", "bogus"), ("perturbed",), ("cond", "cond"), ("guide",)])
def test_the_denoiser_refuses_branches_it_cannot_evaluate(models, branches):
    den = GuidedDenoiser(models.diffusion.net, models.schedule, torch.zeros(2, dtype=torch.long), 3,
                         BadBranches(branches), 1.0)
    with pytest.raises(ValueError, match="branches"):
        den.mode(500)


def test_methods_needing_the_null_label_are_refused_on_a_model_trained_without_label_dropout(tmp_path):
    from lightning_modules.diffusion import OptionError
    from lightning_modules.sweep.planning import check_null_label

    from .test_sweep_engine import config

    models = make_models()
    models.diffusion.hparams["p_uncond"] = 0.0
    check_null_label(config(tmp_path, methods=["icg", "pag", "tsg", "cg_cond"], scales=None), models)  # none needed
    check_null_label(config(tmp_path, methods=["cfg"], scales={"cfg": [1.0]}), models)  # s = 1: cond branch only
    with pytest.raises(OptionError, match="sweep.methods.*cfg evaluates the null label.*icg"):
        check_null_label(config(tmp_path, methods=["icg", "cfg"], scales={"cfg": [1.0, 2.0]}), models)


def test_the_bad_version_section_puts_the_four_guides_side_by_side_against_the_trained_one():
    from lightning_modules.sweep.bad_version import bad_version_markdown

    best = [{"method": m, "best_scale": s, "fid": f, "fid_std": 0.01, "matched_accuracy": 0.99, "matched_scale": s,
             "matched_fid": f + 0.01} for m, s, f in (("autoguidance", 1.5, 0.07), ("pag", 1.0, 0.09),
                                                     ("seg", 0.5, 0.10), ("autoguidance_degraded", 2.0, 0.08),
                                                     ("cfg", 1.25, 0.08))]
    comparison = dict(metric="fid", at="best scale", verdict="worse", spaces={})
    verdicts = {"comparisons": [{**comparison, "method": "pag", "vs": "autoguidance", "delta": 0.02, "lo": 0.01,
                                 "hi": 0.03},
                                # the other orientation (when a family member is the best method): flipped
                                {**comparison, "method": "autoguidance", "vs": "seg", "delta": -0.03, "lo": -0.05,
                                 "hi": -0.01, "verdict": "better"}]}
    text = "\n".join(bad_version_markdown(best, verdicts))
    assert "A bad version of itself" in text and "`cfg`" not in text
    assert "| PAG (perturbed attention) (`pag`) | 1 | 0.09 ± 0.01 | 1 | 0.1 | +0.02 [+0.01, +0.03] worse | — |" in text
    assert "+0.03 [+0.01, +0.05] worse" in text  # seg against the trained guide, from autoguidance vs seg
    assert bad_version_markdown([b for b in best if b["method"] in ("pag", "cfg")], verdicts) == []
