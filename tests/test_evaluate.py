"""`python -m experiments.evaluate` scores samples on the sweep's own path, `--sweep.save_samples` saves what a cell
was scored on, `--sweep.reference_stats` moves FID onto a statistics file. Tiny random networks and the toy
extractor of test_sweep_engine, so every test runs in seconds."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import evaluate as cli
from lightning_modules.diffusion import OptionError
from lightning_modules.evaluation.metrics import fid_from_stats
from lightning_modules.evaluation.sample_files import read_statistics
from lightning_modules.sweep import SweepConfig, SweepStore, external, references, run_sweep, signature
from lightning_modules.sweep import engine as engine_module
from lightning_modules.sweep import evaluation as sweep_evaluation
from lightning_modules.sweep.evaluation import build_evaluation, check_statistics, with_reference_stats
from lightning_modules.sweep.grids import first_samples

from .test_sweep_engine import ToyExtractor, config, make_models, toy_evaluation

INTERVALS = [c for m in ("fid", "kid", "score", "precision", "recall", "accuracy") for c in (m, f"{m}_lo", f"{m}_hi")]


def _toy_space(patch: pytest.MonkeyPatch) -> None:
    """Every extractor is the toy projection and the digits split's reference features are the toy reference's,
    everything else as it runs: `build_evaluation` of the digits data module, the CLI's own path."""
    toy = toy_evaluation().ref_feats
    for module in (sweep_evaluation, references):
        patch.setattr(module, "build_extractor", lambda *a, **k: ToyExtractor())
    patch.setattr(sweep_evaluation, "reference_features", lambda *a, **k: toy)


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """The sweep's Evaluation of `--reference digits` in the toy space."""
    from datamodules import ImageDataModule

    with pytest.MonkeyPatch.context() as patch:
        _toy_space(patch)
        return build_evaluation("auto", ImageDataModule("digits"), tmp_path_factory.mktemp("cache"), None, "train",
                                torch.device("cpu"))


@pytest.fixture()
def toy_space(monkeypatch, evaluation):
    _toy_space(monkeypatch)
    return evaluation


def run(tmp_path, *argv: str) -> dict:
    return cli.main([*argv, "--cache_dir", str(tmp_path / "cache")])


@pytest.fixture(scope="module")
def swept(tmp_path_factory, evaluation):
    """A sweep with save_samples: (directory, rows by (method, scale))."""
    out = tmp_path_factory.mktemp("sweep")
    cfg = config(out, methods=["cfg", "cg_cond"], scales={"cfg": [0.0, 1.0, 2.0], "cg_cond": [0.0, 1.0]},
                 num_samples=12, bootstrap=8, save_samples=True)
    rows = run_sweep(cfg, make_models(), evaluation, SweepStore(out))
    return out, {(r["method"], r["scale"]): r for r in rows}


def _same(result: dict, row: dict) -> None:
    """Equal up to float32 round-off of the features (the sweep featurises its chunks, evaluate its own)."""
    for column in (*INTERVALS, "kid_std"):
        got, want = result["metrics"][column], row[column]
        if want is None or (isinstance(want, float) and math.isnan(want)):
            assert got is None, column
        else:
            assert got == pytest.approx(want, rel=1e-5, abs=1e-9), column


def test_a_saved_cell_rescored_equals_its_row(tmp_path, swept, toy_space):
    out, rows = swept
    for (method, scale), row in rows.items():
        result = run(tmp_path, str(out), "--cell", f"{method}:{scale:g}:0", "--reference", "digits")
        _same(result, row)
        _same(result, {c: v if v is not None else math.nan for c, v in result["row"].items()})
        assert result["bootstrap"] == 8 and result["labels"] and result["not_computed"] == {} and not result["notes"]
        record = json.loads((out / row["draws"]).read_text())["spaces"][row["extractor"]]
        assert result["draws"] == {"labels_sha": record["labels_sha"], "halves_sha": record["halves_sha"]}
    # The cell's grid (or its samples file) names the same cell.
    by_grid = run(tmp_path, str(out / rows[("cfg", 2.0)]["grid"]), "--reference", "digits")
    by_file = run(tmp_path, str(out / rows[("cfg", 2.0)]["samples"]), "--reference", "digits")
    assert by_grid["metrics"] == by_file["metrics"]
    _same(by_grid, rows[("cfg", 2.0)])


def test_save_samples_holds_every_image_and_a_rerun_keeps_it(swept, evaluation, monkeypatch, capsys):
    out, rows = swept
    for row in rows.values():
        with np.load(out / row["samples"], allow_pickle=False) as npz:
            images, labels = npz["arr_0"], npz["arr_1"]
        assert images.dtype == np.uint8 and images.shape == (12, 8, 8, 1)
        assert labels.tolist() == [i % 3 for i in range(12)]
        shown = first_samples(out / row["grid"], count=3)  # upscaled ×4 (nearest) in the grid
        assert all(np.array_equal(shown[i][::4, ::4], images[i]) for i in range(3))  # the grid shows the saved images
    # Plain cells shared on paired noise point to their source's file.
    assert rows[("cg_cond", 0.0)]["samples"] == rows[("cfg", 1.0)]["samples"]
    sampled = []
    real = engine_module.run_job
    monkeypatch.setattr(engine_module, "run_job", lambda *a, **k: sampled.append(a[3]) or real(*a, **k))
    before = {r["samples"]: (out / r["samples"]).read_bytes() for r in rows.values()}
    cfg = config(out, methods=["cfg", "cg_cond"], scales={"cfg": [0.0, 1.0, 2.0], "cg_cond": [0.0, 1.0]},
                 num_samples=12, bootstrap=8, save_samples=True)
    again = run_sweep(cfg, make_models(), evaluation, SweepStore(out))
    assert sampled == [] and {r["samples"] for r in again} == set(before)
    assert all((out / name).read_bytes() == data for name, data in before.items())


def test_a_cell_recorded_without_its_samples_is_sampled_again_with_save_samples(tmp_path, evaluation, capsys):
    run_sweep(config(tmp_path), make_models(), evaluation, SweepStore(tmp_path))
    with pytest.raises(OptionError, match="save_samples true") as err:
        run(tmp_path, str(tmp_path), "--cell", "cfg:2:0", "--reference", "digits")
    assert err.value.option == "cell"
    rows = run_sweep(config(tmp_path, save_samples=True), make_models(), evaluation, SweepStore(tmp_path))
    assert all((tmp_path / r["samples"]).is_file() for r in rows)
    printed = capsys.readouterr().out
    assert "save_samples: 3 cell(s)" in printed and "MiB" in printed  # the disk cost, before sampling


def _images(n: int = 20, size: int = 8, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


def test_a_folder_equals_the_same_images_as_an_npz(tmp_path, toy_space):
    images, labels = _images(), np.arange(20) % 3
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0], mode="L").save(folder / f"{i:03d}.png")
    np.savez(tmp_path / "plain.npz", images)
    np.savez(tmp_path / "labelled.npz", images, labels)
    np.save(tmp_path / "labels.npy", labels)
    args = ["--reference", "digits", "--bootstrap", "6"]
    plain = run(tmp_path, str(folder), *args)
    assert plain["metrics"] == run(tmp_path, str(tmp_path / "plain.npz"), *args)["metrics"]
    assert "accuracy" in plain["not_computed"] and plain["metrics"]["accuracy"] is None
    labelled = run(tmp_path, str(folder), "--labels", str(tmp_path / "labels.npy"), *args)
    assert labelled["metrics"] == run(tmp_path, str(tmp_path / "labelled.npz"), *args)["metrics"]
    assert labelled["metrics"]["accuracy"] is not None and labelled["not_computed"] == {}


def test_fid_against_a_statistics_file_equals_fid_against_the_features(tmp_path, toy_space):
    np.savez(tmp_path / "samples.npz", _images(seed=1), np.arange(20) % 3)
    np.savez(tmp_path / "ref.npz", _images(n=40, seed=2))
    stats = tmp_path / "stats.npz"
    args = ["--dataset", "digits", "--bootstrap", "6"]
    full = run(tmp_path, str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "ref.npz"), "--write_stats",
                     str(stats), "--json", str(tmp_path / "full.json"), *args)
    alone = run(tmp_path, str(tmp_path / "samples.npz"), "--reference", str(stats), *args)
    assert alone["metrics"]["fid"] == pytest.approx(full["metrics"]["fid"], abs=1e-8)
    assert set(alone["not_computed"]) == {"kid", "precision", "recall"}  # they need reference features
    assert alone["metrics"]["score"] == full["metrics"]["score"]
    assert json.loads((tmp_path / "full.json").read_text())["metrics"] == full["metrics"]
    # --reference_stats: FID from the file, KID and precision/recall still against the images.
    both = run(tmp_path, str(tmp_path / "samples.npz"), "--reference", str(tmp_path / "ref.npz"), "--reference_stats",
                     str(stats), *args)
    assert both["metrics"]["fid"] == pytest.approx(full["metrics"]["fid"], abs=1e-8)
    assert both["metrics"]["kid"] == full["metrics"]["kid"] and both["reference"].endswith(
        read_statistics(stats, "x").sha256[:16])


def test_reference_stats_move_the_sweeps_fid_and_key_its_cells(tmp_path, evaluation):
    mu, sigma = np.zeros(6), np.eye(6) * 4.0
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    moved = with_reference_stats(evaluation, check_statistics(tmp_path / "stats.npz", ToyExtractor(), "s"))
    models, cfg = make_models(), config(tmp_path / "out")
    assert signature(cfg, models, moved, False, "cfg") != signature(cfg, models, evaluation, False, "cfg")
    rows = run_sweep(config(tmp_path / "out", reference_stats=str(tmp_path / "stats.npz")), models, moved,
                     SweepStore(tmp_path / "out"))
    plain = {(r["method"], r["scale"]): r for r in run_sweep(cfg, models, evaluation, SweepStore(tmp_path / "b"))}
    for row in rows:
        assert row["fid"] != plain[(row["method"], row["scale"])]["fid"]
        assert row["kid"] == plain[(row["method"], row["scale"])]["kid"]  # still against the reference features
    feats = torch.randn(30, 6, dtype=torch.float64)
    assert moved.score(feats, feats[:, :3], torch.arange(30) % 3)["fid"] == pytest.approx(
        fid_from_stats(mu, sigma, feats), abs=1e-8)


def test_bad_inputs_are_one_clear_error_before_any_work(tmp_path, toy_space, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("features were computed before the inputs were checked")

    for module, name in ((external, "sample_features"), (references, "reference_features"),
                         (sweep_evaluation, "reference_features")):
        monkeypatch.setattr(module, name, no_work)
    np.savez(tmp_path / "samples.npz", _images())
    np.savez(tmp_path / "wide.npz", mu=np.zeros(5), sigma=np.eye(5))
    np.savez(tmp_path / "no_images.npz", labels=np.arange(3))
    (tmp_path / "empty").mkdir()
    (tmp_path / "mixed").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("L", (9, 8)).save(tmp_path / "mixed" / "b.png")
    samples = str(tmp_path / "samples.npz")
    cases = [([samples, "--reference", str(tmp_path / "wide.npz"), "--dataset", "digits"], "reference", "5-d"),
             ([samples, "--reference", "digits", "--reference_stats", str(tmp_path / "wide.npz")], "reference_stats",
              "5-d"),
             ([str(tmp_path / "no_images.npz"), "--reference", "digits"], "samples", "arr_0"),
             ([str(tmp_path / "empty"), "--reference", "digits"], "samples", "no .png"),
             ([str(tmp_path / "mixed"), "--reference", "digits"], "samples", "mixes image sizes"),
             ([samples, "--reference", str(tmp_path / "no_images.npz")], "reference", "arr_0"),
             ([samples, "--reference", "digits", "--labels", str(tmp_path / "no_images.npz")], "labels", "labels")]
    for argv, option, text in cases:
        with pytest.raises(OptionError, match=text) as err:
            run(tmp_path, *argv)
        assert err.value.option == option, argv
    # The sweep's own option: the file is checked with the config, its dimension against the extractor.
    with pytest.raises(OptionError, match="sweep.reference_stats"):
        SweepConfig(methods=["cfg"], reference_stats=str(tmp_path / "missing.npz"))
    from datamodules import ImageDataModule

    with pytest.raises(OptionError, match="5-d statistics") as err:
        build_evaluation("auto", ImageDataModule("digits"), tmp_path, None, "train", torch.device("cpu"),
                         reference_stats=str(tmp_path / "wide.npz"))
    assert err.value.option == "sweep.reference_stats"


def test_a_classifier_checkpoint_gives_the_accuracy(tmp_path, toy_space):
    from lightning_modules.evaluation.metrics import target_accuracy
    from lightning_modules.evaluation.sample_files import nhwc_to_images
    from lightning_modules.networks import EncoderClassifier

    from .test_sweep_engine import HP

    torch.manual_seed(7)
    net = EncoderClassifier.from_hparams(HP).eval()
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "hyper_parameters": dict(HP)},
               tmp_path / "clf.ckpt")
    images, labels = _images(), np.arange(20) % 3
    np.savez(tmp_path / "s.npz", images, labels)
    result = run(tmp_path, str(tmp_path / "s.npz"), "--reference", "digits", "--classifier", str(tmp_path / "clf.ckpt"),
                 "--bootstrap", "6")
    with torch.no_grad():
        logits = net(nhwc_to_images(images), torch.zeros(20, dtype=torch.long))
    m = result["metrics"]
    assert m["accuracy"] == target_accuracy(logits, torch.from_numpy(labels)) and m["accuracy_lo"] <= m["accuracy"]
    np.savez(tmp_path / "unlabelled.npz", images)
    with pytest.raises(OptionError, match="unlabelled") as err:
        run(tmp_path, str(tmp_path / "unlabelled.npz"), "--reference", "digits", "--classifier",
            str(tmp_path / "clf.ckpt"))
    assert err.value.option == "classifier"
