"""Building blocks shared by the diffusion UNet and the noise-aware classifier.

Only GroupNorm is used for normalisation: BatchNorm would let batch elements interact, which makes
the per-sample classifier gradient used for guidance wrong and couples the two halves of a batched
CFG forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = [
    "Downsample",
    "ResBlock",
    "SelfAttention",
    "SpatialCrossAttention",
    "Upsample",
    "group_norm",
    "timestep_embedding",
    "zero_module",
]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) of integer or fractional timesteps.

    Computed in float32 whatever the autocast state: bf16 cannot resolve neighbouring timesteps
    near t = 1000 (8 bits of mantissa), so t = 999 and t = 996 would embed identically.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:  # odd dim: pad so the caller always gets exactly `dim` features
        emb = F.pad(emb, (0, 1))
    return emb


def _num_groups(channels: int, num_groups: int) -> int:
    """Largest group count <= num_groups that divides channels (GroupNorm requires divisibility)."""
    g = min(num_groups, channels)
    while channels % g:
        g -= 1
    return g


def group_norm(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with a group count that is valid for any channel count (e.g. 8-px digits nets)."""
    return nn.GroupNorm(_num_groups(channels, num_groups), channels, eps=1e-6)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: residual branches then start as the identity (ADM/DDPM init)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block conditioned on an embedding through AdaGN (or additive bias, for ablation).

    norm="adagn":    h = GN(h) * (1 + scale) + shift,  (scale, shift) = Linear(SiLU(emb)).chunk(2)
    norm="additive": h = GN(h + Linear(SiLU(emb)))      (the DDPM way)
    The sub-modules are named so that tests (and curious users) can hook GN(h) (`norm_out`), the
    projection (`emb_proj`) and the post-norm activation (input of `out_layers`).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        dropout: float = 0.0,
        norm: str = "adagn",
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        if norm not in ("adagn", "additive"):
            raise ValueError(f"norm must be 'adagn' or 'additive', got {norm!r}")
        self.norm = norm
        self.in_layers = nn.Sequential(
            group_norm(in_ch, num_groups), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        )
        self.emb_proj = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch if norm == "adagn" else out_ch)
        )
        self.norm_out = group_norm(out_ch, num_groups)
        # zero-initialised last conv: a fresh block is exactly its skip connection
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        )
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        e = rearrange(self.emb_proj(emb), "b c -> b c 1 1")
        if self.norm == "adagn":  # constructor-time constant: no data-dependent control flow
            scale, shift = e.chunk(2, dim=1)
            h = self.norm_out(h) * (1 + scale) + shift
        else:
            h = self.norm_out(h + e)
        return self.skip(x) + self.out_layers(h)


def _check_heads(ch: int, num_heads: int) -> None:
    if num_heads < 1 or ch % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the channel count {ch}")


class SelfAttention(nn.Module):
    """Multi-head self-attention over the spatial positions of a feature map, residual."""

    def __init__(self, ch: int, num_heads: int = 4, num_groups: int = 32) -> None:
        super().__init__()
        _check_heads(ch, num_heads)
        self.num_heads = num_heads
        self.norm = group_norm(ch, num_groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = zero_module(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        # Tokens-last layout, so q, k, v have a unit-stride head dim: the flash / memory-efficient SDPA
        # kernels need it and otherwise fall back to the math kernel (seen on CPU: bmm + softmax). The
        # 1x1-conv weights are applied as a matmul on that layout: same parameters, same checkpoints.
        tokens = rearrange(self.norm(x), "b c x y -> b (x y) c")
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)
        q, k, v = rearrange(qkv, "b l (k n d) -> k b n l d", k=3, n=self.num_heads)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b n l d -> b l (n d)")
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + rearrange(out, "b (x y) c -> b c x y", x=x.shape[-2])


class SpatialCrossAttention(nn.Module):
    """Cross-attention from image positions (queries) to context tokens (keys and values), residual.

    As in the seed notes (and Stable Diffusion): every pixel asks which label/text token is relevant
    and takes a softmax-weighted sum of their values. Unlike the seed sketch, the image features are
    group-normalised first and the output projection is zero-initialised (a fresh layer is the
    identity), and the heads share the image channel width instead of a fixed dim_head.
    """

    def __init__(self, ch: int, context_dim: int, num_heads: int = 4, num_groups: int = 32) -> None:
        super().__init__()
        _check_heads(ch, num_heads)
        self.num_heads = num_heads
        self.norm = group_norm(ch, num_groups)
        self.to_q = nn.Linear(ch, ch, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * ch, bias=False)
        self.proj_out = zero_module(nn.Linear(ch, ch))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x: (B, ch, H, W) image features; context: (B, L, context_dim) or (B, context_dim) tokens."""
        if context.ndim == 2:  # a single pooled embedding is a one-token context
            context = rearrange(context, "b c -> b 1 c")
        q = rearrange(
            self.to_q(rearrange(self.norm(x), "b c x y -> b (x y) c")),
            "b l (n d) -> b n l d",
            n=self.num_heads,
        )
        k, v = rearrange(self.to_kv(context), "b l (k n d) -> k b n l d", k=2, n=self.num_heads)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b n l d -> b l (n d)")
        return x + rearrange(self.proj_out(out), "b (x y) c -> b c x y", x=x.shape[-2])


class Downsample(nn.Module):
    """Halve the resolution with a learned stride-2 3x3 convolution."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2 then a 3x3 conv (no checkerboard artefacts)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
