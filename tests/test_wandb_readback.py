"""Read an offline W&B run back (the `.wandb` transaction log, see helpers.read_wandb_run) and check what a
researcher sees: names, group, job type, tags; one config key per option; a summary holding each method's
best scale (not the last cell logged); one series per seed; tables, custom charts, images; sample grids
logged during training."""

from __future__ import annotations

import csv
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import CONFIGS, FAST_TRAINER, ROOT, TINY_NET, WandbRun, fit, offline_runs, sweep_args

pytestmark = pytest.mark.slow  # two fresh processes (W&B's mode is read once per process) and a 2-seed sweep

SCALES = {"cfg": [0.0, 2.0], "cg_cond": [0.0, 3.0], "cg_uncond": [2.0]}
METRICS = ("fid", "kid", "score", "precision", "recall", "accuracy")
GROUP = "readback-study"


def naming(name: str, job_type: str) -> list[str]:
    return [f"--trainer.logger.init_args.name={name}", f"--trainer.logger.init_args.group={GROUP}",
            f"--trainer.logger.init_args.job_type={job_type}", "--trainer.logger.init_args.tags=[digits, test]"]


def offline(args: list[str], silent: bool = True) -> str:
    """`python -m experiments.train ...` in a fresh process with WANDB_MODE=offline, as a user runs it; its
    stdout + stderr."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"} | {"WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env | ({"WANDB_SILENT": "true"} if silent else {}))
    if done.returncode:
        pytest.fail(f"experiments.train {args[0]} failed:\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("readback")
    classifier = fit("classifier", root / "cls")
    # A tiny diffusion fit with a sample grid every 3 steps (the recipe's own SampleGrids fires every 300).
    console = offline(["fit", "--config", str(CONFIGS / "digits_diffusion.yaml"), *TINY_NET, *FAST_TRAINER,
             "--trainer.max_steps=6", "--data.batch_size=64", f"--trainer.logger.init_args.save_dir={root / 'diff'}",
             *naming("diffusion-tiny", "diffusion"), "--trainer.callbacks+=callbacks.SampleGrids",
             "--trainer.callbacks.init_args.every_n_steps=3", "--trainer.callbacks.init_args.steps=2",
             "--trainer.callbacks.init_args.classes=[0, 1, 2]"], silent=False)
    (diffusion,) = (root / "diff").glob("guidelab/*/checkpoints/last.ckpt")
    out = root / "sweep"
    offline(sweep_args(diffusion, classifier, out, root / "cache", root / "logs", SCALES,
                       ["--sweep.seeds=[0, 1]", *naming("sweep-tiny", "sweep")]))
    with open(out / "sweep.csv", newline="") as f:
        rows = [{k: (v if k in ("method", "grid") else float(v)) for k, v in r.items()
                 if k in ("method", "grid", "scale", "gamma", "seed", "fid_lo", "fid_hi", *METRICS)}
                for r in csv.DictReader(f)]
    (fit_run,) = offline_runs(root / "diff")
    (sweep_run,) = offline_runs(root / "logs")
    return {"fit": fit_run, "sweep": sweep_run, "rows": rows, "fit_dir": diffusion.parent.parent, "console": console}


def test_a_fit_prints_none_of_the_known_noise(study):
    """W&B's "git root <dir> does not exist" (its run directory did not exist yet), its "anonymous setting has
    no effect" (Lightning always passes it) and Lightning's advertisement: silenced or fixed at the source."""
    for noise in ("does not exist", "anonymous", "💡 Tip", "LeafSpec"):
        assert noise not in study["console"], noise
    assert "wandb" in study["console"]  # W&B was not silent: it printed its own lines


def test_runs_are_named_grouped_typed_and_tagged(study):
    fit_run, sweep_run = study["fit"], study["sweep"]
    assert (fit_run.name, fit_run.group, fit_run.job_type) == ("diffusion-tiny", GROUP, "diffusion")
    assert (sweep_run.name, sweep_run.group, sweep_run.job_type) == ("sweep-tiny", GROUP, "sweep")
    assert set(fit_run.tags) == {"digits", "test"}
    # The sweep adds its dataset, methods and sampler to the tags it was given.
    assert set(sweep_run.tags) == {"digits", "test", "cfg", "cg_cond", "cg_uncond", "ddim"}


def test_config_has_one_key_per_option(study):
    config = study["sweep"].config
    assert "config" not in config  # no more one JSON string
    assert config["sweep.sampling.steps"] == 3 and config["sweep.sampling.sampler"] == "ddim"
    assert config["sweep.seeds"] == [0, 1] and config["sweep.num_samples"] == 30
    assert config["sweep.scales.cfg"] == [0.0, 2.0] and config["sweep.methods"] == list(SCALES)
    assert config["model.init_args.base_channels"] == 16 and config["model.init_args.lr"] == 0.002
    assert config["trainer.logger.init_args.job_type"] == "sweep" and config["data.name"] == "digits"
    assert study["fit"].config["trainer.max_steps"] == 6
    assert not any(isinstance(v, dict) and k != "_wandb" for k, v in config.items())  # flat: no nesting


def best_per_method(rows: list[dict]) -> dict[str, tuple[float, float, float]]:
    """From the CSV: per method, (scale, FID mean over seeds, accuracy mean) at the lowest mean FID."""
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["scale"]), []).append(r)
    best: dict[str, tuple[float, float, float]] = {}
    for (method, scale), cell in cells.items():
        fid, acc = statistics.mean(r["fid"] for r in cell), statistics.mean(r["accuracy"] for r in cell)
        if method not in best or fid < best[method][1]:
            best[method] = (scale, fid, acc)
    return best


def test_summary_holds_each_methods_best_scale_not_the_last_cell(study):
    summary, rows = study["sweep"].summary, study["rows"]
    for method, (scale, fid, acc) in best_per_method(rows).items():
        key = f"sweep/{method}"
        assert math.isclose(summary[f"{key}/best_fid"], fid, rel_tol=1e-9), method
        assert summary[f"{key}/best_scale"] == scale and summary[f"{key}/scale"] == scale
        assert math.isclose(summary[f"{key}/best_accuracy"], acc, rel_tol=1e-9)
        assert summary[f"{key}/best_seeds"] == 2
        fids = [r["fid"] for r in rows if r["method"] == method and r["scale"] == scale]
        assert math.isclose(summary[f"{key}/best_fid_std"], statistics.stdev(fids), rel_tol=1e-6)
        for end in ("lo", "hi"):  # the 95% interval over samples, averaged over seeds
            ends = [r[f"fid_{end}"] for r in rows if r["method"] == method and r["scale"] == scale]
            assert math.isclose(summary[f"{key}/best_fid_{end}"], statistics.mean(ends), rel_tol=1e-9)
        for r in (r for r in rows if r["method"] == method and r["scale"] == scale):
            # Every per-cell key shows the best scale's cell of that seed, whatever was logged last.
            for m in METRICS:
                assert math.isclose(summary[f"{key}/seed{int(r['seed'])}/{m}"], r[m], rel_tol=1e-9), (method, m)
            image = summary[f"{key}/seed{int(r['seed'])}/samples"]
            assert image["_type"] == "image-file" and f"s={scale:g} " in image["caption"]
            assert study["sweep"].media(image).is_file()


def test_history_has_one_series_per_seed_against_the_methods_scale(study):
    run, rows = study["sweep"], study["rows"]
    for method in SCALES:
        for seed in (0, 1):
            series = run.series(f"sweep/{method}/seed{seed}/fid", f"sweep/{method}/scale")
            expected = sorted((r["scale"], r["fid"]) for r in rows if r["method"] == method and r["seed"] == seed)
            # Flattened: pytest.approx compares flat sequences only (nested ones raise TypeError on pytest >= 8.4).
            got = sorted(series)
            assert [len(p) for p in got] == [2] * len(expected), (method, seed)
            assert [v for p in got for v in p] == pytest.approx([v for p in expected for v in p]), (method, seed)
            images = [row[f"sweep/{method}/seed{seed}/samples"] for row in run.history
                      if f"sweep/{method}/seed{seed}/samples" in row]
            assert len(images) == len(SCALES[method]) and all(run.media(i).is_file() for i in images)
    assert not any("sweep/cfg/fid" in row for row in run.history)  # no series mixing the seeds


def logged(run: WandbRun, key: str) -> dict:
    (value,) = [row[key] for row in run.history if key in row]
    return value


def test_tables_and_charts_with_error_bars(study):
    run, rows = study["sweep"], study["rows"]
    cells = run.table(logged(run, "sweep/table"))
    assert len(cells) == len(rows) == 10 and {c["method"] for c in cells} == set(SCALES)
    curves = run.table(logged(run, "sweep/curves"))
    point = next(c for c in curves if (c["method"], c["metric"], c["scale"]) == ("cfg", "fid", 2.0))
    fids = [r["fid"] for r in rows if r["method"] == "cfg" and r["scale"] == 2.0]
    assert point["mean"] == pytest.approx(statistics.mean(fids))
    assert point["std"] == pytest.approx(statistics.stdev(fids))
    assert point["lower"] == pytest.approx(point["mean"] - point["std"]) and point["seeds"] == 2
    charts = run.config["_wandb"]["visualize"]
    for metric in METRICS:
        for axis in ("scale", "gamma"):
            key = f"sweep/{metric}_vs_{axis}"
            assert charts[key]["panel_config"]["panelDefId"] == "wandb/lineseries/v0", key
            lines = {r["lineKey"] for r in run.table(logged(run, f"{key}_table"))}
            assert lines == {f"{m}{band}" for m in SCALES for band in ("", " -1σ", " +1σ")}, key
    for name in ("metrics_vs_scale", "metrics_vs_gamma"):
        assert run.media(logged(run, f"sweep/plots/{name}")).is_file()


def test_training_logs_sample_grids_at_its_cadence(study):
    run, fit_dir = study["fit"], study["fit_dir"]
    grids = [(row["trainer/global_step"], row["train/samples"]) for row in run.history if "train/samples" in row]
    assert [step for step, _ in grids] == [3, 6]
    for step, value in grids:
        assert value["_type"] == "images/separated" and value["count"] == 1
        (name,) = value["filenames"]
        assert (run.files / name).is_file()
        assert (Path(fit_dir) / "samples" / f"step{step:07d}.png").is_file()
    assert any("train/loss" in row for row in run.history)
