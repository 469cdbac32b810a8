"""The evaluators' training loop (lightning_modules.evaluation.evaluator builds the network and calls it):
deterministic AdamW + one-cycle LR with +-1 px shifts, on clean images in [-1, 1], whatever the network."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _random_shift(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate every image independently by up to +-max_shift pixels (replicate-padded edges).

    Only shifts: flips would turn digits into non-digits (2 vs 5, 6 vs 9).
    """
    b, c, h, w = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p), mode="replicate")
    dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    bidx = torch.arange(b)[:, None, None]
    return xp.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def _accuracy(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    net.eval()
    correct = sum((net(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / max(1, len(y))


def _train_loop(
    x_train: Tensor,
    y_train: Tensor,
    make_net: Callable[[], nn.Module],
    steps: int,
    seed: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    max_shift: int,
) -> nn.Module:
    # fork_rng: seed the weight init without touching the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = make_net()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    n = len(x_train)
    net.train()
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        # Epoch-style sampling without replacement: every image is seen equally often.
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        xb = x_train[idx]
        if max_shift > 0:
            xb = _random_shift(xb, max_shift, gen)
        loss = F.cross_entropy(net(xb), y_train[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()
