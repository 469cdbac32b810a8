"""The compiled sampler step: same samples as eager, and a handful of graphs for a whole sweep.

Most tests use the "aot_eager" backend (traces and partitions like inductor, generates no code) so they
run in seconds on CPU; one slow test compiles with inductor for real.
"""

from functools import partial

import pytest
import torch

from lightning_modules.diffusion import (
    GuidanceOptions,
    GuidedDenoiser,
    NoiseSchedule,
    SamplerOptions,
    cell_cost,
    classifier_grad,
    make_rule,
    sample,
    sample_keys,
)
from lightning_modules.diffusion.samplers import compiled_step
from lightning_modules.networks import EncoderClassifier, UNet

from .helpers import CountingBackend

NUM_CLASSES, SIZE, N = 10, 8, 12


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own graphs: no cache entries (or recompile budget) left over from earlier tests."""
    torch._dynamo.reset()
    compiled_step.cache_clear()
    yield


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    net = UNet(SIZE, 1, NUM_CLASSES, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,)).eval()
    clf = EncoderClassifier(SIZE, 1, NUM_CLASSES, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                            attention_resolutions=(4,), pool="attention").eval().requires_grad_(False)
    return net, partial(classifier_grad, clf)  # one gradient function for every draw, as in a sweep


def _draw(nets, sampler="ddim", eta=0.0, compile=None, backend="aot_eager", offset=0, scales=None, **options):
    net, grad_fn = nets
    idx = torch.arange(offset, offset + N)
    # cfg+cg with mixed per-sample CFG scales: a step needs both branches and the classifier gradient.
    rule = make_rule("cfg+cg", GuidanceOptions(**options))
    den = GuidedDenoiser(net, NoiseSchedule("cosine", 1000), idx % NUM_CLASSES, NUM_CLASSES, rule,
                         MIXED if scales is None else scales, grad_fn=grad_fn)
    x = sample(den, (1, SIZE, SIZE), sample_keys(0, idx), SamplerOptions(sampler, 8, eta, compile=compile),
               compile_backend=backend)
    return x, den


MIXED = [0.0, 1.0, 2.5] * 4


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("dpmpp_2m", 0.0)])
def test_compiled_step_gives_the_eager_samples_and_costs(nets, sampler, eta):
    ref, den_ref = _draw(nets, sampler, eta)
    out, den = _draw(nets, sampler, eta, compile="default", backend=CountingBackend())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert cell_cost(den.rule, 2.5, NoiseSchedule(), 8) == (16, 8, 0)


def test_compiled_step_under_bf16_autocast(nets):
    """The sweep runs the step inside bf16 autocast on GPUs: the compiled step follows the same casts."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = _draw(nets, "ddim")
        out, _ = _draw(nets, "ddim", compile="default", backend=CountingBackend())
    assert out.dtype == torch.float32  # the sampler state stays float32; only the networks run in bf16
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_whole_sweep_compiles_once_per_step_kind(nets):
    """One graph serves every timestep, noise stream and later batch (new labels, keys and scales);
    the classifier's forward and backward are inside it (no graph break)."""
    backend = CountingBackend()
    _draw(nets, "ddpm", compile="default", backend=backend)
    assert backend.graphs == 1
    _draw(nets, "ddpm", compile="default", backend=backend, offset=N, scales=[1.5, 2.0] * (N // 2))
    assert backend.graphs == 1
    # A guidance interval switches guidance off for part of the chain: one more graph, not one per step.
    _draw(nets, "ddpm", compile="default", backend=backend, interval=(0, 500))
    assert backend.graphs == 2


def test_unknown_compile_mode_is_refused(nets):
    with pytest.raises(ValueError, match="compile mode"):
        compiled_step("ddim", "fastest")


@pytest.mark.slow
def test_inductor_compiled_sampling_matches_eager(nets):
    ref, _ = _draw(nets, "ddim")
    out, _ = _draw(nets, "ddim", compile="default", backend="inductor")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["apg", "autoguidance", "cfgpp", "icg", "tsg", "pag", "seg", "autoguidance_degraded",
                                    "cfg_zero_star", "fbg"])
def test_new_rules_compile_to_one_graph_per_step_kind(nets, method):
    net, _ = nets
    backend = CountingBackend()
    idx = torch.arange(N)
    schedule = NoiseSchedule("cosine", 1000)
    scales = [0.25, 0.5, 1.0] * 4 if method == "cfgpp" else [1.5, 2.0, 3.0] * 4

    def draw(compile):
        den = GuidedDenoiser(net, schedule, idx % NUM_CLASSES, NUM_CLASSES, method, scales, guide=net)
        return sample(den, (1, SIZE, SIZE), sample_keys(0, idx), SamplerOptions(steps=6, compile=compile),
                      compile_backend=backend)

    eager = draw(None)
    compiled = draw("default")
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert backend.graphs == (2 if method == "cfg_zero_star" else 1)  # CFG-Zero*: its zeroed first step is a kind
