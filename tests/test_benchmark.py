"""experiments/benchmark.py: every printed line is JSON with the expected keys, at the tiniest setting on CPU,
and the sweep's cost accounting (network evaluations, classifier passes) is what the maths demands."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from experiments import bench_sweep, benchmark
from lightning_modules.diffusion import NoiseSchedule
from lightning_modules.networks import EncoderClassifier, UNet

TINY = ["--device", "cpu", "--small", "--iters", "1", "--warmup", "0", "--base-channels", "32",
        "--train-batch", "2", "--sample-batch", "2"]
# Two cells (one scale per method: Inception FID's 2048-d eigvals cost seconds per cell on CPU), chunks of
# 3 + 1 images per method, so the full chunk and the last chunk both run.
TINY_SWEEP = ["--sweep-scales", "3", "--sweep-samples", "4", "--sweep-batch", "3", "--sweep-steps", "2"]
MEASURED = {"bench", "impl", "compile", "dtype", "batch", "params_m", "images_per_s", "ms_per_iter",
            "gflops_per_image", "achieved_tflops", "mfu"}
SWEEP = {"bench", "impl", "methods", "scales", "samples_per_cell", "cells", "sampler", "steps", "images", "seconds",
         "images_per_s", "seconds_per_method", "cost", "compile", "batch", "sampling_seconds", "metrics_seconds",
         "warmup_seconds", "network_evaluations", "classifier_passes", "mfu", "inception_weights", "metrics"}


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
    assert {"peer": "skipped", "reason": benchmark.PEER_HINT} in printed
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
    assert step["ms_per_step"] > 0 and step["images_per_s"] == pytest.approx(2e3 / step["ms_per_step"], rel=1e-2)

    sweep = next(r for r in printed if r.get("bench") == "sweep")
    assert SWEEP <= set(sweep), SWEEP - set(sweep)
    n, k = sweep["samples_per_cell"], sweep["steps"]
    assert (n, k, sweep["batch"], sweep["compile"]) == (4, 2, 3, "none")
    assert sweep["methods"] == ["cfg", "cg_cond"] and sweep["scales"] == {"cfg": [3.0], "cg_cond": [3.0]}
    assert sweep["cells"] == 2 and sweep["images"] == n * 1 * 2
    # CFG at s != 0, 1 costs two network evaluations per step (one batched 2B forward), CG one evaluation plus
    # one classifier forward+backward per step, in every chunk
    assert sweep["cost"] == {"cfg": {"nfe_per_sample": 2.0 * k, "classifier_grads_per_sample": 0.0},
                             "cg_cond": {"nfe_per_sample": 1.0 * k, "classifier_grads_per_sample": 1.0 * k}}
    per_method = sweep["images"] // 2
    assert sweep["network_evaluations"] == per_method * (2 * k + k)
    assert sweep["classifier_passes"] == per_method * k
    flops = 1e9 * (sweep["gflops_per_network_evaluation"] * sweep["network_evaluations"]
                   + sweep["gflops_per_classifier_pass"] * sweep["classifier_passes"])
    assert sweep["sampling_tflops"] * 1e12 == pytest.approx(flops / sweep["sampling_seconds"], rel=0.02)
    assert sweep["mfu"] is None  # no CPU peak
    assert 0 < sweep["sampling_seconds"] and 0 < sweep["metrics_seconds"] and sweep["warmup_seconds"] > 0
    assert sweep["sampling_seconds"] + sweep["metrics_seconds"] <= sweep["seconds"] * 1.01
    assert sum(sweep["seconds_per_method"].values()) == pytest.approx(sweep["seconds"], abs=0.05)
    assert sweep["inception_weights"] == bench_sweep.RANDOM_INCEPTION and sweep["reference_images"] == n
    # metrics really ran: one row per cell, every metric finite (accuracy is None: Inception's classes)
    assert [(c["method"], c["scale"]) for c in sweep["metrics"]] == [("cfg", 3.0), ("cg_cond", 3.0)]
    for cell in sweep["metrics"]:
        for key in ("fid", "kid", "kid_std", "score", "precision", "recall"):
            assert cell[key] is not None and math.isfinite(cell[key]), (key, cell)
        assert cell["fid"] > 0 and cell["accuracy"] is None


class ZeroExtractor:
    """Stands in for Inception where only sampling and its cost accounting are under test."""

    extractor_id, num_features = "zeros", 4

    def extract(self, x):
        return torch.zeros(len(x), 4), torch.zeros(len(x), 3)


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    net = UNet(8, 1, 10, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,)).eval()
    clf = EncoderClassifier(8, 1, 10, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                            attention_resolutions=(4,), pool="attention").eval().requires_grad_(False)
    return bench_sweep.SweepModels(net, clf, NoiseSchedule("linear", 1000), 10, (1, 8, 8))


def test_chunk_costs_follow_the_chunk_contents(tiny_models):
    """Item i is sample i % n at scale i // n: a chunk holding only s_cfg = 1 runs the conditional branch
    alone (1 evaluation per step), one holding s_cfg = 3 the batched 2B forward (2 per step)."""
    args = benchmark.parse_args(TINY)
    cpu, steps, n = torch.device("cpu"), 3, 2
    assert bench_sweep.chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    ranges = bench_sweep.chunk_ranges(n * 2, 2)  # chunk 0 = scale 1.0, chunk 1 = scale 3.0
    clock = bench_sweep.PhaseClock(cpu)
    nfe, grads, feats, logits = bench_sweep.sample_chunks(tiny_models, "cfg", (1.0, 3.0), n, ranges, steps, args,
                                                          clock, ZeroExtractor())
    assert (nfe, grads) == (n * steps + n * 2 * steps, 0.0) and feats.shape == (4, 4) and logits.shape == (4, 3)
    assert set(clock.seconds) == {"sampling", "metrics"}
    # both chunks need their own graph (different step modes) ...
    assert bench_sweep.warmup_ranges(tiny_models, "cfg", (1.0, 3.0), n, ranges, steps, cpu) == ranges
    # ... while chunks of one size and mode share one: a full chunk and the last, smaller one
    ranges = bench_sweep.chunk_ranges(4 * 2, 3)
    assert bench_sweep.warmup_ranges(tiny_models, "cfg", (2.0, 3.0), 4, ranges, steps, cpu) == [(0, 3), (6, 8)]
    nfe, grads, _, _ = bench_sweep.sample_chunks(tiny_models, "cg_cond", (0.0, 2.0), 4, ranges, steps, args,
                                                 clock, ZeroExtractor())
    # CG: one network evaluation per step everywhere; the classifier only runs in chunks with a nonzero scale
    # (items 0-2 are all at s_cg = 0, items 3-7 at s_cg = 2)
    assert (nfe, grads) == (8 * steps, 5 * steps)


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
    full = benchmark.parse_args(["--device", "cpu"])
    assert (full.train_batch, full.sample_batch, full.base_channels) == (128, 512, 128)
    # the issue-5 target: 10k samples x 8 scales x {CFG, CG}, 50 DDIM steps, in chunks of 2048
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
    assert benchmark.ratios(recs) == [{"bench": "ratio", "of": "train", "compile": False, "dtype": "bf16",
                                       "ours_over_peer": 1.5}]


def test_peer_has_our_size():
    pytest.importorskip("diffusers")
    ours, peer = benchmark.build_ours(128), benchmark.build_peer(128)
    n_ours, n_peer = (sum(p.numel() for p in m.parameters()) for m in (ours, peer))
    assert 35e6 < n_ours < 39e6 and abs(n_ours - n_peer) / n_ours < 0.01
