"""The guidance-sweep part of `experiments/benchmark.py` and the timing helpers it shares with
`experiments/bench_networks.py` (the network-throughput part).

`sweep_record` times the sweep engine itself: one `lightning_modules.sweep.run_job` per method, the code
path of the sweep callback and of `python -m experiments.sweep` (every scale of a method in one batched
pass, chunks of `--sweep-batch` images, Inception-v3 features, per-cell metrics). Only the inputs are the
benchmark's: random-init networks, keyed-noise reference images and, without weights, a random-init
Inception. `step_timings` times one guided DDIM step (CFG: one batched 2B forward) eager vs compiled.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_modules.diffusion import (
    GuidanceOptions,
    GuidedDenoiser,
    SamplerOptions,
    keyed_normal,
    sample,
    sample_keys,
)
from lightning_modules.evaluation import (
    CELL_METRIC_KEYS,
    InceptionExtractor,
    check_inception_weights,
    feature_statistics,
)
from lightning_modules.evaluation.features import to_uint8_range
from lightning_modules.evaluation.metrics import reference_moments
from lightning_modules.sweep import Evaluation, SweepConfig, SweepModels, plan_jobs, run_job, signatures

# The CIFAR-scale target: 8 scales per method, native scales of each method (cfg: s_cfg, cg_cond: s_cg).
SWEEP_SCALES = {"cfg": (0.0, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0), "cg_cond": (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0)}
SMALL_SWEEP_SCALES = {"cfg": (1.0, 3.0), "cg_cond": (1.0, 3.0)}
SWEEP_COMPILE = ("none", "default", "reduce-overhead", "max-autotune", "auto")
MIN_SAMPLES = 4  # precision/recall's k = 3 neighbourhoods need more than 3 samples per cell
RANDOM_INCEPTION = "random (timing only)"
RANDOM_CLASSIFIER = "random-init classifier (benchmark)"  # what the config names as its classifier
MAX_REFERENCE = 10_000
SAMPLE_SEED, REFERENCE_SEED, CALIBRATION_SEED = 0, 1, 2
COST = ("nfe_per_sample", "classifier_grads_per_sample")  # the engine's cost columns (`cell_cost`)
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


def sweep_config(args) -> SweepConfig:
    """The benchmark's sweep as the engine's settings (raises OptionError for a bad one)."""
    return SweepConfig(methods=list(args.sweep_methods), scales={m: list(s) for m, s in args.sweep_scales.items()},
                       seeds=[SAMPLE_SEED], num_samples=args.sweep_samples, batch_size=args.sweep_batch,
                       sampling=SamplerOptions("ddim", args.sweep_steps, compile=args.sweep_compile),
                       classifier_ckpt=RANDOM_CLASSIFIER, extractor="inception", grid_size=1, progress=False,
                       bootstrap=0)  # as the CIFAR sweep recipe: 2048-d FID resamples cost seconds each


def reference_evaluation(models: SweepModels, extractor, n: int, batch: int) -> Evaluation:
    """n fixed keyed-noise images stand in for the real split at the same cost per cell: their features
    (kept on the device: precision/recall run there) and (μ, Σ, Σ^½), as `build_evaluation` gives them."""
    device = models.device
    feats = torch.cat([extractor.extract(keyed_normal(sample_keys(REFERENCE_SEED, idx).to(device), 0,
                                                      models.shape).clamp(-1, 1))[0]
                       for idx in torch.arange(n).split(batch)]).to(device)
    return Evaluation(extractor, "inception", feats, reference_moments(*feature_statistics(feats), device=device),
                      f"keyed-noise-seed{REFERENCE_SEED}-n{n}")


def _finite(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def time_sweep(models: SweepModels, config: SweepConfig, evaluation: Evaluation,
               autocast_dtype: torch.dtype | None = None) -> dict:
    """Every job of the sweep through `run_job`: first untimed at min(2, steps) steps (compilation, CUDA graph
    capture, cuDNN, Inception shapes: a compiled step holds one graph per chunk shape and step mode, none per
    step count), then timed. Seconds are raw floats; sampling = each job's wall minus the engine's
    metrics_seconds (features + cell metrics). Costs are the engine's rows, summed over cells for the totals
    (per-sample cost x samples: the work each cell needs by itself)."""
    sigs = signatures(config, models, evaluation, autocast_dtype is not None)
    jobs = plan_jobs(config, None, sigs)
    warm = replace(config, sampling=replace(config.sampling, steps=min(2, config.sampling.steps)))
    with torch._dynamo.config.patch(**DYNAMO_LIMITS):
        t0 = time.perf_counter()
        for job in jobs:
            run_job(models, warm, evaluation, job, sigs[job.method], autocast_dtype=autocast_dtype)
        synchronize(models.device)
        warmup_seconds = time.perf_counter() - t0
        log(f"warm-up {warmup_seconds:.1f}s; timing {len(jobs)} jobs")
        results, per_method, sampling = [], {}, 0.0
        start = time.perf_counter()
        for job in jobs:
            t0 = time.perf_counter()
            results.append(run_job(models, config, evaluation, job, sigs[job.method], autocast_dtype=autocast_dtype))
            per_method[job.method] = time.perf_counter() - t0
            sampling += per_method[job.method] - results[-1].metrics_seconds
            log(f"{job.method}: {len(job.scales)} scales, {per_method[job.method]:.1f}s")
        seconds = time.perf_counter() - start
    rows = [row for result in results for row in result.rows]
    return {"seconds": seconds, "warmup_seconds": warmup_seconds, "seconds_per_method": per_method,
            "sampling_seconds": sampling,
            "metrics_seconds": sum(r.metrics_seconds for r in results),
            "cost": {m: {k: statistics.fmean(r[k] for r in rows if r["method"] == m) for k in COST}
                     for m in config.methods},
            "network_evaluations": sum(r["nfe_per_sample"] * r["num_samples"] for r in rows),
            "classifier_passes": sum(r["classifier_grads_per_sample"] * r["num_samples"] for r in rows),
            "metrics": [{"method": r["method"], "scale": r["scale"], **{k: r[k] for k in COST},
                         **{k: _finite(r[k]) for k in CELL_METRIC_KEYS}} for r in rows]}


def sweep_record(models: SweepModels, args, unet_flops: float, peak: float | None) -> dict:
    """The sweep line: reference features (untimed), then `time_sweep`; MFU of the sampling phase from the
    cells' network evaluations and classifier passes."""
    device, config = models.device, args.sweep_config
    n, steps = config.num_samples, config.sampling.steps
    t0 = time.perf_counter()
    extractor, weights = build_extractor(args.inception_weights, device, models.shape)
    n_ref = min(n, MAX_REFERENCE)
    evaluation = reference_evaluation(models, extractor, n_ref, config.batch_size)
    synchronize(device)
    reference_seconds = time.perf_counter() - t0
    log(f"reference {reference_seconds:.1f}s")
    timed = time_sweep(models, config, evaluation, torch.bfloat16 if args.dtype == "bf16" else None)
    clf_flops = classifier_flops_per_image(models.classifier.net, models.shape, device)
    sampling = timed["sampling_seconds"]
    achieved = (unet_flops * timed["network_evaluations"] + clf_flops * timed["classifier_passes"]) / sampling
    images = n * len(timed["metrics"])
    return {"bench": "sweep", "impl": "ours", "dtype": args.dtype, "compile": config.sampling.compile or "none",
            "methods": config.methods, "scales": config.grids, "samples_per_cell": n, "cells": len(timed["metrics"]),
            "sampler": config.sampling.sampler, "steps": steps, "batch": config.batch_size, "images": images,
            "seconds": round(timed["seconds"], 3), "images_per_s": round(images / timed["seconds"], 3),
            "sampling_seconds": round(sampling, 3), "metrics_seconds": round(timed["metrics_seconds"], 3),
            "warmup_seconds": round(timed["warmup_seconds"], 3), "reference_seconds": round(reference_seconds, 3),
            "reference_images": n_ref,
            "seconds_per_method": {m: round(s, 3) for m, s in timed["seconds_per_method"].items()},
            **{k: timed[k] for k in ("cost", "network_evaluations", "classifier_passes")},
            "gflops_per_network_evaluation": round(unet_flops / 1e9, 3),
            "gflops_per_classifier_pass": round(clf_flops / 1e9, 3), "sampling_tflops": round(achieved / 1e12, 4),
            "mfu": None if peak is None else round(achieved / peak, 4), "inception_weights": weights,
            "metrics": timed["metrics"]}


def step_timings(models: SweepModels, args, unet_flops: float, peak: float | None) -> list[dict]:
    """ms per guided DDIM step at the sample batch, CFG (one batched 2B forward, CFG combination, update),
    in each compile mode of `args.step_modes` (None = eager), timed over whole sample() calls of
    `args.step_steps` steps; speedup_vs_eager compares with the eager line of the same run."""
    device, batch, steps = args.device, args.sample_batch, args.step_steps
    idx = torch.arange(batch)
    grid = SWEEP_SCALES["cfg"]
    den = GuidedDenoiser(models.diffusion.net, models.schedule, (idx % models.num_classes).to(device),
                         models.num_classes, "cfg", [grid[i % len(grid)] for i in range(batch)],
                         prediction=models.prediction)
    keys = sample_keys(SAMPLE_SEED, idx).to(device)

    def run(mode: str | None) -> None:
        with autocast(device, args.dtype):
            sample(den, models.shape, keys, SamplerOptions(steps=steps, compile=mode))

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
    """CUDA only: whole guided sample() calls (CFG + CG, mixed per-sample CFG scales, guidance interval) under
    `torch.cuda.set_sync_debug_mode("error")`, which raises on any operation that makes the host wait for
    the device. Passing means the sampling loop queues every step without waiting."""
    n = 16
    idx = torch.arange(n)
    labels, keys = (idx % models.num_classes).to(device), sample_keys(SAMPLE_SEED, idx).to(device)
    record = {"bench": "sync_check", "impl": "ours", "dtype": dtype, "steps": 3}
    den = GuidedDenoiser(models.diffusion.net, models.schedule, labels, models.num_classes, "cfg+cg",
                         [(0.0, 1.0, 2.0, 3.0)[i % 4] for i in range(n)], grad_fn=models.grad_fn,
                         prediction=models.prediction, options=GuidanceOptions(interval=(0, 600)))
    sample(den, models.shape, keys, SamplerOptions(steps=3))  # warm-up: lazy initialisation may sync once
    try:
        torch.cuda.set_sync_debug_mode("error")
        with autocast(device, dtype):
            for sampler in ("ddim", "ddpm"):
                sample(den, models.shape, keys, SamplerOptions(sampler, steps=3))
    except RuntimeError as err:
        return {**record, "host_sync_free": False, "error": str(err)[:300]}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {**record, "host_sync_free": True}
