"""Counter-based Gaussian noise: the noise of sample i is a pure function of (seed, i, stream).

Guided-sampling studies compare cells (method, scale) on *paired* noise. Drawing from a shared
generator ties a sample's noise to its batch position, batch size and DDP rank; hashing the
sample's key instead gives every sample the same starting noise in every cell, on every rank and
device, with one vectorised op and no Python loop over samples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: Tensor, c: int) -> Tensor:
    # (x·c) mod 2^32 with every intermediate below 2^50, so int64 never overflows.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    # A 32-bit avalanche hash (Wellons' "lowbias32"); inputs and outputs are int64 in [0, 2^32).
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_keys(seed: int, indices: Tensor) -> Tensor:
    """One 32-bit key per sample from a run seed and global sample indices (int64)."""
    seed_key = _mix32(torch.tensor(seed & _M32, dtype=torch.int64) + _GOLDEN)
    return _mix32(indices.to(torch.int64) ^ seed_key.to(indices.device))


def keyed_normal(keys: Tensor, stream: int | Tensor, shape: tuple[int, ...],
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise of shape (len(keys), *shape); row i depends only on (keys[i], stream).

    `stream` may be a 0-d integer tensor, so a compiled sampler step does not specialise on it.
    """
    n = math.prod(shape)
    stream = torch.as_tensor(stream, dtype=torch.int64, device=keys.device)
    stream_key = _mix32((stream * _GOLDEN) & _M32)  # stream < 2^31: the product fits in int64
    base = _mix32(keys.view(-1, 1) ^ stream_key)
    counter = torch.arange(n, device=keys.device, dtype=torch.int64).view(1, -1)
    bits1 = _mix32(base + _mul32(2 * counter, _GOLDEN))
    bits2 = _mix32(base + _mul32(2 * counter + 1, _GOLDEN))
    # 24-bit uniforms in (0, 1), then Box-Muller.
    u1 = ((bits1 >> 8).float() + 0.5) / 16777216.0
    u2 = ((bits2 >> 8).float() + 0.5) / 16777216.0
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.view(len(keys), *shape).to(dtype)


def keyed_integers(keys: Tensor, stream: int | Tensor, high: int) -> Tensor:
    """One integer in [0, high) per key, a pure function of (keys[i], stream) (e.g. ICG's random class)."""
    stream = torch.as_tensor(stream, dtype=torch.int64, device=keys.device)
    bits = _mix32(_mix32(keys.to(torch.int64) ^ _mix32((stream * _GOLDEN) & _M32)) + _GOLDEN)
    return bits % high  # 32 random bits: the modulo bias is < high / 2^32
