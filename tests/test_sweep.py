"""End to end on tiny digits models: both fits through the CLI, then the guidance sweep."""

import csv
import os
import subprocess
import sys

import pytest
import torch

from experiments.train import main
from lightning_modules import ConditionalDiffusion, NoisyClassifier
from lightning_modules.diffusion import OptionError, SamplerOptions
from lightning_modules.sweep import SweepConfig

from .helpers import CONFIGS, FAST_TRAINER, ROOT, TINY_NET, fit, sweep_args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    return {
        "classifier": fit("classifier", root / "cls"),
        "diffusion": fit("diffusion", root / "diff"),
        "cache": root / "cache",
        "root": root,
    }


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fits_write_checkpoints_and_classifier_quartile_metrics(trained):
    ckpt = torch.load(trained["classifier"], map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    hp = NoisyClassifier.load_from_checkpoint(trained["classifier"]).hparams
    assert (hp.num_classes, hp.image_size, hp.channels, hp.schedule, hp.timesteps) == (10, 8, 1, "cosine", 1000)
    model = ConditionalDiffusion.load_from_checkpoint(trained["diffusion"])
    assert model.null_label == 10 and model.net.class_embed.num_embeddings == 11
    assert any(k.startswith("ema_net.") for k in torch.load(trained["diffusion"], weights_only=False)["state_dict"])


def test_classifier_logs_loss_and_accuracy_per_timestep_quartile(tmp_path):
    cli = main(
        [
            "fit",
            "--config",
            "configs/experiments/digits_classifier.yaml",
            "--model.init_args.base_channels=16",
            "--trainer.max_steps=5",
            "--data.batch_size=256",
            "--trainer.limit_val_batches=2",
            "--trainer.check_val_every_n_epoch=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    logged = cli.trainer.logged_metrics
    for stage in ("train", "val"):
        for q in range(4):
            assert f"{stage}/acc_q{q}" in logged and f"{stage}/loss_q{q}" in logged
    assert "train/loss" in logged and "val/acc" in logged


def test_sweep_writes_every_cell_resumes_and_logs_offline(trained, tmp_path):
    out = tmp_path / "sweep"
    args = sweep_args(trained["diffusion"], trained["classifier"], out, trained["cache"], tmp_path / "logs")
    # A fresh process, as a user runs it: W&B's mode is read once per process.
    env = {**os.environ, "WANDB_MODE": "offline"}
    subprocess.run(
        [sys.executable, "-m", "experiments.train", *args], env=env, check=True, cwd=ROOT, capture_output=True
    )
    rows = read_rows(out / "sweep.csv")
    assert sorted((r["method"], float(r["scale"])) for r in rows) == [
        ("cfg", 0.0),
        ("cfg", 2.0),
        ("cg_cond", 0.0),
        ("cg_cond", 3.0),
        ("cg_uncond", 2.0),
    ]
    required = [
        "method",
        "scale",
        "gamma",
        "seed",
        "num_samples",
        "steps",
        "nfe_per_sample",
        "classifier_grads_per_sample",
        "fid",
        "kid",
        "score",
        "precision",
        "recall",
        "accuracy",
        "seconds",
    ]
    assert all(c in rows[0] for c in required)
    by = {(r["method"], float(r["scale"])): r for r in rows}
    assert (
        float(by[("cfg", 2.0)]["nfe_per_sample"]) == 6 and float(by[("cfg", 2.0)]["classifier_grads_per_sample"]) == 0
    )
    assert float(by[("cg_cond", 3.0)]["nfe_per_sample"]) == 3
    assert float(by[("cg_cond", 3.0)]["classifier_grads_per_sample"]) == 3
    assert float(by[("cg_cond", 3.0)]["gamma"]) == 4.0
    # Paired noise: CFG at s=1 would equal cg_cond at 0; here cg_cond s=0 is the plain conditional model.
    for name in (
        "sweep.json",
        "metrics_vs_scale.png",
        "metrics_vs_gamma.png",
        "front_fid_vs_accuracy.png",
        "front_precision_vs_recall.png",
    ):
        assert (out / name).exists(), name
    assert all((out / r["grid"]).stat().st_size > 0 for r in rows)
    assert {r["diffusion_step"] for r in rows} == {"6"} and {r["classifier_step"] for r in rows} == {"6"}
    assert len({r["diffusion_sha"] for r in rows}) == 1 and len(rows[0]["diffusion_sha"]) == 16
    assert list((tmp_path / "logs" / "wandb").glob("offline-run-*")), "no offline W&B run written"

    # Kill half-way: keep the first two cells, rerun: the missing cells are sampled, the kept ones are not
    # (a recomputed cell would add a row).
    lines = (out / "sweep.csv").read_text().splitlines()
    (out / "sweep.csv").write_text("\n".join(lines[:3]) + "\n")
    kept = read_rows(out / "sweep.csv")
    main(args)
    rows2 = read_rows(out / "sweep.csv")
    assert len(rows2) == 5 and rows2[:2] == kept
    cells = sorted((r["method"], float(r["scale"])) for r in rows)
    assert sorted((r["method"], float(r["scale"])) for r in rows2) == cells


def test_same_seeds_give_same_metrics(trained, tmp_path):
    scales = {"cfg": [1.5]}
    a = main(
        sweep_args(
            trained["diffusion"], trained["classifier"], tmp_path / "a", trained["cache"], tmp_path / "la", scales
        )
    )
    b = main(
        sweep_args(
            trained["diffusion"], trained["classifier"], tmp_path / "b", trained["cache"], tmp_path / "lb", scales
        )
    )
    ra, rb = read_rows(tmp_path / "a" / "sweep.csv"), read_rows(tmp_path / "b" / "sweep.csv")
    assert ra[0]["fid"] == rb[0]["fid"] and ra[0]["accuracy"] == rb[0]["accuracy"]
    assert a.trainer is not b.trainer


def test_incompatible_classifier_fails_before_sampling(trained, tmp_path):
    other = fit("classifier", tmp_path / "cls_linear", steps=2, extra=["--model.init_args.schedule=linear"])
    with pytest.raises(ValueError, match="schedule"):
        main(sweep_args(trained["diffusion"], other, tmp_path / "s", trained["cache"], tmp_path / "l"))
    assert not (tmp_path / "s" / "sweep.csv").exists()


def test_classifier_guidance_without_checkpoint_is_a_clear_error():
    with pytest.raises(ValueError, match="classifier_ckpt"):
        SweepConfig(methods=["cg_cond"])
    with pytest.raises(ValueError, match="reduce-overhead"):  # names the valid compile modes
        SweepConfig(methods=["cfg"], sampling=SamplerOptions(compile="fastest"))


def test_sweep_runs_every_n_epochs_during_fit_and_at_the_end(trained, tmp_path):
    args = ["fit", "--config", str(CONFIGS / "digits_diffusion.yaml"), *TINY_NET, *FAST_TRAINER,
            "--config", str(CONFIGS / "digits_sweep.yaml"), "--trainer.max_steps=10", "--data.batch_size=256",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--sweep.methods=[cfg]", '--sweep.scales={"cfg": [1.0]}',
            "--sweep.every_n_epochs=1", "--sweep.num_samples=10", "--sweep.sampling.steps=2", "--sweep.seeds=[0]",
            "--sweep.progress=false",
            f"--sweep.cache_dir={trained['cache']}"]
    cli = main(args)
    (csv_path,) = tmp_path.glob("guidelab/*/sweep/sweep.csv")  # next to the run's checkpoints/
    steps = [int(r["diffusion_step"]) for r in read_rows(csv_path)]
    assert steps == [5, 10]  # after epoch 1 and epoch 2; the end-of-fit sweep finds step 10 already done
    assert cli.trainer.global_step == 10


@pytest.mark.parametrize("bad", ["--sweep.sampling.steps=0", '--sweep.scales={"cfg": [1.0, NaN]}',
                                 '--sweep.scales={"cgf": [1.0]}', "--sweep.num_samples=1",
                                 "--sweep.guidance.interval=[600, 100]"])
def test_fit_with_a_bad_sweep_option_fails_before_training(tmp_path, bad):
    args = ["fit", "--config", str(CONFIGS / "digits_diffusion.yaml"), *TINY_NET, *FAST_TRAINER,
            "--trainer.max_steps=2", f"--trainer.logger.init_args.save_dir={tmp_path}", "--sweep.methods=[cfg]", bad]
    with pytest.raises((OptionError, SystemExit)):
        main(args)
    assert not list(tmp_path.rglob("*.ckpt"))  # no training step ran


def test_a_corrupt_ckpt_path_names_the_file_before_anything_runs(trained, tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(trained["diffusion"].read_bytes()[:5000])
    args = sweep_args(bad, trained["classifier"], tmp_path / "s", trained["cache"], tmp_path / "l")
    with pytest.raises(OptionError, match=r"broken\.ckpt"):
        main(args)
    assert not (tmp_path / "s" / "sweep.csv").exists()


def test_trainer_free_sweep_command_ends_with_the_summary_and_paths(trained, tmp_path, capsys):
    from experiments.sweep import main as sweep_main

    argv = ["--diffusion", str(trained["diffusion"]), "--config", str(CONFIGS / "digits_sweep.yaml"),
            "--sweep.classifier_ckpt", str(trained["classifier"]), "--sweep.methods", "[cfg, cg_cond, cg_uncond]",
            "--sweep.scales",
            '{"cfg": [0, 2], "cg_cond": [1], "cg_uncond": [2]}', "--sweep.num_samples", "12",
            "--sweep.sampling.steps", "2", "--sweep.seeds", "[0]", "--sweep.output_dir", str(tmp_path / "out"),
            "--sweep.cache_dir", str(trained["cache"]), "--sweep.progress", "false"]
    rows = sweep_main(argv)
    out = capsys.readouterr().out
    assert "Best FID per method" in out and str(tmp_path / "out" / "sweep.csv") in out
    assert len(rows) == 4 and {r["diffusion_step"] for r in rows} == {6}
    # The same checkpoint through the Lightning callback lands on the same cells (same signature).
    main(sweep_args(trained["diffusion"], trained["classifier"], tmp_path / "out", trained["cache"],
                    tmp_path / "logs", {"cfg": [0.0, 2.0], "cg_cond": [1.0], "cg_uncond": [2.0]},
                    ["--sweep.num_samples=12", "--sweep.sampling.steps=2"]))
    assert len(read_rows(tmp_path / "out" / "sweep.csv")) == 4  # nothing recomputed


def test_fit_keeps_guide_snapshots_and_the_sweep_names_them(trained, tmp_path):
    from experiments.sweep import main as sweep_main

    checkpoints = trained["diffusion"].parent
    steps = {f: torch.load(checkpoints / f"guide-{f}.ckpt", weights_only=True)["global_step"]
             for f in ("1of16", "1of8", "1of4")}
    assert steps == {"1of16": 1, "1of8": 1, "1of4": 2}  # round(6/16), round(6/8), round(6/4), at least 1
    rows = sweep_main(["--diffusion", str(trained["diffusion"]), "--sweep.methods", "[autoguidance]",
                       "--sweep.scales", '{"autoguidance": [1.0, 2.0]}', "--sweep.guide_ckpt", "snapshot:1/4",
                       "--sweep.num_samples", "8", "--sweep.sampling.steps", "2", "--sweep.output_dir",
                       str(tmp_path / "ag"), "--sweep.cache_dir", str(trained["cache"]), "--sweep.progress", "false"])
    assert {r["guide_step"] for r in rows} == {2} and len({r["guide_sha"] for r in rows}) == 1
    assert {r["scale"]: r["guide_evals_per_sample"] for r in rows} == {1.0: 0.0, 2.0: 2.0}


def test_trainer_free_sweep_rejects_an_incompatible_guide_before_sampling(trained, tmp_path, monkeypatch):
    """experiments.sweep checks the guide against the diffusion model when it loads it, as the callback does:
    a guide of another noise schedule fails with the option and the file named, before any sampling."""
    import experiments.sweep as sweep_cli

    ckpt = torch.load(trained["diffusion"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["schedule"] == "cosine"
    ckpt["hyper_parameters"]["schedule"] = "linear"  # same weights, so only the compatibility check can object
    guide = tmp_path / "linear_guide.ckpt"
    torch.save(ckpt, guide)
    monkeypatch.setattr(sweep_cli, "sweep_and_report", lambda *args, **kwargs: pytest.fail("sampling started"))
    out = tmp_path / "out"
    with pytest.raises(OptionError, match=r"sweep\.guide_ckpt.*linear_guide\.ckpt.*schedule"):
        sweep_cli.main(["--diffusion", str(trained["diffusion"]), "--sweep.methods", "[autoguidance]",
                        "--sweep.guide_ckpt", str(guide), "--sweep.num_samples", "8", "--sweep.sampling.steps", "2",
                        "--sweep.output_dir", str(out), "--sweep.cache_dir", str(trained["cache"]),
                        "--sweep.progress", "false"])
    assert not (out / "sweep.csv").exists()
