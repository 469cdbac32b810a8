"""experiments/benchmark.py: every printed line is JSON with the expected keys, at the tiniest setting on CPU."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from experiments import benchmark

TINY = ["--device", "cpu", "--small", "--iters", "1", "--warmup", "0", "--base-channels", "32",
        "--train-batch", "2", "--sample-batch", "2"]
MEASURED = {"bench", "impl", "compile", "dtype", "batch", "params_m", "images_per_s", "ms_per_iter",
            "gflops_per_image", "achieved_tflops", "mfu"}


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_tiny_run_prints_json_lines(capsys, monkeypatch, tmp_path):
    # diffusers made unimportable: the peer must be reported as skipped, not crash the run
    monkeypatch.setitem(sys.modules, "diffusers", None)
    out = tmp_path / "bench.jsonl"
    returned = benchmark.main([*TINY, "--peer", "--out", str(out)])
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
    sweep = next(r for r in printed if r.get("bench") == "sweep")
    assert {"methods", "scales", "samples_per_cell", "steps", "seconds", "images", "cost"} <= set(sweep)
    assert sweep["images"] == len(sweep["methods"]) * len(sweep["scales"]) * sweep["samples_per_cell"]
    # CFG with scales != 1 costs two network evaluations per step, CG one plus a classifier gradient
    assert sweep["cost"]["cfg"] == {"nfe_per_sample": 2.0 * sweep["steps"], "classifier_grads_per_sample": 0.0}
    assert sweep["cost"]["cg_cond"]["classifier_grads_per_sample"] == sweep["steps"]
    assert not any(r.get("bench") == "ratio" for r in printed)  # no peer, no ratio


def test_defaults():
    args = benchmark.parse_args(["--device", "cpu", "--small"])
    assert (args.train_batch, args.sample_batch, args.compile, args.dtype) == (8, 16, "off", "fp32")
    full = benchmark.parse_args(["--device", "cpu"])
    assert (full.train_batch, full.sample_batch, full.base_channels) == (128, 512, 128)


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
