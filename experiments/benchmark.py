"""Throughput of the project's UNet at the DDPM-CIFAR size, against diffusers' UNet2DModel of the same size,
and the wall time of the CIFAR-scale guidance sweep (10k samples x 8 scales x CFG and CG, DDIM-50).

    python -m experiments.benchmark                       # GPU: batch 128 training, batch 512 sampling, full sweep
    python -m experiments.benchmark --small --no-peer     # CPU-friendly smoke run (a few minutes on 2 cores)
    python -m experiments.benchmark --compile both --out bench.jsonl
    python -m experiments.benchmark --compile on --compile-mode reduce-overhead   # both networks with CUDA graphs
    python -m experiments.benchmark --compile off --no-peer --inception-weights /path/to/weights-inception-*.pth
    python -m experiments.benchmark --no-sweep --sample-batch 256   # networks and the step timing only
    python -m experiments.benchmark --no-throughput --no-sample-step --sweep-samples 2500   # the sweep alone

Prints one JSON line per measurement on stdout (diagnostics go to stderr):
  {"bench": "env", ...}                                   device, versions, peak FLOP/s used for MFU
  {"bench": "train"|"sample", "impl": "ours"|"peer", ...} images/s, ms per iteration, FLOPs per image, MFU
  {"bench": "ratio", ...}                                 ours/peer images/s for the same bench and compile mode
  {"bench": "sample_step", "compile": ..., ...}           one guided DDIM step at the sample batch, CFG (one
      batched 2B forward + combination + update): ms_per_step, images_per_s (images advanced one step per s),
      speedup_vs_eager; compile none / "default" / "reduce-overhead" (CUDA graphs) on CUDA, only eager on CPU
      unless --sweep-compile names a mode
  {"bench": "sync_check", ...}                            CUDA: host_sync_free = no host-device sync in sample()
  {"bench": "sweep", ...}                                 the CIFAR-scale sweep (ours only), see below
  {"peer": "skipped", "reason": ...}                      when diffusers is missing or --no-peer

The sweep (target: <= 10 minutes on one H100): methods cfg and cg_cond x 8 scales (SWEEP_SCALES) x 10k samples
per cell, 50 DDIM steps, run by the sweep engine itself (`lightning_modules.sweep.run_job`, one job per method,
as in the sweep callback and `python -m experiments.sweep`): all scales of a method in one batched pass in
chunks of --sweep-batch images, the sampler step compiled with --sweep-compile (auto: "default" on CUDA),
float32 Inception-v3 features, per-cell metrics (FID, KID, IS, precision/recall) against keyed-noise reference
images. Without Inception weights (--inception-weights, or torch-fidelity's cache) a randomly initialised
Inception of the same architecture is timed ("inception_weights": "random (timing only)"; its metric values
mean nothing). Its line: seconds = timed wall of the jobs, warmup_seconds = the same jobs run untimed before
at min(2, steps) steps (compilation, CUDA graphs, cuDNN), metrics_seconds (the engine's: features + cell
metrics), sampling_seconds (the rest of the jobs' wall), cost per method in the engine's terms (nfe_per_sample,
classifier_grads_per_sample: what a cell needs by itself, `cell_cost`, averaged over the method's cells),
network_evaluations and classifier_passes (per-sample cost x samples, summed over cells), MFU of the sampling
phase from those totals (CUDA only; a chunk mixing s_cfg in {0, 1} with other scales runs both branches for
all its images, work not counted) and every cell's metrics and cost.

Both networks run the identical step (same inputs, MSE to the noise, AdamW, fused on CUDA) under the same
autocast, so the ratio isolates the network implementation. FLOPs come from torch.utils.flop_counter
(matmuls, convolutions, attention; elementwise ops are not counted, as usual for MFU). diffusers is the
optional `bench` extra (pip install -e .[bench]), never a runtime dependency.

The networks and their timing live in `experiments/bench_networks.py`, the sweep and the step timing in
`experiments/bench_sweep.py`; this module parses the options and runs the parts in order.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import platform
from pathlib import Path

import torch

from experiments.bench_networks import (
    HPARAMS,
    PEER_HINT,
    build_ours,
    build_peer,
    call_ours,
    call_peer,
    flops_per_image,
    measure,
    ratios,
    sweep_models,
)
from experiments.bench_sweep import (
    MIN_SAMPLES,
    SMALL_SWEEP_SCALES,
    SWEEP_COMPILE,
    SWEEP_SCALES,
    peak_flops,
    step_timings,
    sweep_config,
    sweep_record,
    sync_check,
)
from lightning_modules.diffusion import COMPILE_MODES, OptionError


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(map(math.isfinite, values)):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, e.g. 1,3, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--small", action="store_true", help="CPU-friendly: small batches, few iterations, tiny sweep")
    p.add_argument("--compile", choices=("on", "off", "both", "auto"), default="auto",
                   help="torch.compile the networks; auto = both on CUDA, off elsewhere")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode for both networks when compiled (reduce-overhead = CUDA graphs)")
    p.add_argument("--dtype", choices=("bf16", "fp32", "auto"), default="auto",
                   help="autocast dtype; auto = bf16 on CUDA, fp32 elsewhere (CPU bf16 is often slower)")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure diffusers' UNet2DModel (the `bench` extra)")
    p.add_argument("--iters", type=_positive_int, default=None, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (+2 when compiled)")
    p.add_argument("--train-batch", type=_positive_int, default=None, help="default 128 (8 with --small)")
    p.add_argument("--sample-batch", type=_positive_int, default=None, help="default 512 (16 with --small)")
    p.add_argument("--base-channels", type=_positive_int, default=128, help="network width; 128 = DDPM-CIFAR (~38M)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True,
                   help="measure training and sampling throughput of the networks (the train/sample lines)")
    p.add_argument("--sample-step", action=argparse.BooleanOptionalAction, default=True,
                   help="time one guided DDIM step (CFG) eager vs compiled at the sample batch")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="time the guidance sweep, metrics included")
    p.add_argument("--sweep-samples", type=_positive_int, default=None,
                   help=f"samples per cell, at least {MIN_SAMPLES}; default 10000 (4 with --small)")
    p.add_argument("--sweep-steps", type=_positive_int, default=None, help="DDIM steps; default 50 (3 with --small)")
    p.add_argument("--sweep-batch", type=_positive_int, default=None,
                   help="images per sampler call (the engine's chunk); default 2048 (8 with --small)")
    p.add_argument("--sweep-scales", type=_scales, default=None,
                   help="comma-separated scales for every method instead of the per-method grids")
    p.add_argument("--sweep-compile", choices=SWEEP_COMPILE, default="auto",
                   help="torch.compile mode of the sampler step; auto = default on CUDA, "
                        "none elsewhere")
    p.add_argument("--inception-weights", default=None,
                   help="local Inception-v3 weights; default torch-fidelity's cache, else a random-init network "
                        "(timing only)")
    args = p.parse_args(argv)
    if args.inception_weights is not None and not Path(args.inception_weights).expanduser().is_file():
        p.error(f"--inception-weights: no such file {args.inception_weights!r}")
    args.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                               else args.device)
    cuda = args.device.type == "cuda"
    args.dtype = ("bf16" if cuda else "fp32") if args.dtype == "auto" else args.dtype
    args.compile = ("both" if cuda else "off") if args.compile == "auto" else args.compile
    small = args.small
    args.iters = args.iters or (2 if small else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 5)
    args.train_batch = args.train_batch or (8 if small else 128)
    args.sample_batch = args.sample_batch or (16 if small else 512)
    # The sweep: methods x scales x samples per cell, DDIM steps, in chunks of sweep_batch images.
    args.sweep_methods = ("cfg", "cg_cond")
    grid = SMALL_SWEEP_SCALES if small else SWEEP_SCALES
    args.sweep_scales = {m: args.sweep_scales or grid[m] for m in args.sweep_methods}
    args.sweep_samples = args.sweep_samples or (4 if small else 10_000)
    args.sweep_steps = args.sweep_steps or (3 if small else 50)
    args.sweep_batch = args.sweep_batch or (8 if small else 2048)
    # At sweep chunk sizes (thousands of images per forward) launch overhead is small: plain compile on CUDA;
    # the step timing below measures what CUDA graphs add.
    mode = ("default" if cuda else "none") if args.sweep_compile == "auto" else args.sweep_compile
    args.sweep_compile = None if mode == "none" else mode
    # The step timing: eager, then default and reduce-overhead on CUDA; on CPU (inductor compiles of the UNet
    # take minutes) only a mode --sweep-compile asks for.
    extra = ["default", "reduce-overhead"] if cuda else []
    args.step_modes = [None, *dict.fromkeys([*extra, *([args.sweep_compile] if args.sweep_compile else [])])]
    args.step_steps = 3 if small else 10
    if args.sweep_samples < MIN_SAMPLES:
        p.error(f"--sweep-samples: precision/recall's k = 3 neighbourhoods need at least {MIN_SAMPLES} samples")
    try:  # the sweep engine's own checks (e.g. at most the model's 1000 steps), before anything runs
        args.sweep_config = sweep_config(args)
        args.sweep_config.check(timesteps=HPARAMS["timesteps"])
    except OptionError as err:
        p.error(str(err))
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; print (and return) one dict per JSON line."""
    args = parse_args(argv)
    device = args.device
    if args.dtype == "fp32":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, like cuDNN's default for convolutions
    out_file = open(args.out, "a") if args.out else None  # noqa: SIM115 - closed below

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if out_file is not None:
            print(line, file=out_file, flush=True)

    records: list[dict] = []
    impls = [("ours", build_ours, call_ours)]
    peer_note = None
    if not args.peer:
        peer_note = {"peer": "skipped", "reason": "--no-peer"}
    else:
        try:
            import diffusers  # noqa: F401
            impls.append(("peer", build_peer, call_peer))
        except ImportError:
            peer_note = {"peer": "skipped", "reason": PEER_HINT}
    peak = peak_flops(device, args.dtype)
    env = {"bench": "env", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
           f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "torch": torch.__version__, "python": platform.python_version(), "dtype": args.dtype,
           "compile": args.compile, "small": args.small, "iters": args.iters, "warmup": args.warmup,
           "peak_tflops": None if peak is None else peak / 1e12, "diffusers": _installed_version("diffusers")}
    emit(env)
    if peer_note:
        emit(peer_note)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile] if args.throughput else []
    flops: dict = {}
    try:
        for compile_ in modes:
            for impl, build, call in impls:
                for record in measure(impl, build, call, args, device, compile_, flops):
                    records.append(record)
                    emit(record)
        for record in ratios(records):
            records.append(record)
            emit(record)
        if args.sample_step or args.sweep:
            models = sweep_models(args)
            if ("ours", "sample") not in flops:
                flops["ours", "sample"] = flops_per_image(models.diffusion.net, call_ours, device, train=False)
            later = [lambda: [sync_check(models, device, args.dtype)]] if device.type == "cuda" else []
            if args.sample_step:
                later.append(lambda: step_timings(models, args, flops["ours", "sample"], peak))
            if args.sweep:
                later.append(lambda: [sweep_record(models, args, flops["ours", "sample"], peak)])
            for part in later:
                for record in part():
                    records.append(record)
                    emit(record)
                if args.sweep_compile or len(args.step_modes) > 1:
                    torch._dynamo.reset()  # free compiled graphs and CUDA graph pools between parts
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        if out_file is not None:
            out_file.close()
    return [env, *([peer_note] if peer_note else []), *records]


if __name__ == "__main__":
    main()
