"""experiments/benchmark.py: every printed line is JSON with the expected keys, at the tiniest setting on CPU;
the sweep is timed through the engine's `run_job` and reports the engine's cost (`cell_cost`) per cell.

No assertion depends on a wall-clock figure: times are checked for type and sign only; costs, counts and cells
are deterministic and checked exactly."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from experiments import bench_networks, bench_sweep, benchmark
from lightning_modules.diffusion import GuidanceOptions, NoiseSchedule, SamplerOptions, cell_cost, make_rule
from lightning_modules.evaluation import CELL_METRIC_KEYS, feature_statistics
from lightning_modules.evaluation.metrics import reference_moments
from lightning_modules.networks import EncoderClassifier, UNet
from lightning_modules.sweep import Evaluation, Network, SweepConfig, SweepModels

TINY = ["--device", "cpu", "--small", "--iters", "1", "--warmup", "0", "--base-channels", "32",
        "--train-batch", "2", "--sample-batch", "2"]
# Two cells (one scale per method: Inception FID's 2048-d eigvals cost seconds per cell on CPU), chunks of
# 3 + 1 images per method, so the full chunk and the last chunk both run.
TINY_SWEEP = ["--sweep-scales", "3", "--sweep-samples", "4", "--sweep-batch", "3", "--sweep-steps", "2"]
MEASURED = {"bench", "impl", "compile", "dtype", "batch", "params_m", "images_per_s", "ms_per_iter",
            "gflops_per_image", "achieved_tflops", "mfu"}
SWEEP = {"bench", "impl", "methods", "scales", "samples_per_cell", "cells", "sampler", "steps", "images", "seconds",
         "images_per_s", "seconds_per_method", "cost", "compile", "batch", "sampling_seconds", "metrics_seconds",
         "warmup_seconds", "reference_seconds", "network_evaluations", "classifier_passes", "mfu",
         "sampling_tflops", "inception_weights", "metrics"}
TIMES = ("seconds", "images_per_s", "sampling_seconds", "metrics_seconds", "warmup_seconds", "reference_seconds")


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_tiny_run_prints_json_lines(capsys, monkeypatch, tmp_path):
    # diffusers made unimportable: the peer must be reported as skipped, not crash the run
    monkeypatch.setitem(sys.modules, "diffusers", None)
    # no Inception weights anywhere (as offline here): a random-init Inception is timed instead
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    out = tmp_path / "bench.jsonl"
    returned = benchmark.main([*TINY, *TINY_SWEEP, "--peer", "--out", str(out)])
    printed = lines(capsys.readouterr().out)
    assert printed == returned == lines(out.read_text())

    env = printed[0]
    assert env["bench"] == "env" and env["peak_tflops"] is None and env["dtype"] == "fp32"
    assert {"peer": "skipped", "reason": bench_networks.PEER_HINT} in printed
    measured = [r for r in printed if r.get("bench") in ("train", "sample")]
    assert {(r["bench"], r["impl"]) for r in measured} == {("train", "ours"), ("sample", "ours")}
    for r in measured:
        assert MEASURED <= set(r), r
        assert r["images_per_s"] > 0 and r["gflops_per_image"] > 0 and r["mfu"] is None  # no CPU peak
    train, sample = (next(r for r in measured if r["bench"] == b) for b in ("train", "sample"))
    # forward + backward is about three forwards
    assert 2.5 < train["gflops_per_image"] / sample["gflops_per_image"] < 3.5
    assert not any(r.get("bench") == "ratio" for r in printed)  # no peer, no ratio

    # the guided step: on CPU only eager unless asked; CFG evaluates the network on 2B images per step
    steps = [r for r in printed if r.get("bench") == "sample_step"]
    assert [r["compile"] for r in steps] == ["none"]
    step = steps[0]
    assert step["batch"] == 2 and step["forward_batch"] == 4 and step["speedup_vs_eager"] == 1.0
    assert positive(step["ms_per_step"]) and positive(step["images_per_s"]), step
    assert isinstance(step["achieved_tflops"], float) and step["achieved_tflops"] >= 0  # 4 decimals of a tiny figure

    sweep = next(r for r in printed if r.get("bench") == "sweep")
    assert SWEEP <= set(sweep), SWEEP - set(sweep)
    n, k = sweep["samples_per_cell"], sweep["steps"]
    assert (n, k, sweep["batch"], sweep["compile"], sweep["sampler"]) == (4, 2, 3, "none", "ddim")
    assert sweep["methods"] == ["cfg", "cg_cond"] and sweep["scales"] == {"cfg": [3.0], "cg_cond": [3.0]}
    assert sweep["cells"] == 2 and sweep["images"] == n * 1 * 2
    # CFG at s != 0, 1 costs two network evaluations per step (one batched 2B forward), CG one evaluation plus
    # one classifier forward+backward per step: the engine's names and values
    assert sweep["cost"] == {"cfg": {"nfe_per_sample": 2.0 * k, "classifier_grads_per_sample": 0.0},
                             "cg_cond": {"nfe_per_sample": 1.0 * k, "classifier_grads_per_sample": 1.0 * k}}
    assert sweep["network_evaluations"] == n * (2 * k + k) and sweep["classifier_passes"] == n * k
    assert sweep["mfu"] is None  # no CPU peak
    for key in TIMES:  # wall-clock figures: present and positive, nothing more
        assert positive(sweep[key]), (key, sweep[key])
    assert set(sweep["seconds_per_method"]) == {"cfg", "cg_cond"}
    assert all(positive(v) for v in sweep["seconds_per_method"].values())
    assert isinstance(sweep["sampling_tflops"], float) and sweep["sampling_tflops"] >= 0
    assert positive(sweep["gflops_per_network_evaluation"]) and positive(sweep["gflops_per_classifier_pass"])
    assert sweep["inception_weights"] == bench_sweep.RANDOM_INCEPTION and sweep["reference_images"] == n
    # metrics really ran: one row per cell, every metric finite (accuracy is None: Inception's classes)
    assert [(c["method"], c["scale"]) for c in sweep["metrics"]] == [("cfg", 3.0), ("cg_cond", 3.0)]
    for cell in sweep["metrics"]:
        for key in ("fid", "kid", "kid_std", "score", "precision", "recall"):
            assert cell[key] is not None and math.isfinite(cell[key]), (key, cell)
        assert cell["fid"] > 0 and cell["accuracy"] is None


class PixelExtractor:
    """Stands in for Inception where only the sweep's plumbing and cost accounting are under test."""

    extractor_id, num_features = "pixels", 4

    def extract(self, x):
        flat = x.flatten(1).float()
        return flat[:, :4], flat[:, 4:7]


HPARAMS = {"schedule": "linear", "timesteps": 1000, "prediction": "eps", "num_classes": 10, "image_size": 8,
           "channels": 1}


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    net = UNet(8, 1, 10, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,))
    clf = EncoderClassifier(8, 1, 10, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                            attention_resolutions=(4,), pool="attention")
    return SweepModels(Network(net, HPARAMS, step=0), Network(clf, HPARAMS, step=0))


@pytest.fixture(scope="module")
def tiny_evaluation():
    ref = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    return Evaluation(PixelExtractor(), "inception", ref, reference_moments(*feature_statistics(ref)), "test-ref")


def test_sweep_reports_the_engine_cost_of_every_cell(tiny_models, tiny_evaluation, monkeypatch):
    """The benchmark's sweep is the engine's run_job, warmed up on the same jobs at min(2, steps) steps; every
    cell reports `cell_cost` of its (method, scale), combo_cg_scale included, and the totals are the cells'
    per-sample costs times their samples. Scales 0 and 1 share chunks with 3 (both branches evaluated) but a
    cell is charged what it needs by itself."""
    calls = []
    real_run_job = bench_sweep.run_job

    def recording_run_job(models, config, evaluation, job, sig, **kwargs):
        calls.append((job.method, job.scales, config.sampling.steps))
        return real_run_job(models, config, evaluation, job, sig, **kwargs)

    monkeypatch.setattr(bench_sweep, "run_job", recording_run_job)
    steps, n = 3, 4
    config = SweepConfig(methods=["cfg", "cg_cond", "cfg+cg"], scales={"cfg": [0.0, 1.0, 3.0], "cg_cond": [0.0, 2.0],
                         "cfg+cg": [1.0, 2.0]}, num_samples=n, batch_size=5, sampling=SamplerOptions(steps=steps),
                         guidance=GuidanceOptions(cfg_cg={"cg_scale": 0.5}, interval=(0, 500)),
                         classifier_ckpt="random", grid_size=1, progress=False)
    timed = bench_sweep.time_sweep(tiny_models, config, tiny_evaluation)
    jobs = [("cfg", (0.0, 1.0, 3.0)), ("cg_cond", (0.0, 2.0)), ("cfg+cg", (1.0, 2.0))]
    assert calls == [(*job, 2) for job in jobs] + [(*job, steps) for job in jobs]
    assert [(c["method"], c["scale"]) for c in timed["metrics"]] == [(m, s) for m, grid in jobs for s in grid]
    # steps at t = 999, 500, 0; the interval [0, 500] guides the last two: outside it CFG at s = 3 is plain
    # conditional (1 evaluation) and no classifier runs; s = 0 is unconditional, s = 1 conditional, throughout
    expected = {("cfg", 0.0): (3, 0), ("cfg", 1.0): (3, 0), ("cfg", 3.0): (5, 0), ("cg_cond", 0.0): (3, 0),
                ("cg_cond", 2.0): (3, 2), ("cfg+cg", 1.0): (3, 2), ("cfg+cg", 2.0): (5, 2)}
    for cell in timed["metrics"]:
        cost = (cell["nfe_per_sample"], cell["classifier_grads_per_sample"])
        assert cost == expected[cell["method"], cell["scale"]], cell
        assert cost == cell_cost(make_rule(cell["method"], config.guidance), cell["scale"], NoiseSchedule(), steps)[:2]
        assert set(CELL_METRIC_KEYS) <= set(cell)
    assert timed["cost"] == {"cfg": {"nfe_per_sample": 11 / 3, "classifier_grads_per_sample": 0.0},
                             "cg_cond": {"nfe_per_sample": 3.0, "classifier_grads_per_sample": 1.0},
                             "cfg+cg": {"nfe_per_sample": 4.0, "classifier_grads_per_sample": 2.0}}
    assert timed["network_evaluations"] == n * sum(c[0] for c in expected.values())
    assert timed["classifier_passes"] == n * sum(c[1] for c in expected.values())
    assert set(timed["seconds_per_method"]) == {"cfg", "cg_cond", "cfg+cg"}
    assert all(isinstance(timed[k], float) and timed[k] >= 0 for k in ("seconds", "warmup_seconds",
                                                                         "sampling_seconds", "metrics_seconds"))


def test_sync_check_runs_both_samplers_under_the_error_mode(tiny_models, monkeypatch):
    """The CUDA host-sync check, driven on CPU: sampling runs inside "error" mode and the mode is restored;
    a sync (RuntimeError from the debug mode) is reported, not raised."""
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    record = bench_sweep.sync_check(tiny_models, torch.device("cpu"), "fp32")
    assert record["host_sync_free"] is True and modes == ["error", "default"]

    def syncing_sample(*args, **kwargs):
        if modes[-1] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")

    monkeypatch.setattr(bench_sweep, "sample", syncing_sample)
    record = bench_sweep.sync_check(tiny_models, torch.device("cpu"), "fp32")
    assert record["host_sync_free"] is False and "synchronizing" in record["error"] and modes[-1] == "default"


def test_defaults():
    args = benchmark.parse_args(["--device", "cpu", "--small"])
    assert (args.train_batch, args.sample_batch, args.compile, args.dtype) == (8, 16, "off", "fp32")
    assert (args.sweep_samples, args.sweep_steps, args.sweep_batch, args.sweep_compile) == (4, 3, 8, None)
    assert args.sweep_methods == ("cfg", "cg_cond") and all(len(s) == 2 for s in args.sweep_scales.values())
    assert args.step_modes == [None]
    # the engine's settings, checked at parse time
    config = args.sweep_config
    assert (config.methods, config.num_samples, config.batch_size, config.seeds) == (["cfg", "cg_cond"], 4, 8, [0])
    assert (config.sampling.sampler, config.sampling.steps, config.sampling.compile) == ("ddim", 3, None)
    assert config.grids == {m: list(s) for m, s in bench_sweep.SMALL_SWEEP_SCALES.items()} and not config.progress
    full = benchmark.parse_args(["--device", "cpu"])
    assert (full.train_batch, full.sample_batch, full.base_channels) == (128, 512, 128)
    # the CIFAR-scale target: 10k samples x 8 scales x {CFG, CG}, 50 DDIM steps, in chunks of 2048
    assert (full.sweep_samples, full.sweep_steps, full.sweep_batch) == (10_000, 50, 2048)
    assert full.sweep_scales == bench_sweep.SWEEP_SCALES and all(len(s) == 8 for s in full.sweep_scales.values())
    cuda = benchmark.parse_args(["--device", "cuda"])  # parsing only: no GPU needed
    assert cuda.sweep_compile == "default" and cuda.dtype == "bf16"
    assert cuda.step_modes == [None, "default", "reduce-overhead"]
    asked = benchmark.parse_args(["--device", "cpu", "--small", "--sweep-compile", "default"])
    assert asked.sweep_compile == "default" and asked.step_modes == [None, "default"]
    assert benchmark.parse_args([*TINY, "--sweep-scales", "0,1.5"]).sweep_scales == {"cfg": (0.0, 1.5),
                                                                                     "cg_cond": (0.0, 1.5)}


@pytest.mark.parametrize("argv,message", [
    (["--sweep-batch", "0"], "--sweep-batch: must be a positive integer, got '0'"),
    (["--sweep-samples", "-3"], "--sweep-samples: must be a positive integer"),
    (["--sweep-samples", "3"], "--sweep-samples: precision/recall's k = 3 neighbourhoods need at least 4"),
    (["--sweep-steps", "1001"], "option `sweep.sampling.steps`: 1001 sampling steps is outside [1, 1000]"),
    (["--sweep-steps", "many"], "--sweep-steps: must be a positive integer"),
    (["--sweep-compile", "fastest"], "--sweep-compile: invalid choice"),
    (["--sweep-scales", "1,x"], "--sweep-scales: expected comma-separated finite numbers"),
    (["--sweep-scales", "nan"], "--sweep-scales: expected comma-separated finite numbers"),
    (["--inception-weights", "/no/such/weights.pth"], "--inception-weights: no such file"),
])
def test_bad_options_are_argparse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        benchmark.parse_args(["--device", "cpu", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_peak_table(monkeypatch):
    cuda = torch.device("cuda")
    for name, bf16 in (("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
                       ("NVIDIA A100-SXM4-80GB", 312)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_, n=name: n)
        assert benchmark.peak_flops(cuda, "bf16") == bf16 * 1e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Some Future GPU")
    assert benchmark.peak_flops(cuda, "bf16") is None
    assert benchmark.peak_flops(torch.device("cpu"), "bf16") is None


def test_ratio_pairs_same_bench_and_mode():
    recs = [{"bench": "train", "impl": "ours", "compile": False, "dtype": "bf16", "images_per_s": 300.0},
            {"bench": "train", "impl": "peer", "compile": False, "dtype": "bf16", "images_per_s": 200.0},
            {"bench": "train", "impl": "ours", "compile": True, "dtype": "bf16", "images_per_s": 400.0}]
    assert bench_networks.ratios(recs) == [{"bench": "ratio", "of": "train", "compile": False, "dtype": "bf16",
                                            "ours_over_peer": 1.5}]


def test_peer_has_our_size():
    pytest.importorskip("diffusers")
    ours, peer = bench_networks.build_ours(128), bench_networks.build_peer(128)
    n_ours, n_peer = (sum(p.numel() for p in m.parameters()) for m in (ours, peer))
    assert 35e6 < n_ours < 39e6 and abs(n_ours - n_peer) / n_ours < 0.01
