"""Noise-aware classifier p(y | x_t, t) for classifier guidance: the "half UNet" of Dhariwal & Nichol.

GroupNorm only (no BatchNorm): the guidance gradient of sample i must depend on sample i alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .layers import Downsample, ResBlock, SelfAttention, group_norm, timestep_embedding
from .unet import CondSequential

__all__ = ["AttentionPool", "EncoderClassifier"]


class AttentionPool(nn.Module):
    """Pool a feature map to one vector: the mean token (plus position) attends over all positions.

    Like CLIP's / ADM's AttentionPool2d: a learned positional embedding lets the pool weigh where
    features are, which plain averaging cannot.
    """

    def __init__(self, ch: int, num_positions: int, num_heads: int = 4) -> None:
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the channel count {ch}")
        self.num_heads = num_heads
        self.pos = nn.Parameter(torch.randn(num_positions + 1, ch) * ch**-0.5)
        self.to_q = nn.Linear(ch, ch)
        self.to_kv = nn.Linear(ch, 2 * ch)
        self.proj = nn.Linear(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        tokens = rearrange(x, "b c x y -> b (x y) c")
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.pos.to(tokens.dtype)
        q = rearrange(self.to_q(tokens[:, :1]), "b l (n d) -> b n l d", n=self.num_heads)
        k, v = rearrange(self.to_kv(tokens), "b l (k n d) -> k b n l d", k=2, n=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b n 1 d -> b (n d)"))


class EncoderClassifier(nn.Module):
    """Downsampling UNet encoder + middle block + pooling head, conditioned on the timestep.

    forward(x_t, t) -> logits (B, num_classes). `t` must be the diffusion model's original training
    timestep (0..T-1), even when the sampler uses respaced steps.
    """

    @classmethod
    def from_hparams(cls, hp: Mapping) -> EncoderClassifier:
        """The classifier that a NoisyClassifier with these hyperparameters (a checkpoint's) builds."""
        return cls(hp["image_size"], hp["channels"], hp["num_classes"], base_channels=hp["base_channels"],
                   channel_mult=tuple(hp["channel_mult"]), num_res_blocks=hp["num_res_blocks"],
                   attention_resolutions=tuple(hp["attention_resolutions"]), dropout=hp["dropout"],
                   num_heads=hp["num_heads"], pool=hp["pool"])

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        num_classes: int,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        num_heads: int = 4,
        pool: str = "adaptive",
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        if pool not in ("adaptive", "attention"):
            raise ValueError(f"pool must be 'adaptive' or 'attention', got {pool!r}")
        levels = len(channel_mult)
        if levels < 1 or image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size={image_size} must be divisible by 2**(len(channel_mult)-1)")
        self.num_classes, self.pool = num_classes, pool
        emb_dim = 4 * base_channels
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout=dropout, num_groups=num_groups)

        ch, size = base_channels * channel_mult[0], image_size
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        blocks: list[nn.Module] = []
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks.append(res(ch, base_channels * mult))
                ch = base_channels * mult
                if size in attention_resolutions:
                    blocks.append(SelfAttention(ch, num_heads, num_groups))
            if level < levels - 1:
                blocks.append(Downsample(ch))
                size //= 2
        # middle block as in ADM's classifier: ResBlock, self-attention, ResBlock
        blocks += [res(ch, ch), SelfAttention(ch, num_heads, num_groups), res(ch, ch)]
        self.trunk = CondSequential(blocks)

        self.out_norm = nn.Sequential(group_norm(ch, num_groups), nn.SiLU())
        self.attn_pool = AttentionPool(ch, size * size, num_heads) if pool == "attention" else None
        # default (non-zero) init on purpose: a zero head has zero input gradient, i.e. no guidance
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """x (B, C, H, W) noisy images; t (B,) or scalar timesteps in [0, T) -> logits (B, classes)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.time_embed[0].in_features))
        h = self.out_norm(self.trunk(self.conv_in(x), emb))
        pooled = h.mean(dim=(2, 3)) if self.attn_pool is None else self.attn_pool(h)
        return self.head(pooled)
