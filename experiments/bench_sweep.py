"""The guidance-sweep half of `experiments/benchmark.py` (issue 5) and the timing helpers both halves share.

`run_sweep` times a sweep the way the sweep callback runs one: per method, every scale in one batched pass
(per-sample scale vectors, flattened item -> (sample, scale)), split into chunks of `--sweep-batch` images,
one `sample(...)` call per chunk (optionally torch.compile'd), Inception-v3 features of every chunk, then the
per-cell metrics. `step_timings` times one guided DDIM step (CFG: one batched 2B forward) eager vs compiled.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_modules.diffusion import (
    GuidedDenoiser,
    NoiseSchedule,
    keyed_normal,
    method_scales,
    respaced_timesteps,
    sample,
    sample_keys,
)
from lightning_modules.evaluation import (
    CELL_METRIC_KEYS,
    InceptionExtractor,
    cell_metrics,
    check_inception_weights,
    feature_statistics,
)
from lightning_modules.evaluation.features import to_uint8_range
from lightning_modules.evaluation.metrics import reference_moments

# The issue-5 target: 8 scales per method, native scales of each method (cfg: s_cfg, cg_cond: s_cg).
SWEEP_SCALES = {"cfg": (0.0, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0), "cg_cond": (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0)}
SMALL_SWEEP_SCALES = {"cfg": (1.0, 3.0), "cg_cond": (1.0, 3.0)}
SWEEP_COMPILE = ("none", "default", "reduce-overhead", "max-autotune", "auto")
RANDOM_INCEPTION = "random (timing only)"
MAX_REFERENCE = 10_000
SAMPLE_SEED, REFERENCE_SEED, CALIBRATION_SEED = 0, 1, 2
# Dynamo keeps one graph per (batch shape, step mode) of the shared step function; a full run needs about 8
# (step timing + sweep). Fail loudly rather than fall back to eager and report eager times as compiled ones.
DYNAMO_LIMITS = {"recompile_limit": 64, "fail_on_recompile_limit_hit": True}


# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets. More specific names first:
# "H100 PCIe" must not match the SXM entry. fp32 runs use TF32 (cuDNN convolutions do by default; matmuls
# are switched to it below), so their peak is the TF32 one.
PEAK_TFLOPS = [
    ("H200", {"bf16": 989.0, "fp32": 494.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 418.0}),
    ("H100", {"bf16": 989.0, "fp32": 494.0}),
    ("A100", {"bf16": 312.0, "fp32": 156.0}),
    ("L40S", {"bf16": 362.0, "fp32": 183.0}),
]


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """The device's dense peak in FLOP/s for `dtype`, or None where unknown (CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks[dtype] * 1e12
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median_seconds(step: Callable[[], object], iters: int, warmup: int, device: torch.device) -> float:
    """Median wall time of `step` after `warmup` untimed calls (compilation, cuDNN autotuning, allocator)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        synchronize(device)  # kernels are asynchronous: time until they finish, not until they are queued
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def log(message: str) -> None:
    print(f"[sweep] {message}", file=sys.stderr, flush=True)


class PhaseClock:
    """Seconds per phase ("sampling", "metrics"); synchronises at phase edges only (once or twice per chunk)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[phase] += time.perf_counter() - start


@dataclass
class SweepModels:
    net: nn.Module  # (x, t, y) -> eps
    classifier: nn.Module  # noisy classifier (x, t) -> logits, frozen
    schedule: NoiseSchedule
    num_classes: int
    shape: tuple[int, int, int]


def classifier_flops_per_image(classifier: nn.Module, shape: tuple[int, ...], device: torch.device) -> float:
    """FLOPs of one classifier-guidance pass per image: forward plus backward to the input (frozen weights),
    the work of `classifier_grad`. Counted with `.backward()` at batch 2: FlopCounterMode's module hooks
    support neither `torch.autograd.grad` on a leaf nor `torch.func.grad`, and the maths is the same."""
    x = torch.randn(2, *shape, device=device, requires_grad=True)
    t, y = torch.tensor([10, 500], device=device), torch.tensor([0, 1], device=device)

    def grad() -> None:
        with torch.enable_grad():
            F.log_softmax(classifier(x, t).float(), dim=-1).gather(1, y.view(-1, 1)).sum().backward()

    return count_flops(grad) / 2


def random_inception(device: torch.device, shape: tuple[int, ...]) -> InceptionExtractor:
    """torch-fidelity's Inception-v3 with seeded random weights: the identical network and cost, for timing
    where the real weights are absent (nothing is downloaded). Its metric values mean nothing.

    He-normal convolutions, then batch-norm statistics calibrated on 8 keyed-noise images of `shape`: every
    channel is zero-mean before its ReLU, so no pooled feature is constantly 0. (PyTorch's default init shrinks
    activations to ~1e-8, and dead features would make the metrics degenerate and FID's eigvals cheaper than
    with the real network.)"""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with mock.patch("torch.load", return_value={}), \
                mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda *_, **__: None):
            model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                feature_extractor_weights_path="random")
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # running statistics = those of the calibration batch
    images = keyed_normal(sample_keys(CALIBRATION_SEED, torch.arange(8)), 0, tuple(shape)).clamp(-1, 1)
    with torch.no_grad():
        model.train()(to_uint8_range(images))
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inception-v3-random-init.pth"
        torch.save(model.state_dict(), path)
        return InceptionExtractor(path, device=device)


def build_extractor(weights: str | None, device: torch.device,
                    shape: tuple[int, ...]) -> tuple[InceptionExtractor, str]:
    """The Inception extractor and what its weights are: `weights`, else torch-fidelity's usual download
    location, else a random-init network of the same architecture (timing only)."""
    if weights is None:
        try:
            weights = str(check_inception_weights(None))
        except FileNotFoundError:
            return random_inception(device, shape), RANDOM_INCEPTION
    return InceptionExtractor(weights, device=device), weights


def chunk_ranges(total: int, batch: int) -> list[tuple[int, int]]:
    """[start, stop) of every chunk of the flattened items 0..total-1: full chunks, then the remainder."""
    return [(start, min(start + batch, total)) for start in range(0, total, batch)]


def chunk_denoiser(models: SweepModels, method: str, scales: tuple[float, ...], n: int, start: int, stop: int,
                   device: torch.device) -> tuple[GuidedDenoiser, Tensor]:
    """The denoiser and noise keys of items [start, stop): item i is sample i % n at scale index i // n."""
    idx = torch.arange(start, stop)
    sample_idx, scale_idx = idx % n, (idx // n).tolist()
    pairs = [method_scales(method, s) for s in scales]
    den = GuidedDenoiser(models.net, models.schedule, (sample_idx % models.num_classes).to(device),
                         models.num_classes, cfg_scale=[pairs[j][0] for j in scale_idx],
                         cg_scale=[pairs[j][1] for j in scale_idx], classifier=models.classifier)
    return den, sample_keys(SAMPLE_SEED, sample_idx).to(device)


def warmup_ranges(models: SweepModels, method: str, scales: tuple[float, ...], n: int,
                  ranges: list[tuple[int, int]], steps: int, device: torch.device) -> list[tuple[int, int]]:
    """One chunk per distinct (chunk size, step modes): the compiled step holds one graph per batch shape and
    StepMode (a chunk holding only s_cfg = 0 or only s_cfg = 1 needs one branch, not the batched 2B forward)
    and none per step count, so a 2-step run of these chunks compiles everything the timed run needs."""
    timesteps = respaced_timesteps(models.schedule.timesteps, steps)
    chosen: dict = {}
    for start, stop in ranges:
        den, _ = chunk_denoiser(models, method, scales, n, start, stop, device)
        chosen.setdefault((stop - start, frozenset(den.mode(t) for t in timesteps)), (start, stop))
    return list(chosen.values())


def sample_chunks(models: SweepModels, method: str, scales: tuple[float, ...], n: int,
                  ranges: list[tuple[int, int]], steps: int, args, clock: PhaseClock,
                  extractor: InceptionExtractor) -> tuple[float, float, Tensor, Tensor]:
    """Sample (and featurise) the items of every range, one sample() call per chunk. Returns network
    evaluations and classifier passes summed over images, and the (features, logits) of all items in order."""
    device = args.device
    nfe = grads = 0.0
    feats, logits = [], []
    for start, stop in ranges:
        den, keys = chunk_denoiser(models, method, scales, n, start, stop, device)
        with clock("sampling"), autocast(device, args.dtype):
            images = sample(den, models.shape, keys, steps, "ddim", compile=args.sweep_compile)
        nfe += den.nfe * (stop - start)
        grads += den.classifier_grads * (stop - start)
        with clock("metrics"):
            f, lg = extractor.extract(images)  # float32, autocast off inside
            feats.append(f)
            logits.append(lg)
    return nfe, grads, torch.cat(feats), torch.cat(logits)


def _finite(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def reference(models: SweepModels, extractor: InceptionExtractor, n: int, batch: int,
              device: torch.device) -> tuple[Tensor, tuple]:
    """Features (kept on the device: precision/recall runs there) and (mu, sigma) of n fixed keyed-noise
    images: stand-ins for the real split with the same cost per cell."""
    feats = []
    for start, stop in chunk_ranges(n, batch):
        keys = sample_keys(REFERENCE_SEED, torch.arange(start, stop)).to(device)
        feats.append(extractor.extract(keyed_normal(keys, 0, models.shape).clamp(-1, 1))[0])
    feats_all = torch.cat(feats)
    return feats_all, reference_moments(*feature_statistics(feats_all), device=device)  # as the sweep callback


def run_sweep(models: SweepModels, args, unet_flops: float, peak: float | None) -> dict:
    """The timed sweep (sampling + Inception features + per-cell metrics) after an untimed warm-up."""
    device, n, steps = args.device, args.sweep_samples, args.sweep_steps
    methods, batch = args.sweep_methods, args.sweep_batch
    t0 = time.perf_counter()
    extractor, weights = build_extractor(args.inception_weights, device, models.shape)
    n_ref = min(n, MAX_REFERENCE)
    ref_feats, ref_stats = reference(models, extractor, n_ref, batch, device)
    synchronize(device)
    reference_seconds = time.perf_counter() - t0
    plans = {m: chunk_ranges(n * len(args.sweep_scales[m]), batch) for m in methods}
    with torch._dynamo.config.patch(**DYNAMO_LIMITS):
        t0 = time.perf_counter()  # untimed warm-up: compilation, CUDA graph capture, cuDNN, Inception shapes
        for m in methods:
            ranges = warmup_ranges(models, m, args.sweep_scales[m], n, plans[m], steps, device)
            sample_chunks(models, m, args.sweep_scales[m], n, ranges, min(2, steps), args, PhaseClock(device),
                          extractor)
        synchronize(device)
        warmup_seconds = time.perf_counter() - t0
        log(f"reference {reference_seconds:.1f}s, warm-up {warmup_seconds:.1f}s; timing {len(methods)} methods")
        clock, per_method, cost, cells = PhaseClock(device), {}, {}, []
        nfe_total = grads_total = 0.0
        start = time.perf_counter()
        for m in methods:
            t0, scales = time.perf_counter(), args.sweep_scales[m]
            nfe, grads, feats, logits = sample_chunks(models, m, scales, n, plans[m], steps, args, clock, extractor)
            with clock("metrics"):
                for j, scale in enumerate(scales):
                    part = slice(j * n, (j + 1) * n)  # Inception logits are ImageNet classes: no accuracy
                    values = cell_metrics(ref_feats, feats[part], logits[part], None, ref_stats,
                                          kid_subset_size=min(1000, n, n_ref))
                    cells.append({"method": m, "scale": scale, **{k: _finite(values[k]) for k in CELL_METRIC_KEYS}})
            per_method[m] = round(time.perf_counter() - t0, 3)
            log(f"{m}: {len(plans[m])} chunks, {per_method[m]:.1f}s (sampling + metrics so far "
                f"{clock.seconds['sampling']:.1f}s + {clock.seconds['metrics']:.1f}s)")
            images = n * len(scales)
            cost[m] = {"nfe_per_sample": nfe / images, "classifier_grads_per_sample": grads / images}
            nfe_total, grads_total = nfe_total + nfe, grads_total + grads
        seconds = time.perf_counter() - start
    images = sum(n * len(args.sweep_scales[m]) for m in methods)
    clf_flops = classifier_flops_per_image(models.classifier, models.shape, device)
    sampling = clock.seconds["sampling"]
    achieved = (unet_flops * nfe_total + clf_flops * grads_total) / sampling
    return {"bench": "sweep", "impl": "ours", "dtype": args.dtype, "compile": args.sweep_compile or "none",
            "methods": list(methods), "scales": {m: list(args.sweep_scales[m]) for m in methods},
            "samples_per_cell": n, "cells": len(cells), "sampler": "ddim", "steps": steps, "batch": batch,
            "images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 3),
            "sampling_seconds": round(sampling, 3), "metrics_seconds": round(clock.seconds["metrics"], 3),
            "warmup_seconds": round(warmup_seconds, 3), "reference_seconds": round(reference_seconds, 3),
            "reference_images": n_ref, "seconds_per_method": per_method, "cost": cost,
            "network_evaluations": nfe_total, "classifier_passes": grads_total,
            "gflops_per_network_evaluation": round(unet_flops / 1e9, 3),
            "gflops_per_classifier_pass": round(clf_flops / 1e9, 3),
            "sampling_tflops": round(achieved / 1e12, 4), "mfu": None if peak is None else round(achieved / peak, 4),
            "inception_weights": weights, "metrics": cells}


def step_timings(models: SweepModels, args, unet_flops: float, peak: float | None) -> list[dict]:
    """ms per guided DDIM step at the sample batch, CFG (one batched 2B forward, CFG combination, update),
    in each compile mode of `args.step_modes` (None = eager), timed over whole sample() calls of
    `args.step_steps` steps; speedup_vs_eager compares with the eager line of the same run."""
    device, batch, steps = args.device, args.sample_batch, args.step_steps
    idx = torch.arange(batch)
    grid = SWEEP_SCALES["cfg"]
    den = GuidedDenoiser(models.net, models.schedule, (idx % models.num_classes).to(device), models.num_classes,
                         cfg_scale=[grid[i % len(grid)] for i in range(batch)])
    keys = sample_keys(SAMPLE_SEED, idx).to(device)

    def run(mode: str | None) -> None:
        with autocast(device, args.dtype):
            sample(den, models.shape, keys, steps, "ddim", compile=mode)

    records, eager_ms = [], None
    with torch._dynamo.config.patch(**DYNAMO_LIMITS):
        for mode in args.step_modes:
            record = {"bench": "sample_step", "impl": "ours", "compile": mode or "none", "dtype": args.dtype,
                      "guidance": "cfg", "batch": batch, "forward_batch": 2 * batch, "steps": steps}
            try:
                seconds = median_seconds(lambda m=mode: run(m), args.iters, args.warmup + (2 if mode else 0),
                                         device) / steps
            except Exception as err:  # e.g. no C++ compiler for inductor on this machine: report, go on
                records.append({**record, "error": f"{type(err).__name__}: {str(err)[:300]}"})
                continue
            eager_ms = 1e3 * seconds if mode is None else eager_ms
            achieved = unet_flops * 2 * batch / seconds
            records.append({**record, "ms_per_step": round(1e3 * seconds, 3),
                            "images_per_s": round(batch / seconds, 2),
                            "speedup_vs_eager": None if eager_ms is None else round(eager_ms / (1e3 * seconds), 3),
                            "achieved_tflops": round(achieved / 1e12, 4),
                            "mfu": None if peak is None else round(achieved / peak, 4)})
    return records


def sync_check(models: SweepModels, device: torch.device, dtype: str) -> dict:
    """CUDA only: whole guided sample() calls (CFG and CG, mixed per-sample scales) under
    `torch.cuda.set_sync_debug_mode("error")`, which raises on any operation that makes the host wait for
    the device. Passing means the sampling loop queues every step without waiting."""
    n = 16
    idx = torch.arange(n)
    labels, keys = (idx % models.num_classes).to(device), sample_keys(SAMPLE_SEED, idx).to(device)
    record = {"bench": "sync_check", "impl": "ours", "dtype": dtype, "steps": 3}
    den = GuidedDenoiser(models.net, models.schedule, labels, models.num_classes, classifier=models.classifier,
                         cfg_scale=[(0.0, 1.0, 2.0, 3.0)[i % 4] for i in range(n)],
                         cg_scale=[(0.0, 0.5, 1.0, 2.0)[i % 4] for i in range(n)], interval=(0, 600))
    sample(den, models.shape, keys, 3, "ddim")  # warm-up: lazy initialisation may sync once
    try:
        torch.cuda.set_sync_debug_mode("error")
        with autocast(device, dtype):
            for sampler in ("ddim", "ddpm"):
                sample(den, models.shape, keys, 3, sampler)
    except RuntimeError as err:
        return {**record, "host_sync_free": False, "error": str(err)[:300]}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {**record, "host_sync_free": True}
