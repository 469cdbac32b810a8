"""Diffusers models as the sweep's diffusion network: tiny, randomly initialised UNet2DModels saved with
save_pretrained beside a scheduler config, read from JSON + safetensors only (offline, CPU)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.diffusion import (
    GuidedDenoiser,
    NoiseSchedule,
    OptionError,
    SamplerOptions,
    keyed_normal,
    respaced_timesteps,
    sample,
    sample_keys,
)

from .helpers import ROOT, fit

diffusers = pytest.importorskip("diffusers")  # the `bench` extra

from lightning_modules.sweep.diffusers_models import load_diffusers, schedule_from_config  # noqa: E402


def tiny_unet(num_class_embeds: int | None, seed: int, out_channels: int = 1):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(16, 32),
                                 layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=num_class_embeds)
    with torch.no_grad():  # zero-initialised layers too: the output depends on x, t and the label
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def save_model(path: Path, unet, scheduler=None) -> Path:
    unet.save_pretrained(path)  # config.json + diffusion_pytorch_model.safetensors
    (scheduler or diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(path)
    return path


@pytest.mark.parametrize("config, kind", [
    ({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000}, "linear"),
    ({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 50},
     "linear(0.0001,0.02)"),  # not this framework's 'linear', which rescales β by 1000/T
    ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000},
     "scaled_linear(0.00085,0.012)"),
    ({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}, "cosine"),
])
def test_scheduler_configs_become_the_same_noise_schedule(config, kind):
    schedule, timesteps, prediction = schedule_from_config({**config, "prediction_type": "v_prediction"},
                                                           Path("scheduler_config.json"), "diffusion")
    assert (schedule, timesteps, prediction) == (kind, config["num_train_timesteps"], "v")
    theirs = diffusers.DDPMScheduler(**config).alphas_cumprod.double()  # float32 there, float64 here
    torch.testing.assert_close(NoiseSchedule(schedule, timesteps).alphas_cumprod, theirs, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("key, value", [("prediction_type", "sample"), ("variance_type", "learned_range"),
                                        ("trained_betas", [0.1, 0.2]), ("beta_schedule", "sigmoid")])
def test_unsupported_scheduler_settings_are_named(key, value):
    with pytest.raises(OptionError, match=rf"`{key}`"):
        schedule_from_config({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                              "num_train_timesteps": 1000, key: value}, Path("scheduler_config.json"), "diffusion")


@pytest.mark.parametrize("prediction, beta_schedule, scale, clip", [
    # Unguided (the conditional model), clipped on both sides: at ᾱ_{T−1} ≈ 0 of the cosine schedule an unclipped
    # x̂0 of a random network reaches ~10³, where float32 rounding alone exceeds 1e-4.
    ("epsilon", "squaredcos_cap_v2", 1.0, True),
    ("epsilon", "linear", 2.0, False),  # CFG at s = 2, no clipping
    ("v_prediction", "scaled_linear", 2.0, True),  # v-prediction, x̂0 clipped (and ε recomputed) on both sides
])
def test_ddim_here_equals_a_diffusers_ddim_loop(tmp_path, prediction, beta_schedule, scale, clip):
    """On the full chain (steps = T), where the two step grids coincide. This framework's DDIM walks
    `respaced_timesteps`, T−1 → 0 evenly rounded, then to ᾱ = 1; diffusers' DDIM steps down by T // steps from
    where its `timestep_spacing` puts the grid: for T = 50 and 5 steps its default "leading" walks 40, 30, 20, 10,
    0, this framework 49, 37, 24, 12, 0. The grids are the same only when every training step is a sampling step."""
    T, unet = 20, tiny_unet(4, seed=0)  # 3 classes + the null label
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, beta_start=0.001,
                                        beta_end=0.1, prediction_type=prediction, clip_sample=clip)
    network = load_diffusers(save_model(tmp_path / "model", unet, scheduler))
    assert network.hparams["num_classes"] == 3
    assert network.hparams["prediction"] == {"epsilon": "eps", "v_prediction": "v"}[prediction]
    labels, keys = torch.tensor([0, 1, 2, 0, 1, 2]), sample_keys(0, torch.arange(6))
    x, null = keyed_normal(keys, 0, (1, 8, 8)), torch.full_like(labels, 3)  # the initial noise of both loops
    with torch.no_grad():  # non-trivial: the label changes the prediction, so CFG at s = 2 guides
        assert not torch.allclose(network.net(x, torch.full((6,), T - 1), labels),
                                  network.net(x, torch.full((6,), T - 1), null), atol=1e-3)
    den = GuidedDenoiser(network.net, NoiseSchedule(network.hparams["schedule"], T), labels, 3, "cfg", scale,
                         prediction=network.hparams["prediction"])
    ours = sample(den, (1, 8, 8), keys, SamplerOptions(sampler="ddim", steps=T, eta=0.0, clip_x0=clip))

    scheduler.set_timesteps(T)
    assert scheduler.timesteps.tolist() == respaced_timesteps(T, T)
    with torch.no_grad():
        for t in scheduler.timesteps:
            cond, uncond = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
            guided = uncond + scale * (cond - uncond)
            x = scheduler.step(guided, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(ours, x.clamp(-1, 1) if clip else x, atol=1e-4, rtol=0)


def test_the_identity_holds_the_weights_and_the_schedule(tmp_path):
    a = save_model(tmp_path / "a", tiny_unet(11, seed=1))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    diffusers.DDIMScheduler(beta_schedule="scaled_linear").save_pretrained(b)  # the same weights, another schedule
    first, second = load_diffusers(a, num_classes=10), load_diffusers(b, num_classes=10)
    assert first.hparams["schedule"] == "cosine" and second.hparams["schedule"].startswith("scaled_linear(")
    assert first.sha != second.sha and len(first.sha) == 16
    assert load_diffusers(a, num_classes=10).sha == first.sha  # a content hash: the same files, the same identity


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    return {"conditional": save_model(root / "cond", tiny_unet(11, seed=1)),  # digits: 10 classes + the null label
            "guide": save_model(root / "guide", tiny_unet(11, seed=2)),
            "unconditional": save_model(root / "uncond", tiny_unet(None, seed=3)),
            "classifier": fit("classifier", root / "cls"),  # digits, cosine, T = 1000: squaredcos_cap_v2's schedule
            "cache": root / "cache", "root": root}


def argv(model: Path, out: Path, cache: Path, scales: dict, *extra: str) -> list[str]:
    return ["--diffusion", str(model), "--dataset", "digits", "--sweep.methods", json.dumps(list(scales)),
            "--sweep.scales", json.dumps(scales), "--sweep.num_samples", "12", "--sweep.sampling.steps", "2",
            "--sweep.seeds", "[0]", "--sweep.output_dir", str(out), "--sweep.cache_dir", str(cache),
            "--sweep.progress", "false", *extra]


def test_cfg_cg_and_autoguidance_sweep_a_conditional_diffusers_model(trained, tmp_path):
    from experiments.sweep import sweep

    scales = {"cfg": [0.0, 2.0], "cg_cond": [1.0], "autoguidance": [2.0]}
    rows = sweep(argv(trained["conditional"], tmp_path / "out", trained["cache"], scales,
                      "--sweep.classifier_ckpt", str(trained["classifier"]),
                      "--sweep.guide_ckpt", str(trained["guide"]))).outcome.rows
    by = {(r["method"], r["scale"]): r for r in rows}
    assert sorted(by) == [("autoguidance", 2.0), ("cfg", 0.0), ("cfg", 2.0), ("cg_cond", 1.0)]
    assert {r["diffusion_sha"] for r in rows} == {load_diffusers(trained["conditional"], num_classes=10).sha}
    assert by[("autoguidance", 2.0)]["guide_sha"] == load_diffusers(trained["guide"], num_classes=10).sha
    assert (by[("cfg", 2.0)]["nfe_per_sample"], by[("cg_cond", 1.0)]["classifier_grads_per_sample"],
            by[("autoguidance", 2.0)]["guide_evals_per_sample"]) == (4.0, 2.0, 2.0)
    assert all(r["fid"] == r["fid"] for r in rows)  # scored (not NaN)


def test_classifier_guidance_sweeps_an_unconditional_diffusers_model(trained, tmp_path):
    """Dhariwal & Nichol's own setting: an unconditional model guided by a noisy classifier of its schedule."""
    from experiments.sweep import sweep

    rows = sweep(argv(trained["unconditional"], tmp_path / "out", trained["cache"],
                      {"cg_cond": [0.0, 4.0], "cg_uncond": [4.0]},
                      "--sweep.classifier_ckpt", str(trained["classifier"]))).outcome.rows
    by = {(r["method"], r["scale"]): r for r in rows}
    assert sorted(by) == [("cg_cond", 0.0), ("cg_cond", 4.0), ("cg_uncond", 4.0)]
    assert by[("cg_cond", 4.0)]["classifier_grads_per_sample"] == 2.0
    assert by[("cg_cond", 0.0)]["classifier_grads_per_sample"] == 0.0


def _unconditional(trained, tmp_path):
    return trained["unconditional"]


def _no_scheduler(trained, tmp_path):
    path = tmp_path / "no-scheduler"
    shutil.copytree(trained["conditional"], path)
    (path / "scheduler_config.json").unlink()
    return path


def _learned_variance(trained, tmp_path):
    return save_model(tmp_path / "learned", tiny_unet(11, seed=4, out_channels=2),
                      diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range"))


def _another_schedule(trained, tmp_path):
    return save_model(tmp_path / "linear", tiny_unet(11, seed=5), diffusers.DDIMScheduler(beta_schedule="linear"))


def _no_null_row(trained, tmp_path):
    return save_model(tmp_path / "ten", tiny_unet(10, seed=6))


def _pickled_only(trained, tmp_path):
    path = tmp_path / "bin"
    tiny_unet(11, seed=7).save_pretrained(path, safe_serialization=False)
    diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(path)
    return path


@pytest.mark.parametrize("make, scales, extra, message", [
    (_unconditional, {"cfg": [2.0]}, [], r"sweep\.methods.*cfg: at scale 2 it combines the conditional and "
                                         r"null-label .*unconditional.*\['none', 'cg_cond', 'cg_uncond'"),
    (_unconditional, {"fbg": [2.0]}, [], r"sweep\.methods.*fbg.*unconditional"),
    (_no_scheduler, {"cfg": [2.0]}, [], r"option `diffusion`.*scheduler_config\.json"),
    (_learned_variance, {"cfg": [2.0]}, [], r"option `diffusion`.*`out_channels` = 2"),
    (_another_schedule, {"cg_cond": [1.0]}, ["--sweep.classifier_ckpt"], r"sweep\.classifier_ckpt.*schedule"),
    (_no_null_row, {"cfg": [2.0]}, [], r"`num_class_embeds` = 10.*11 rows"),
    (_pickled_only, {"cfg": [2.0]}, [], r"only a pickled \.bin"),
    (_unconditional, {"cfg": [2.0]}, ["--dataset"], r"option `dataset`.*records no data set"),
    (lambda trained, tmp_path: trained["conditional"], {"pag": [1.0]}, [], r"sweep\.methods.*pag.*perturbation"),
    (lambda trained, tmp_path: trained["conditional"], {"autoguidance": [2.0]}, ["--sweep.guide_ckpt=snapshot:1/16"],
     r"sweep\.guide_ckpt.*has none"),
])
def test_bad_diffusers_inputs_stop_before_any_sampling(trained, tmp_path, monkeypatch, make, scales, extra, message):
    import experiments.sweep as sweep_cli

    monkeypatch.setattr(sweep_cli, "build_evaluation", lambda *a, **k: pytest.fail("the evaluation was built"))
    monkeypatch.setattr(sweep_cli, "sweep_and_report", lambda *a, **k: pytest.fail("sampling started"))
    args = argv(make(trained, tmp_path), tmp_path / "out", trained["cache"], scales)
    if extra[:1] == ["--sweep.classifier_ckpt"]:
        args += [*extra, str(trained["classifier"])]
    elif extra == ["--dataset"]:
        args = args[:2] + args[4:]  # without --dataset digits
    else:
        args += extra
    with pytest.raises(OptionError, match=message):
        sweep_cli.sweep(args)
    assert not (tmp_path / "out" / "sweep.csv").exists()


def test_the_readme_model_line_writes_a_model_the_sweep_loads(tmp_path):
    """The README's `python -c` line, run as written, writes a directory this framework loads."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Sweep a diffusers model", 1)[1].split("\n## ", 1)[0]
    (line,) = re.findall(r"^python -c .*$", section, flags=re.M)
    import shlex

    subprocess.run([sys.executable, *shlex.split(line)[1:]], cwd=tmp_path, check=True, capture_output=True)
    (model,) = re.findall(r"--diffusion (\S+)", section)
    network = load_diffusers(tmp_path / model, num_classes=10)
    assert network.hparams["schedule"] == "cosine" and network.hparams["conditional"]
