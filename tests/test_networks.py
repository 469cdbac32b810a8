"""Tests for lightning_modules.networks: UNet, EncoderClassifier and their layers (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange
from torch import nn

from lightning_modules.networks import EncoderClassifier, UNet
from lightning_modules.networks.layers import (
    ResBlock,
    SelfAttention,
    SpatialCrossAttention,
    group_norm,
    timestep_embedding,
)


def digits_unet(**kw) -> UNet:
    cfg = dict(
        base_channels=32, channel_mult=(1, 2), attention_resolutions=(4,), cross_attention_resolutions=(8, 4)
    )
    return UNet(8, 1, 10, **{**cfg, **kw})


def cifar_unet(**kw) -> UNet:
    cfg = dict(
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(16,),
        cross_attention_resolutions=(32, 16),
        num_groups=8,
    )
    return UNet(32, 3, 10, **{**cfg, **kw})


def randomize(module: nn.Module, std: float = 0.1, seed: int = 0) -> nn.Module:
    """Zero-initialised output layers make fresh nets trivial; random weights expose every path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def inputs(b: int, c: int, s: int, num_classes: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, s, s, generator=gen)
    t = torch.randint(0, 1000, (b,), generator=gen)
    y = torch.randint(0, num_classes, (b,), generator=gen)
    return x, t, y


# ----------------------------------------------------------------------------------------- layers


def test_timestep_embedding_shapes_and_float_t():
    t = torch.tensor([0, 1, 999])
    e = timestep_embedding(t, 32)
    assert e.shape == (3, 32) and e.dtype == torch.float32
    assert torch.allclose(e, timestep_embedding(t.float(), 32))
    assert timestep_embedding(t, 33).shape == (3, 33)
    assert not torch.allclose(e[1], e[2])
    assert torch.allclose(e[0, :16], torch.ones(16))  # cos(0) = 1 on the first half


def test_group_norm_fallback_divides_channels():
    for ch in (1, 3, 24, 48, 96, 100):
        gn = group_norm(ch, 32)
        assert ch % gn.num_groups == 0 and gn.num_groups <= 32


def test_fresh_resblock_is_identity_on_residual_path():
    block = ResBlock(8, 8, 12)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(block(x, torch.randn(2, 12)), x)


def _hooked_resblock(norm: str):
    block = randomize(ResBlock(8, 16, 12, norm=norm, num_groups=4), std=0.3)
    cap: dict[str, torch.Tensor] = {}
    block.norm_out.register_forward_pre_hook(lambda m, a: cap.__setitem__("norm_in", a[0]))
    block.norm_out.register_forward_hook(lambda m, a, o: cap.__setitem__("gn", o))
    block.emb_proj.register_forward_hook(lambda m, a, o: cap.__setitem__("proj", o))
    block.out_layers.register_forward_pre_hook(lambda m, a: cap.__setitem__("post", a[0]))
    return block, cap


def test_adagn_uses_scale_and_shift():
    block, cap = _hooked_resblock("adagn")
    x, emb = torch.randn(3, 8, 4, 4), torch.randn(3, 12)
    out = block(x, emb)
    scale, shift = rearrange(cap["proj"], "b (k c) -> k b c 1 1", k=2)
    assert cap["proj"].shape == (3, 32)
    assert torch.allclose(cap["post"], cap["gn"] * (1 + scale) + shift, atol=1e-6)
    assert torch.allclose(cap["norm_in"], block.in_layers(x), atol=1e-6)  # GN sees h, not h + emb

    lin = block.emb_proj[1]
    for half in (slice(0, 16), slice(16, 32)):  # scale half, then shift half
        with torch.no_grad():
            saved = lin.bias.clone()
            lin.bias[half] += 0.5
            changed = block(x, emb)
            lin.bias.copy_(saved)
        assert not torch.allclose(changed, out, atol=1e-4)
    assert torch.allclose(block(x, emb), out)


def test_additive_norm_runs_and_differs():
    adagn, _ = _hooked_resblock("adagn")
    additive, cap = _hooked_resblock("additive")
    x, emb = torch.randn(3, 8, 4, 4), torch.randn(3, 12)
    out = additive(x, emb)
    assert out.shape == (3, 16, 4, 4) and additive.emb_proj[1].out_features == 16
    expected_in = additive.in_layers(x) + rearrange(cap["proj"], "b c -> b c 1 1")
    assert torch.allclose(cap["norm_in"], expected_in, atol=1e-6)
    assert not torch.allclose(out, adagn(x, emb), atol=1e-4)
    with pytest.raises(ValueError):
        ResBlock(8, 8, 12, norm="batch")


def test_self_attention_shape_and_zero_init():
    attn = SelfAttention(16, num_heads=4, num_groups=4)
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(attn(x), x)  # zero-initialised output projection
    randomize(attn)
    assert attn(x).shape == x.shape and not torch.allclose(attn(x), x)
    with pytest.raises(ValueError):
        SelfAttention(10, num_heads=4)


def test_cross_attention_depends_on_context():
    xattn = randomize(SpatialCrossAttention(16, 24, num_heads=4, num_groups=4))
    x, ctx = torch.randn(2, 16, 4, 4), torch.randn(2, 3, 24)
    out = xattn(x, ctx)
    assert out.shape == x.shape
    assert not torch.allclose(out, xattn(x, ctx + torch.randn_like(ctx)), atol=1e-4)
    assert xattn(x, ctx[:, 0]).shape == x.shape  # (B, context_dim) = one token


def test_cross_attention_matches_explicit_softmax():
    ch, cdim = 4, 3
    xattn = randomize(SpatialCrossAttention(ch, cdim, num_heads=1, num_groups=2), std=0.5)
    x, ctx = torch.randn(1, ch, 2, 3), torch.randn(1, 5, cdim)
    tokens = xattn.norm(x).flatten(2).transpose(1, 2)[0]  # (HW, ch): image features are the queries
    q = tokens @ xattn.to_q.weight.T
    kv = ctx[0] @ xattn.to_kv.weight.T  # keys and values come from the context
    k, v = kv[:, :ch], kv[:, ch:]
    weights = torch.softmax(q @ k.T / math.sqrt(ch), dim=-1)
    out = xattn.proj_out(weights @ v)  # (HW, ch)
    ref = x + out.T.reshape(1, ch, 2, 3)
    assert torch.allclose(xattn(x, ctx), ref, atol=1e-5)


# ------------------------------------------------------------------------------------------- UNet


@pytest.mark.parametrize("make,c,s", [(digits_unet, 1, 8), (cifar_unet, 3, 32)])
def test_unet_shapes_channels_last_bf16(make, c, s):
    model = randomize(make(), std=0.05).eval()
    assert model.null_label == 10 and model.class_embed.num_embeddings == 11
    assert model.context_embed is not None and model.context_embed.num_embeddings == 11
    x, t, y = inputs(2, c, s)
    with torch.no_grad():
        out = model(x, t, y)
        assert out.shape == x.shape
        out_cl = model(x.to(memory_format=torch.channels_last), t, y)
        assert torch.allclose(out_cl, out, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf = model(x, t.float(), y)
    assert out_bf.shape == x.shape and torch.isfinite(out_bf).all()
    assert torch.allclose(out_bf.float(), out, atol=0.05 * out.abs().max().item() + 1e-3)


def test_fresh_unet_predicts_zero_and_has_no_unused_context_table():
    model = UNet(8, 1, 10, base_channels=32, channel_mult=(1, 2), attention_resolutions=(4,))
    assert model.context_embed is None  # no cross-attention -> no dead parameters for DDP
    x, t, y = inputs(2, 1, 8)
    assert torch.equal(model(x, t, y), torch.zeros_like(x))


def test_unet_label_conditioning_and_null_label():
    model = randomize(digits_unet(), std=0.05).eval()
    x, t, _ = inputs(2, 1, 8)
    with torch.no_grad():
        out_a = model(x, t, torch.tensor([1, 1]))
        out_b = model(x, t, torch.tensor([2, 2]))
        out_null = model(x, t, torch.full((2,), model.null_label))
        out_scalar_t = model(x, t[0], torch.tensor([1, 1]))
    assert not torch.allclose(out_a, out_b, atol=1e-5)
    assert not torch.allclose(out_null, out_a, atol=1e-5) and not torch.allclose(out_null, out_b, atol=1e-5)
    assert torch.allclose(out_scalar_t[0], out_a[0])
    with pytest.raises(IndexError):
        model(x, t, torch.tensor([11, 0]))


def test_unet_label_conditioning_adagn_only():
    """Without cross-attention the label reaches the net through AdaGN alone, and must matter."""
    model = randomize(digits_unet(cross_attention_resolutions=()), std=0.05).eval()
    x, t, _ = inputs(2, 1, 8)
    with torch.no_grad():
        assert not torch.allclose(
            model(x, t, torch.tensor([3, 3])), model(x, t, torch.tensor([4, 4])), atol=1e-5
        )


def test_unet_batch_elements_are_independent():
    model = randomize(digits_unet(dropout=0.1), std=0.05).eval()
    x, t, y = inputs(5, 1, 8)
    with torch.no_grad():
        assert torch.allclose(model(x[:1], t[:1], y[:1]), model(x, t, y)[:1], atol=1e-5)


def test_unet_gradients_reach_label_tables():
    model = randomize(digits_unet(), std=0.05)
    x, t, y = inputs(4, 1, 8)
    y = torch.tensor([0, 1, 1, 2])
    (model(x, t, y) - x).pow(2).mean().backward()
    for table in (model.class_embed, model.context_embed):
        assert (table.weight.grad[y].abs().sum(dim=1) > 0).all()
        assert table.weight.grad[model.null_label].abs().sum() == 0  # label absent from this batch


def test_unet_rejects_bad_image_size():
    with pytest.raises(ValueError):
        UNet(10, 1, 10, channel_mult=(1, 2, 2))


def test_unet_traces_without_graph_breaks():
    torch._dynamo.reset()
    # smallest net that still has every layer type; "eager" backend: dynamo tracing only, no codegen
    model = randomize(digits_unet(base_channels=16, num_res_blocks=1, num_groups=4), std=0.05).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, t, y = inputs(2, 1, 8)
    with torch.no_grad():
        assert torch.allclose(compiled(x, t, y), model(x, t, y), atol=1e-6)


# ----------------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("pool", ["adaptive", "attention"])
def test_classifier_logits_and_input_gradient(pool):
    clf = EncoderClassifier(8, 1, 10, pool=pool).eval()  # fresh init: guidance must work at once
    assert clf.head.weight.abs().sum() > 0
    x, t, y = inputs(3, 1, 8)
    x.requires_grad_(True)
    logits = clf(x, t)
    assert logits.shape == (3, 10)
    (grad,) = torch.autograd.grad(torch.log_softmax(logits, -1)[torch.arange(3), y].sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0


def test_classifier_cifar_config_and_timestep_dependence():
    clf = randomize(
        EncoderClassifier(
            32,
            3,
            10,
            base_channels=16,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(16,),
            pool="attention",
            num_groups=8,
        ),
        std=0.05,
    )
    x, _, _ = inputs(2, 3, 32)
    with torch.no_grad():
        a, b = clf(x, torch.tensor([0, 0])), clf(x, torch.tensor([900, 900]))
    assert a.shape == (2, 10) and not torch.allclose(a, b, atol=1e-5)


def test_classifier_invalid_pool_and_no_batchnorm():
    with pytest.raises(ValueError):
        EncoderClassifier(8, 1, 10, pool="max")
    for m in (EncoderClassifier(8, 1, 10), digits_unet()):
        assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())


@pytest.mark.parametrize("pool", ["adaptive", "attention"])
def test_classifier_batch_elements_are_independent(pool):
    clf = randomize(EncoderClassifier(8, 1, 10, pool=pool, dropout=0.1), std=0.05).eval()
    x, t, _ = inputs(5, 1, 8)
    with torch.no_grad():
        assert torch.allclose(clf(x[:1], t[:1]), clf(x, t)[:1], atol=1e-5)
