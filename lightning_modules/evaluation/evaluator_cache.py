"""On-disk cache helpers of the evaluators (lightning_modules.evaluation.evaluator): content hashes of the data
and of the weights, safe file names, atomic writes and a tolerant loader of cached weights."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_modules.files import atomic_save

log = logging.getLogger(__name__)


def _fingerprint(*tensors: Tensor) -> str:
    # Content hash of the data: a different split or preprocessing must not reuse an old evaluator.
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _weights_hash(state_dict: dict[str, Tensor]) -> str:
    h = hashlib.sha1()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# One atomic writer for the whole project (temp file beside the target, fsync, rename).
atomic_torch_save = atomic_save


def _load_cached_evaluator(path: Path, net: nn.Module) -> float | None:
    """Load the cache file into `net` and return its held-out accuracy; None when there is no file, or, with a
    warning naming the file, when it is unreadable, corrupt or does not fit `net` (the caller then retrains
    and atomically rewrites it, instead of dying on a raw torch error that names no file)."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(blob["state_dict"])  # strict: missing keys or wrong shapes raise
        acc = float(blob["heldout_accuracy"])
    except Exception as err:  # truncated zip, garbage bytes, missing keys, wrong shapes, ...
        log.warning("Evaluator cache %s is unreadable, corrupt or does not fit the network (%s: %s): "
                    "retraining and rewriting it", path, type(err).__name__, err)
        return None
    return acc
