"""Perturbed copies of a network: the "bad version of itself" that PAG, SEG, TSG and S²/in-situ autoguidance
extrapolate away from (ε̂ = ε_c + s·(ε_c − ε_pert)). `Perturbation.attach(net)` returns a `PerturbedNetwork`: a new
module tree sharing every parameter and buffer tensor of `net` (no weights copied), with the perturbation as forward
hooks on its own modules; `net` itself is never touched.

Randomness is keyed: a perturbed row depends only on (key, step, inputs), never on batch position or size. Streams
are `salt + (module index << 16) + (step & 0xFFFF)` with salts >= 2^24: disjoint from the sampler's (0..1000) and
from each other. Keys, step and t reach the hooks through a plain object (`_Step`) that the hooks close over and
`PerturbedNetwork.forward` fills before, and empties after, the inner call (arguments cannot reach them: the UNet
calls its sub-modules with fixed signatures). Dynamo inlines module hooks and traces attribute writes on a user
object as replayed side effects: one graph, no recompile per key or step (tested with torch 2.14; attributes on the
module itself trace too, but would put per-call tensors into the module's state).
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..diffusion.noise import keyed_normal
from ..diffusion.options import OptionError
from .layers import ResBlock, SelfAttention

__all__ = ["PERTURBATIONS", "AttentionBlur", "AttentionIdentity", "BlockSkip", "KeyedDropout", "PerturbedNetwork",
           "Perturbation", "TimeEmbeddingNoise"]

_STEP_BITS, _MODULE_SHIFT = 0xFFFF, 16  # a step keeps 16 bits: a module's streams never run into the next's
_SALT_TSG, _SALT_DROPOUT, _SALT_SKIP = 1 << 24, 2 << 24, 3 << 24  # far above the sampler's streams 0..1000
INFINITE_SIGMA = 9999.0  # SEG's "infinite blur" threshold (the reference: every query becomes the mean query)


class _Step:
    """One perturbed call's keys (B,), stream (0-d, step & 0xFFFF), t (B,) and per-call draws; empty between calls."""

    keys = stream = t = mask = None


class PerturbedNetwork(nn.Module):
    """The perturbed pass: `forward(x, t, y, keys, stream)` is the hooked copy's ε (or whatever `net` predicts)."""

    def __init__(self, net: nn.Module, perturbation: Perturbation, step: _Step,
                 prepare: Callable[[_Step], None] | None = None) -> None:
        super().__init__()
        self.net = net.eval()  # the hooked copy: same parameter tensors as the original
        self.perturbation, self._step, self._prepare = perturbation, step, prepare or (lambda s: None)

    def train(self, mode: bool = True) -> PerturbedNetwork:
        # The copy stays in eval mode: a train-mode nn.Dropout would add unkeyed noise to a keyed perturbation.
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: Tensor, t: Tensor, y: Tensor, keys: Tensor, stream: Tensor) -> Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t  # a sampler's shared step (shape-only: static when compiled)
        step = self._step
        step.keys, step.t = keys.to(torch.int64), t
        step.stream = torch.as_tensor(stream, dtype=torch.int64, device=keys.device) & _STEP_BITS
        self._prepare(step)  # per-call draws that several hooks share
        out = self.net(x, t, y)
        step.keys = step.stream = step.t = step.mask = None  # no tensor outlives the call, none goes stale
        return out


@dataclass(frozen=True)
class Perturbation:
    """Settings of one perturbation kind (frozen, hashable, `dataclasses.asdict` gives JSON-able settings)."""

    kind: ClassVar[str] = ""

    def check(self, prefix: str = "") -> None:
        """Raise OptionError for the first bad setting (names are `prefix` + field)."""

    def attach(self, net: nn.Module) -> PerturbedNetwork:
        """A perturbed network sharing `net`'s parameters; `net` itself is left untouched (no hooks)."""
        self.check()
        # deepcopy with every parameter and buffer pre-seeded in the memo: a new module tree (own hook dicts) whose
        # tensors are the original's, so optimiser steps or checkpoint loads on `net` are seen by the copy too.
        twin, step = copy.deepcopy(net, {id(p): p for p in itertools.chain(net.parameters(), net.buffers())}), _Step()
        return PerturbedNetwork(twin, self, step, self._install(twin, step))

    def _install(self, twin: nn.Module, step: _Step) -> Callable[[_Step], None] | None:
        raise NotImplementedError


def _require(ok: bool, option: str, problem: str, fix: str) -> None:
    if not ok:
        raise OptionError(option, problem, fix)


def _number(value: object, lo: float, hi: float = sys.float_info.max) -> bool:
    """A finite real number (not a bool, not NaN) in [lo, hi]."""
    return isinstance(value, int | float) and not isinstance(value, bool) and lo <= value <= hi


@dataclass(frozen=True)
class _AttentionPerturbation(Perturbation):
    """Shared by PAG and SEG: `layers`, module-name prefixes of the SelfAttention modules to perturb, or "all"."""

    def __post_init__(self) -> None:
        # A JSON list (or a lone name) becomes a tuple: the settings stay hashable, and "mid" is not ('m', 'i', 'd').
        object.__setattr__(self, "layers", (self.layers,) if isinstance(self.layers, str) else tuple(self.layers))

    def check(self, prefix: str = "") -> None:
        _require(bool(self.layers) and all(isinstance(s, str) and s for s in self.layers), f"{prefix}layers",
                 f"{list(self.layers)!r} is not a non-empty list of module-name prefixes",
                 "give e.g. ['mid'], ['down.2', 'up.0'] or ['all']")

    def _hook_attention(self, twin: nn.Module, query: Callable[[Tensor, int], Tensor] | None) -> None:
        found = {n: m for n, m in twin.named_modules() if isinstance(m, SelfAttention)}
        chosen = dict(found) if "all" in self.layers else {}
        for prefix in () if chosen else self.layers:
            hits = {n: m for n, m in found.items() if n == prefix or n.startswith(prefix + ".")}
            _require(bool(hits), "layers", f"{prefix!r} names no self-attention module",
                     f"use 'all' or prefixes of the self-attention modules {sorted(found)}")
            chosen.update(hits)
        # A forward hook's return value replaces the module's output; the discarded clean attention is dead code
        # that torch.compile eliminates (in eager it costs one extra attention in the chosen layers).
        for m in chosen.values():
            m.register_forward_hook(lambda mod, args, out: _attention(mod, args[0], query))


def _attention(m: SelfAttention, x: Tensor, query: Callable[[Tensor, int], Tensor] | None) -> Tensor:
    """layers.SelfAttention.forward (bit for bit, tested) with queries mapped by `query(q, height)`; None: PAG."""
    tokens = rearrange(m.norm(x), "b c x y -> b (x y) c")
    qkv = F.linear(tokens, m.qkv.weight.flatten(1), m.qkv.bias)
    q, k, v = rearrange(qkv, "b l (k n d) -> k b n l d", k=3, n=m.num_heads)
    # Identity attention map (PAG): softmax(QKᵀ) → I, so every token's output is its own value.
    out = v if query is None else F.scaled_dot_product_attention(query(q, x.shape[-2]), k, v)
    out = F.linear(rearrange(out, "b n l d -> b l (n d)"), m.proj_out.weight.flatten(1), m.proj_out.bias)
    return x + rearrange(out, "b (x y) c -> b c x y", x=x.shape[-2])


@dataclass(frozen=True)
class AttentionIdentity(_AttentionPerturbation):
    """PAG (Ahn et al., ECCV 2024): the chosen self-attention maps become the identity (out = x + proj_out(V))."""

    kind: ClassVar[str] = "pag"
    layers: tuple[str, ...] = ("mid",)

    def _install(self, twin: nn.Module, step: _Step) -> None:
        self._hook_attention(twin, None)


def _gaussian_taps(sigma: float, size: int) -> list[float]:
    """SEG-SDXL's 1-D kernel: odd size ≈ 6σ+1, clipped to the feature map (size, or size+1 if even), sampled at
    integer offsets and normalised to sum 1 (so it is a weighted mean, exact at the reflect-padded borders)."""
    k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    k = min(k, size - (size % 2 - 1))
    taps = [math.exp(-0.5 * ((i - (k - 1) / 2) / sigma) ** 2) for i in range(k)]
    return [w / sum(taps) for w in taps]


def _blur_queries(q: Tensor, height: int, sigma: float) -> Tensor:
    """SEG: Gaussian blur of the queries over the 2-D positions (each head channel separately)."""
    if sigma >= INFINITE_SIGMA:  # σ → ∞: the blur's limit is the plain spatial mean query, the same at every token
        return q.mean(dim=2, keepdim=True).expand_as(q)
    img = rearrange(q, "b n (x y) d -> b (n d) x y", x=height)
    ch = img.shape[1]
    # Separable: a reflect pad and 1-D conv per axis equals the reference's 2-D pad + outer-product kernel.
    for rows in (True, False):
        taps = _gaussian_taps(sigma, img.shape[2 if rows else 3])
        k, p = len(taps), len(taps) // 2
        if k > 1:
            w = torch.tensor(taps, dtype=img.dtype, device=img.device).view((k, 1) if rows else (1, k))
            img = F.pad(img, (0, 0, p, p) if rows else (p, p, 0, 0), mode="reflect")
            img = F.conv2d(img, w.expand(ch, 1, *w.shape), groups=ch)
    return rearrange(img, "b (n d) x y -> b n (x y) d", n=q.shape[1])


@dataclass(frozen=True)
class AttentionBlur(_AttentionPerturbation):
    """SEG (Hong, NeurIPS 2024): queries blurred with a Gaussian of std σ (feature-map pixels) before attention;
    σ >= 9999 is the infinite blur (every query replaced by the mean query)."""

    kind: ClassVar[str] = "seg"
    sigma: float = INFINITE_SIGMA
    layers: tuple[str, ...] = ("mid",)

    def check(self, prefix: str = "") -> None:
        _require(_number(self.sigma, 0, math.inf) and self.sigma > 0, f"{prefix}sigma", f"σ = {self.sigma!r} <= 0",
                 f"use a blur std > 0 in feature-map pixels, or >= {INFINITE_SIGMA} for the mean query")
        super().check(prefix)

    def _install(self, twin: nn.Module, step: _Step) -> None:
        sigma = float(self.sigma)
        self._hook_attention(twin, lambda q, height: _blur_queries(q, height, sigma))


@dataclass(frozen=True)
class TimeEmbeddingNoise(Perturbation):
    """TSG (Sadat et al., ICLR 2025): t̃_emb = t_emb + s·τ^α·std(t_emb)·n, n ~ N(0, I) keyed per (sample, step).

    t_emb is the output of `time_embed` (the MLP on the sinusoidal features, to which the class embedding is added),
    τ = t/(T−1) in [0, 1]; std over each sample's embedding dims makes `scale` relative to the embedding's spread.
    """

    kind: ClassVar[str] = "tsg"
    scale: float = 2.0
    alpha: float = 1.0
    timesteps: int = 1000  # T of the model's schedule: τ = t / (T - 1)

    def check(self, prefix: str = "") -> None:
        _require(_number(self.scale, 0), f"{prefix}scale", f"s = {self.scale!r} is not a finite number >= 0",
                 "use 0 (no perturbation) or a positive noise scale, e.g. 2")
        _require(_number(self.alpha, 0), f"{prefix}alpha", f"α = {self.alpha!r} is not a finite number >= 0",
                 "use a power >= 0 (0: the same noise at every t; 1: linear in t)")
        _require(isinstance(self.timesteps, int) and self.timesteps >= 2, f"{prefix}timesteps",
                 f"T = {self.timesteps!r} is not an integer >= 2", "give the model's training timesteps, e.g. 1000")

    def _install(self, twin: nn.Module, step: _Step) -> None:
        time_embed = getattr(twin, "time_embed", None)
        _require(isinstance(time_embed, nn.Module), "perturbation", f"{type(twin).__name__} has no `time_embed`",
                 "TSG needs a network whose time-embedding module is named time_embed (the UNet)")
        scale, alpha, top = float(self.scale), float(self.alpha), float(self.timesteps - 1)

        def hook(mod: nn.Module, args: tuple[Tensor, ...], emb: Tensor) -> Tensor:
            tau = (step.t.float() / top).clamp(0.0, 1.0)
            amp = scale * tau.pow(alpha).view(-1, 1) * emb.float().std(dim=1, keepdim=True)
            noise = keyed_normal(step.keys, step.stream + _SALT_TSG, (emb.shape[1],))
            return (emb.float() + amp * noise).to(emb.dtype)
        time_embed.register_forward_hook(hook)


def _resblocks(twin: nn.Module) -> list[ResBlock]:
    blocks = [m for m in twin.modules() if isinstance(m, ResBlock)]
    _require(bool(blocks), "perturbation", f"{type(twin).__name__} has no ResBlock", "use the UNet (ResBlocks)")
    return blocks


@dataclass(frozen=True)
class KeyedDropout(Perturbation):
    """In-situ autoguidance / S²-guidance: dropout of rate p on every ResBlock's hidden activation (the input of
    its last conv), with masks keyed per (sample, step, block) and the kept units scaled by 1/(1−p)."""

    kind: ClassVar[str] = "dropout"
    p: float = 0.1

    def check(self, prefix: str = "") -> None:
        _require(_number(self.p, 0, 1) and 0 < self.p < 1, f"{prefix}p", f"dropout rate {self.p!r} is outside (0, 1)",
                 "use a rate strictly between 0 and 1, e.g. 0.1")

    def _install(self, twin: nn.Module, step: _Step) -> None:
        # keyed_normal gives Gaussian noise: a unit is kept where z >= Φ⁻¹(p), i.e. with probability 1 − p.
        cut, gain = NormalDist().inv_cdf(float(self.p)), 1.0 / (1.0 - float(self.p))
        for i, block in enumerate(_resblocks(twin)):
            drop = block.out_layers[1]
            _require(isinstance(drop, nn.Dropout), "perturbation", "ResBlock.out_layers[1] is no nn.Dropout",
                     "keep ResBlock.out_layers = [SiLU, Dropout, Conv2d]")
            salt = _SALT_DROPOUT + (i << _MODULE_SHIFT)

            def hook(mod: nn.Module, args: tuple[Tensor, ...], h: Tensor, salt: int = salt) -> Tensor:
                keep = keyed_normal(step.keys, step.stream + salt, tuple(h.shape[1:])) >= cut
                return h * (keep.to(h.dtype) * gain)
            drop.register_forward_hook(hook)


@dataclass(frozen=True)
class BlockSkip(Perturbation):
    """S²-guidance: per sample and step, a keyed random subset of max(1, round(fraction·N)) of the N ResBlocks
    output only their skip connection (the residual branch dropped)."""

    kind: ClassVar[str] = "block_skip"
    fraction: float = 0.1

    def check(self, prefix: str = "") -> None:
        _require(_number(self.fraction, 0, 1) and self.fraction > 0, f"{prefix}fraction",
                 f"{self.fraction!r} is outside (0, 1]", "use the share of ResBlocks to skip, e.g. 0.1")

    def _install(self, twin: nn.Module, step: _Step) -> Callable[[_Step], None]:
        blocks = _resblocks(twin)
        # A fixed count, not a Bernoulli draw per block: with few blocks (8 in the digits UNet) independent draws
        # would leave many samples unperturbed (ε_pert = ε_c, no guidance at all) at some steps.
        count = max(1, round(float(self.fraction) * len(blocks)))

        def prepare(s: _Step) -> None:
            z = keyed_normal(s.keys, s.stream + _SALT_SKIP, (len(blocks),))
            s.mask = z.argsort(dim=1).argsort(dim=1) < count  # (B, N): the `count` lowest draws are skipped

        for i, block in enumerate(blocks):
            def hook(mod: ResBlock, args: tuple[Tensor, ...], out: Tensor, i: int = i) -> Tensor:
                return torch.where(step.mask[:, i].view(-1, 1, 1, 1), mod.skip(args[0]), out)
            block.register_forward_hook(hook)
        return prepare


PERTURBATIONS: dict[str, type[Perturbation]] = {
    cls.kind: cls for cls in (AttentionIdentity, AttentionBlur, TimeEmbeddingNoise, KeyedDropout, BlockSkip)
}
