"""Network perturbations for "bad version of itself" guidance: the original stays untouched, each kind does what
its paper (or reference code) does, keyed randomness is batch-independent, and the perturbed pass compiles to one
graph."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.diffusion.options import OptionError
from lightning_modules.networks import UNet
from lightning_modules.networks.layers import ResBlock
from lightning_modules.networks.perturbations import (
    PERTURBATIONS,
    AttentionBlur,
    AttentionIdentity,
    BlockSkip,
    KeyedDropout,
    TimeEmbeddingNoise,
    _attention,
    _blur_queries,
)

from .helpers import CountingBackend

B = 6
ALL_KINDS = [AttentionIdentity(), AttentionIdentity(("down.2", "up")), AttentionBlur(), AttentionBlur(1.0, "all"),
             TimeEmbeddingNoise(), KeyedDropout(), BlockSkip()]
KEYED = [TimeEmbeddingNoise(), KeyedDropout(), BlockSkip(), BlockSkip(0.5)]
ONE_PER_KIND = [AttentionIdentity(), AttentionBlur(1.0, "all"), TimeEmbeddingNoise(), KeyedDropout(), BlockSkip()]


@pytest.fixture(scope="module")
def net() -> UNet:
    torch.manual_seed(0)
    net = UNet(8, 1, 10, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,)).eval()
    for p in net.parameters():  # the UNet zero-initialises its output convs: perturbations would be invisible
        p.data.add_(0.2 * torch.randn_like(p))
    return net.requires_grad_(False)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 1, 8, 8, generator=g)
    t = torch.tensor([999, 800, 500, 250, 40, 3])
    y = torch.tensor([0, 3, 10, 7, 1, 10])  # 10 = the null label
    keys = torch.tensor([11, 5, 907, 3, 42, 77], dtype=torch.int64)
    return x, t, y, keys, torch.tensor(7)


def _no_hooks(module: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


@pytest.mark.parametrize("pert", ALL_KINDS, ids=str)
def test_original_network_is_untouched_and_shares_its_weights(net, inputs, pert):
    x, t, y, keys, stream = inputs
    before = net(x, t, y)
    pn = pert.attach(net)
    pn(x, t, y, keys, stream)
    pn(x[:2], t[2], y[:2], keys[:2], torch.tensor(0))  # a 0-d t too
    assert torch.equal(net(x, t, y), before)
    assert _no_hooks(net) and not _no_hooks(pn.net)
    assert [id(p) for p in pn.net.parameters()] == [id(p) for p in net.parameters()]  # the same tensors, no copy
    assert [id(b) for b in pn.net.buffers()] == [id(b) for b in net.buffers()]
    pn.train()
    assert not pn.net.training  # no unkeyed train-mode dropout inside a perturbed pass


def test_untransformed_attention_path_is_selfattention(net, inputs):
    """_attention mirrors SelfAttention.forward: with identity queries it is the module itself, bit for bit."""
    attn = net.mid[1]
    h = torch.randn(3, attn.qkv.in_channels, 4, 4)
    assert torch.equal(_attention(attn, h, lambda q, height: q), attn(h))


def _with_attention(net: UNet, fn) -> UNet:
    """A reference copy whose mid self-attention forward is replaced by a hand computation `fn(attn, h)`."""
    ref = copy.deepcopy(net)
    attn = ref.mid[1]
    attn.forward = lambda h: fn(attn, h)
    return ref


def test_attention_identity_is_x_plus_projected_values(net, inputs):
    x, t, y, keys, stream = inputs

    def identity(attn, h):  # qkv channels are (k, heads, dim): the last third is V
        c = h.shape[1]
        return h + attn.proj_out(attn.qkv(attn.norm(h))[:, 2 * c:])

    out = AttentionIdentity().attach(net)(x, t, y, keys, stream)
    torch.testing.assert_close(out, _with_attention(net, identity)(x, t, y), atol=1e-5, rtol=1e-5)
    assert (out - net(x, t, y)).abs().max() > 1e-3
    every = AttentionIdentity("all").attach(net)(x, t, y, keys, stream)
    assert (every - out).abs().max() > 1e-4  # "all" also hooks down.2.1, up.0.1, up.1.1


def _manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def test_attention_blur_tiny_sigma_is_the_clean_network(net, inputs):
    x, t, y, keys, stream = inputs
    out = AttentionBlur(1e-3, "all").attach(net)(x, t, y, keys, stream)
    torch.testing.assert_close(out, net(x, t, y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sigma", [9999.0, 1e7, math.inf])
def test_attention_blur_infinite_sigma_is_the_mean_query(net, inputs, sigma):
    x, t, y, keys, stream = inputs

    def mean_query(attn, h):
        b, c, height, width = h.shape
        n = attn.num_heads
        q, k, v = attn.qkv(attn.norm(h)).reshape(b, 3, n, c // n, height * width).transpose(-1, -2).unbind(1)
        q = q.mean(dim=2, keepdim=True).expand_as(q)  # every token asks with the mean query
        out = _manual_attention(q, k, v).transpose(-1, -2).reshape(b, c, height, width)
        return h + attn.proj_out(out)

    out = AttentionBlur(sigma).attach(net)(x, t, y, keys, stream)
    torch.testing.assert_close(out, _with_attention(net, mean_query)(x, t, y), atol=1e-5, rtol=1e-5)
    assert (out - net(x, t, y)).abs().max() > 1e-4


@pytest.mark.parametrize("sigma,size", [(0.5, 4), (1.0, 4), (3.0, 5), (0.7, 8)])
def test_query_blur_matches_the_seg_reference_kernel(sigma, size):
    """SEG-SDXL's blur: odd kernel ceil(6σ)+1 (clipped to the map), 2-D reflect padding, outer-product kernel."""
    q = torch.randn(2, 4, size * size, 3, dtype=torch.float64)
    k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    k = min(k, size - (size % 2 - 1))
    taps = torch.exp(-0.5 * (torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=torch.float64) / sigma) ** 2)
    taps = taps / taps.sum()
    img = q.permute(0, 1, 3, 2).reshape(2, 12, size, size)
    kernel = (taps[:, None] * taps[None, :]).expand(12, 1, k, k)
    ref = F.conv2d(F.pad(img, [k // 2] * 4, mode="reflect"), kernel, groups=12)
    ref = ref.reshape(2, 4, 3, size * size).permute(0, 1, 3, 2)
    torch.testing.assert_close(_blur_queries(q, size, sigma), ref)


def test_time_embedding_noise_vanishes_at_scale_zero_and_at_t_zero(net, inputs):
    x, t, y, keys, stream = inputs
    clean = net(x, t, y)
    assert torch.equal(TimeEmbeddingNoise(scale=0.0).attach(net)(x, t, y, keys, stream), clean)
    zero = torch.zeros_like(t)
    assert torch.equal(TimeEmbeddingNoise().attach(net)(x, zero, y, keys, stream), net(x, zero, y))  # τ^α = 0
    noisy = TimeEmbeddingNoise(alpha=0.0).attach(net)(x, zero, y, keys, stream)  # α = 0: the same noise at every t
    assert (noisy - net(x, zero, y)).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_keyed_dropout_drops_a_share_p_and_rescales(net, inputs):
    x, t, y, keys, stream = inputs
    pn = KeyedDropout(p=0.3).attach(net)
    seen = []
    for m in pn.net.modules():  # test-only hooks on the copy, after the perturbation's own
        if isinstance(m, torch.nn.Dropout):
            m.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    pn(x, t, y, keys, stream)
    h, out = torch.cat([a.flatten() for a, _ in seen]), torch.cat([o.flatten() for _, o in seen])
    kept = out != 0
    assert abs((~kept).float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(out[kept], h[kept] / 0.7)


def test_block_skip_of_every_block_is_the_skip_path(net, inputs):
    x, t, y, keys, stream = inputs
    ref = copy.deepcopy(net)
    for m in ref.modules():
        if isinstance(m, ResBlock):
            m.forward = lambda h, emb, m=m: m.skip(h)
    torch.testing.assert_close(BlockSkip(1.0).attach(net)(x, t, y, keys, stream), ref(x, t, y))


@pytest.mark.parametrize("pert", KEYED, ids=str)
def test_keyed_perturbations_depend_only_on_key_step_and_inputs(net, inputs, pert):
    x, t, y, keys, stream = inputs
    pn = pert.attach(net)
    full = pn(x, t, y, keys, stream)
    assert (full - net(x, t, y)).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # every sample is perturbed
    torch.testing.assert_close(pn(x, t, y, keys, stream), full, atol=0, rtol=0)  # deterministic
    split = torch.cat([pn(x[:2], t[:2], y[:2], keys[:2], stream), pn(x[2:], t[2:], y[2:], keys[2:], stream)])
    # Batch size and position change nothing but float rounding (the clean UNet's own is ~4e-6 here; a different
    # mask or noise row would differ by > 1e-3).
    torch.testing.assert_close(split, full, atol=1e-5, rtol=1e-5)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(pn(x[perm], t[perm], y[perm], keys[perm], stream), full[perm], atol=1e-5, rtol=1e-5)
    # A new step (or key) draws anew: most samples change (BlockSkip may redraw the same block for a few).
    for other in (pn(x, t, y, keys, stream + 1), pn(x, t, y, keys + 1, stream)):
        assert ((other - full).abs().amax(dim=(1, 2, 3)) > 1e-4).sum() >= B // 2


@pytest.mark.parametrize("pert", ONE_PER_KIND, ids=str)
def test_perturbed_forward_compiles_to_one_graph(net, inputs, pert):
    x, t, y, keys, stream = inputs
    torch._dynamo.reset()
    pn = pert.attach(net)
    backend = CountingBackend()

    @torch.compile(backend=backend, dynamic=False)
    def step(x, t, y, keys, stream):  # network + guidance in one function, as the samplers compile it
        clean = net(x, t, y)
        return clean + 2.0 * (clean - pn(x, t, y, keys, stream))

    with torch.no_grad():
        for i in range(3):  # new keys and steps: the same graph (no recompile on the hooks' state)
            eager = net(x, t, y) + 2.0 * (net(x, t, y) - pn(x, t, y, keys + i, stream + i))
            torch.testing.assert_close(step(x, t, y, keys + i, stream + i), eager, atol=1e-5, rtol=1e-5)
    assert backend.graphs == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("pert,option", [
    (KeyedDropout(0.0), "p"), (KeyedDropout(1.0), "p"), (KeyedDropout(-0.1), "p"),
    (AttentionBlur(0.0), "sigma"), (AttentionBlur(-1.0), "sigma"), (AttentionBlur(math.nan), "sigma"),
    (AttentionBlur(1.0, ()), "layers"), (AttentionIdentity(()), "layers"),
    (TimeEmbeddingNoise(scale=-1.0), "scale"), (TimeEmbeddingNoise(scale=math.inf), "scale"),
    (TimeEmbeddingNoise(alpha=-0.5), "alpha"), (TimeEmbeddingNoise(timesteps=1), "timesteps"),
    (BlockSkip(0.0), "fraction"), (BlockSkip(1.5), "fraction"),
], ids=str)
def test_bad_settings_name_the_option(net, pert, option):
    with pytest.raises(OptionError) as err:
        pert.check(prefix="guidance.perturbation.")
    assert err.value.option == f"guidance.perturbation.{option}"
    with pytest.raises(OptionError, match=f"`{option}`"):
        pert.attach(net)


@pytest.mark.parametrize("cls", [AttentionIdentity, AttentionBlur])
def test_unknown_layer_lists_the_self_attention_modules(net, cls):
    with pytest.raises(OptionError, match="down.2.1.*mid.1.*up.0.1") as err:
        cls(layers=("mid", "middle")).attach(net)
    assert err.value.option == "layers" and "'middle'" in str(err.value)
    with pytest.raises(OptionError):
        cls(layers="down.2.1.0").attach(net)  # prefixes end at a dot: no partial names
    cls(layers="down.2.1").attach(net)  # a full name is its own prefix


@pytest.mark.parametrize("pert", ALL_KINDS + [AttentionIdentity(["mid", "up.0"])], ids=str)
def test_settings_are_hashable_and_json_round_trip(pert):
    settings = json.loads(json.dumps(asdict(pert)))
    again = PERTURBATIONS[pert.kind](**settings)
    assert again == pert and hash(again) == hash(pert)
