"""Two CPU processes (gloo DDP), the same code path as multi-GPU: fits and the sweep."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from .helpers import CONFIGS, FAST_TRAINER, ROOT, TINY_NET, fit, sweep_args

DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
pytestmark = pytest.mark.slow


def run_cli(args, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "experiments.train", *args], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ddp_fit_advances_on_both_ranks_and_resumes(tmp_path):
    args = ["fit", "--config", str(CONFIGS / "digits_diffusion.yaml"), *TINY_NET, *FAST_TRAINER, *DDP,
            "--data.batch_size=64"]
    run_cli([*args, "--trainer.max_steps=4", f"--trainer.logger.init_args.save_dir={tmp_path}"], tmp_path)
    (last,) = tmp_path.glob("guidelab/*/checkpoints/last.ckpt")
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    # Both ranks hold identical (all-reduced) weights and identical EMA: the checkpoint is rank 0's,
    # and resuming continues its step count.
    ema_before = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("ema_net.")}
    run_cli([*args, "--trainer.max_steps=6", f"--trainer.logger.init_args.save_dir={tmp_path / 'resumed'}",
             f"--ckpt_path={last}"], tmp_path)
    (resumed,) = (tmp_path / "resumed").glob("guidelab/*/checkpoints/last.ckpt")
    after = torch.load(resumed, map_location="cpu", weights_only=False)
    assert after["global_step"] == 6
    assert any(not torch.equal(after["state_dict"][k], v) for k, v in ema_before.items())


def test_ddp_sweep_equals_single_process_with_uneven_split(tmp_path):
    cls, diff = fit("classifier", tmp_path / "cls"), fit("diffusion", tmp_path / "diff")
    scales = {"cfg": [0.0, 2.0], "cg_cond": [1.0], "apg": [2.0], "autoguidance": [2.0], "icg": [2.0], "tsg": [2.0],
              "pag": [1.0], "seg": [1.0], "autoguidance_degraded": [2.0], "cfg_zero_star": [2.0], "fbg": [3.0]}
    # 31 samples per cell: 2 ranks get 16 and 15 items of each pass. Dynamic thresholding is summed across
    # ranks like the features; autoguidance takes the fit's own snapshot as its guide.
    extra = ["--sweep.num_samples=31", "--sweep.guide_ckpt=snapshot:1/4", "--sweep.sampling.threshold=0.995"]
    single = sweep_args(diff, cls, tmp_path / "one", tmp_path / "cache", tmp_path / "l1", scales, extra)
    double = sweep_args(diff, cls, tmp_path / "two", tmp_path / "cache", tmp_path / "l2", scales, [*extra, *DDP])
    run_cli(single, tmp_path)
    run_cli(double, tmp_path)
    rows1 = list(csv.DictReader(open(tmp_path / "one" / "sweep.csv")))
    rows2 = list(csv.DictReader(open(tmp_path / "two" / "sweep.csv")))
    assert len(rows1) == len(rows2) == 12  # rank 0 alone wrote: no duplicated rows
    for a, b in zip(rows1, rows2):
        assert (a["method"], a["scale"], a["num_samples"]) == (b["method"], b["scale"], b["num_samples"])
        for metric in ("fid", "kid", "score", "precision", "recall", "accuracy", "thresholded_fraction"):
            assert float(a[metric]) == pytest.approx(float(b[metric]), rel=1e-4, abs=1e-5), metric
        if a["method"] == "fbg":  # its mean λ per step, gathered across ranks like the features
            assert json.loads(a["guidance_trace"])["lambda"] == pytest.approx(json.loads(b["guidance_trace"])["lambda"])
    assert len(list((tmp_path / "l2" / "wandb").glob("offline-run-*"))) == 1  # only rank 0 logs to W&B
