"""Class-conditional UNet (DDPM / ADM layout) for epsilon prediction with CFG label dropout.

Conditioning paths:
  * time embedding + class embedding (summed) drive every ResBlock through AdaGN;
  * optionally, SpatialCrossAttention to `label_tokens` learned tokens per class.
Row `num_classes` of each class table is the null label (the unconditional branch of CFG).
Optionally (`beta_conditioning`, off by default) a GFT guidance strength β enters beside the timestep.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from .layers import (
    Downsample,
    ResBlock,
    SelfAttention,
    SpatialCrossAttention,
    Upsample,
    group_norm,
    timestep_embedding,
    zero_module,
)

__all__ = ["CondSequential", "UNet"]


class CondSequential(nn.ModuleList):
    """A sequence of layers, each fed the conditioning it needs.

    The dispatch is on layer types fixed at construction, so torch.compile sees static control flow.
    """

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialCrossAttention):
                h = layer(h, context)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    """Epsilon-prediction UNet conditioned on timestep and class label (null label = num_classes).

    Feature-map sizes ("resolutions") are image_size // 2**level; attention is placed where that
    size is in `attention_resolutions` (self-attention) or `cross_attention_resolutions` (cross-
    attention to label tokens). As in ADM, sizes that never occur are ignored.
    """

    @classmethod
    def from_hparams(cls, hp: Mapping) -> UNet:
        """The UNet that a ConditionalDiffusion with these hyperparameters (a checkpoint's) builds."""
        return cls(hp["image_size"], hp["channels"], hp["num_classes"], base_channels=hp["base_channels"],
                   channel_mult=tuple(hp["channel_mult"]), num_res_blocks=hp["num_res_blocks"],
                   attention_resolutions=tuple(hp["attention_resolutions"]),
                   cross_attention_resolutions=tuple(hp["cross_attention_resolutions"]), dropout=hp["dropout"],
                   num_heads=hp["num_heads"], norm=hp["norm"],
                   # Only guidance-free training feeds β; checkpoints from before the option build the same net.
                   beta_conditioning=hp.get("guidance_training", "none") == "gft")

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        num_classes: int,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        cross_attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        num_heads: int = 4,
        norm: str = "adagn",
        num_groups: int = 32,
        label_tokens: int = 4,
        beta_conditioning: bool = False,
    ) -> None:
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size={image_size} must be divisible by 2**(len(channel_mult)-1)")
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.null_label = num_classes
        self.label_tokens = label_tokens
        emb_dim = 4 * base_channels
        self.emb_dim = emb_dim
        attn_res, xattn_res = set(attention_resolutions), set(cross_attention_resolutions)

        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim)
        # GFT (Chen et al. 2025; thu-ml/GFT DiT/models.py, beta_in="linear"): the sinusoidal features of 1000·β go
        # through a bias-free linear map onto the timestep's sinusoidal features, before the time MLP. Zero-initialised
        # so a label-dropout checkpoint fine-tuned with it starts as exactly that model. Absent when off: the state
        # dict, and every output, are those of a network without the option.
        self.beta_embed = nn.Linear(base_channels, base_channels, bias=False) if beta_conditioning else None
        if self.beta_embed is not None:
            nn.init.zeros_(self.beta_embed.weight)
        # The token table exists only when used: unused parameters break DDP's gradient reduction.
        self.use_cross_attention = bool(xattn_res & {image_size // 2**i for i in range(levels)})
        self.context_embed = (
            nn.Embedding(num_classes + 1, label_tokens * emb_dim) if self.use_cross_attention else None
        )

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout=dropout, norm=norm, num_groups=num_groups)

        def attn(layers: list[nn.Module], ch: int, size: int) -> list[nn.Module]:
            if size in attn_res:
                layers.append(SelfAttention(ch, num_heads, num_groups))
            if size in xattn_res:
                layers.append(SpatialCrossAttention(ch, emb_dim, num_heads, num_groups))
            return layers

        ch = base_channels * channel_mult[0]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        skip_chs, size = [ch], image_size
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(
                    CondSequential(attn([res(ch, base_channels * mult)], base_channels * mult, size))
                )
                ch = base_channels * mult
                skip_chs.append(ch)
            if level < levels - 1:
                self.down.append(CondSequential([Downsample(ch)]))
                skip_chs.append(ch)
                size //= 2

        # The middle block always has self-attention (DDPM/ADM); cross-attention if asked at this size.
        mid = [res(ch, ch), SelfAttention(ch, num_heads, num_groups)]
        if size in xattn_res:
            mid.append(SpatialCrossAttention(ch, emb_dim, num_heads, num_groups))
        self.mid = CondSequential([*mid, res(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = attn([res(ch + skip_chs.pop(), base_channels * mult)], base_channels * mult, size)
                ch = base_channels * mult
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    size *= 2
                self.up.append(CondSequential(layers))
        assert not skip_chs, "every encoder activation must be consumed by the decoder"

        # zero-initialised output: the untrained model predicts eps = 0 (ADM), a stable start
        self.out = nn.Sequential(
            group_norm(ch, num_groups), nn.SiLU(), zero_module(nn.Conv2d(ch, in_channels, 3, padding=1))
        )

    def embed(self, t: Tensor, y: Tensor, beta: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(B,) timesteps and labels (and GFT's β) -> AdaGN embedding (B, emb_dim), context tokens (B, L, emb_dim)."""
        freqs = timestep_embedding(t, self.time_embed[0].in_features)
        if self.beta_embed is not None:
            beta = torch.ones_like(t, dtype=torch.float32) if beta is None else beta.float().expand(t.shape[0])
            freqs = freqs + self.beta_embed(timestep_embedding(1000 * beta, self.beta_embed.in_features))
        elif beta is not None:  # a β the network cannot read would be silently ignored
            raise ValueError("beta given to a UNet built without beta_conditioning (not a GFT-trained network)")
        emb = self.time_embed(freqs) + self.class_embed(y)
        context = None
        if self.context_embed is not None:
            context = rearrange(self.context_embed(y), "b (l c) -> b l c", l=self.label_tokens)
        return emb, context

    def forward(self, x: Tensor, t: Tensor, y: Tensor, beta: Tensor | None = None) -> Tensor:
        """x (B, C, H, W); t (B,) or scalar timesteps in [0, T); y (B,) long in [0, num_classes]; beta (B,) or
        scalar GFT strength in [0, 1] (only with beta_conditioning; default 1 = the plain conditional model)."""
        if t.ndim == 0:  # shape-only branch (static under torch.compile): a sampler's shared step
            t = t.expand(x.shape[0])
        emb, context = self.embed(t, y, beta)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb, context)
            hs.append(h)
        h = self.mid(h, emb, context)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)
