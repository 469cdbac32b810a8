"""The sweep engine without a Trainer: identity of cells, a store that survives crashes, options checked
before any sampling. Tiny random networks, so every test runs in seconds."""

import errno
import math
import subprocess
import sys

import pytest
import torch

from lightning_modules.diffusion import (
    GuidanceOptions,
    NoiseSchedule,
    OptionError,
    SamplerOptions,
    cell_cost,
    make_rule,
)
from lightning_modules.networks import EncoderClassifier, UNet
from lightning_modules.sweep import (
    Evaluation,
    Network,
    SweepConfig,
    SweepModels,
    SweepStore,
    load_diffusion,
    run_sweep,
    signature,
)
from lightning_modules.sweep import store as store_module

from .helpers import ROOT

HP = {"num_classes": 3, "image_size": 8, "channels": 1, "schedule": "cosine", "timesteps": 1000,
      "prediction": "eps", "base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
      "attention_resolutions": [], "cross_attention_resolutions": [], "dropout": 0.0, "num_heads": 4,
      "norm": "adagn", "p_uncond": 0.1, "pool": "adaptive"}


class ToyExtractor:
    """A fixed random projection: deterministic features and 3-class logits."""

    extractor_id, num_features = "toy-projection", 6

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.w = torch.randn(64, 6, generator=gen)
        self.v = torch.randn(6, 3, generator=gen)

    def extract(self, x):
        f = x.flatten(1).float() @ self.w
        return f, f @ self.v


def make_models(seed=0, step=10, **hparams):
    """`hparams` override HP's, e.g. guidance_training="gft" for a network with GFT's β input."""
    hp = {**HP, **hparams}
    torch.manual_seed(seed)
    net = UNet.from_hparams(hp)
    for p in net.parameters():  # fresh UNets output zeros (zero-init heads): make them say something
        p.data.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(100)
    clf = EncoderClassifier.from_hparams(HP)
    return SweepModels(Network(net, hp, step), Network(clf, dict(HP), 5))


@pytest.fixture(scope="module")
def evaluation():
    return toy_evaluation()


def toy_evaluation() -> Evaluation:
    extractor = ToyExtractor()
    real = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    feats = extractor.extract(real)[0]
    from lightning_modules.evaluation import feature_statistics
    from lightning_modules.evaluation.metrics import reference_moments

    return Evaluation(extractor, "evaluator", feats, reference_moments(*feature_statistics(feats)), "toy-train")


def config(tmp_path, **kw):
    base = dict(methods=["cfg", "cg_cond"], scales={"cfg": [0.0, 2.0], "cg_cond": [1.0]}, num_samples=6,
                batch_size=5, sampling=SamplerOptions(steps=3), grid_size=4, progress=False,
                classifier_ckpt="given", output_dir=str(tmp_path))
    return SweepConfig(**{**base, **kw})


def test_importing_the_engine_imports_no_lightning():
    code = "import sys, lightning_modules.sweep; print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning') " \
           "for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_rows_record_network_identity_and_pure_cost(tmp_path, evaluation):
    models = make_models()
    rows = run_sweep(config(tmp_path, num_samples=10), models, evaluation, SweepStore(tmp_path))
    assert len(rows) == 3
    for r in rows:
        assert (r["diffusion_step"], r["classifier_step"]) == (10, 5)
        assert (r["diffusion_sha"], r["classifier_sha"]) == (models.diffusion.sha, models.classifier.sha)
        rule = make_rule(r["method"])
        cost = cell_cost(rule, r["scale"], NoiseSchedule(), 3)[:2]
        assert (r["nfe_per_sample"], r["classifier_grads_per_sample"]) == cost
        assert r["gamma"] == rule.gamma(r["scale"])
        assert (tmp_path / r["grid"]).stat().st_size > 0
        for metric in ("fid", "kid", "score", "precision", "recall", "accuracy"):  # every metric has its interval
            assert r[f"{metric}_lo"] <= r[metric] <= r[f"{metric}_hi"], metric
        assert r["fid_lo"] < r["fid_hi"] and r["thresholded_fraction"] == 0.0


def test_another_checkpoint_is_sampled_not_served_the_first_ones_rows(tmp_path, evaluation):
    a, b = make_models(seed=0, step=330), make_models(seed=1, step=550)
    rows_a = run_sweep(config(tmp_path), a, evaluation, SweepStore(tmp_path))
    rows_b = run_sweep(config(tmp_path), b, evaluation, SweepStore(tmp_path))
    assert {r["diffusion_sha"] for r in rows_b} == {b.diffusion.sha} != {a.diffusion.sha}
    assert {r["diffusion_step"] for r in rows_b} == {550}
    assert [r["fid"] for r in rows_a] != [r["fid"] for r in rows_b]
    assert len(SweepStore(tmp_path).rows) == 6  # both sweeps side by side; grids do not overwrite each other
    assert len(list((tmp_path / "grids").glob("*.png"))) == 6
    # A fresh directory with B gives B's numbers, equal to what the shared directory returned.
    fresh = run_sweep(config(tmp_path / "fresh"), b, evaluation, SweepStore(tmp_path / "fresh"))
    assert [r["fid"] for r in fresh] == [r["fid"] for r in rows_b]


def test_signature_follows_every_setting_that_changes_a_sample(tmp_path, evaluation):
    models = make_models()

    def sig(cfg, method="cg_cond", m=models, bf16=False):
        return signature(cfg, m, evaluation, bf16, method)

    base = sig(config(tmp_path))
    assert sig(config(tmp_path, batch_size=2, sampling=SamplerOptions(steps=3, compile="default"))) == base
    for changed in (dict(sampling=SamplerOptions(steps=4)), dict(sampling=SamplerOptions(steps=3, eta=0.5)),
                    dict(guidance=GuidanceOptions(interval=(0, 900))), dict(num_samples=7)):
        assert sig(config(tmp_path, **changed)) != base, changed
    assert sig(config(tmp_path), bf16=True) != base
    other_classifier = make_models()
    torch.manual_seed(5)
    other_classifier.classifier = Network(EncoderClassifier.from_hparams(HP), dict(HP), 5)
    assert sig(config(tmp_path), m=other_classifier) != base
    # Only what a method's own rule reads keys its cells: CFG takes no gradient, so another classifier, APG's
    # momentum or the cfg+cg scale leave its cells valid; CFG's rescale does not.
    cfg = sig(config(tmp_path), "cfg")
    assert sig(config(tmp_path), "cfg", m=other_classifier) == cfg
    apg = dict(methods=["cfg", "apg"], scales=None)
    assert sig(config(tmp_path, **apg, guidance=GuidanceOptions(apg={"momentum": 0.3})), "cfg") == cfg
    assert sig(config(tmp_path, guidance=GuidanceOptions(cfg_cg={"cg_scale": 2.0})), "cfg") == cfg
    assert sig(config(tmp_path, guidance=GuidanceOptions(cfg_rescale=0.5)), "cfg") != cfg
    momentum = [sig(config(tmp_path, **apg, guidance=GuidanceOptions(apg={"momentum": m})), "apg") for m in (0, .3)]
    assert momentum[0] != momentum[1]


def _cells(path):
    return sorted((r["method"], r["scale"]) for r in SweepStore(path).rows)


@pytest.mark.parametrize("cut", ["mid-row", "inside-last-field"])
def test_a_cut_csv_line_is_set_aside_and_its_cell_recomputed(tmp_path, evaluation, cut):
    models = make_models()
    full = run_sweep(config(tmp_path), models, evaluation, SweepStore(tmp_path))
    text = (tmp_path / "sweep.csv").read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    keep = len(text) - len(last) - 1 + (len(last) // 2 if cut == "mid-row" else len(last) - 3)
    (tmp_path / "sweep.csv").write_text(text[:keep])
    with pytest.warns(UserWarning, match=r"sweep\.csv.*incomplete or malformed.*rejected"):
        rows = run_sweep(config(tmp_path), models, evaluation, SweepStore(tmp_path))
    assert (tmp_path / "sweep.csv.rejected").read_text().strip() == text[len(text) - len(last) - 1:keep].strip()
    assert len(rows) == 3 and _cells(tmp_path) == sorted((r["method"], r["scale"]) for r in full)
    lines = (tmp_path / "sweep.csv").read_text().splitlines()
    assert len(lines) == 4 and all(line.count(",") == lines[0].count(",") for line in lines)
    again = run_sweep(config(tmp_path), models, evaluation, SweepStore(tmp_path))  # and the next rerun is clean
    assert len(again) == 3 and len(SweepStore(tmp_path).rows) == 3


def test_another_versions_csv_is_set_aside_not_mixed_in(tmp_path, evaluation):
    (tmp_path / "sweep.csv").write_text("method,scale,global_step\ncfg,1.0,0\n")
    with pytest.warns(UserWarning, match="another version"):
        rows = run_sweep(config(tmp_path), make_models(), evaluation, SweepStore(tmp_path))
    assert len(rows) == 3 and "global_step" in (tmp_path / "sweep.csv.rejected").read_text()


def test_disk_full_while_writing_grids_leaves_no_done_cell_without_its_image(tmp_path, evaluation, monkeypatch):
    models = make_models()
    real_write, calls = store_module._atomic_write, []

    def full_disk(path, data):
        if path.suffix == ".png":
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(store_module, "_atomic_write", full_disk)
    with pytest.raises(OSError, match="No space"):
        run_sweep(config(tmp_path), models, evaluation, SweepStore(tmp_path))
    monkeypatch.setattr(store_module, "_atomic_write", real_write)
    assert len(SweepStore(tmp_path).rows) == 1  # only the cell whose grid was written counts as done
    assert all(p.stat().st_size > 0 for p in (tmp_path / "grids").glob("*.png"))
    assert not list((tmp_path / "grids").glob(".*tmp*"))
    rows = run_sweep(config(tmp_path), models, evaluation, SweepStore(tmp_path))
    assert len(rows) == 3 and all((tmp_path / r["grid"]).stat().st_size > 0 for r in rows)


def test_a_missing_grid_is_regenerated(tmp_path, evaluation):
    models = make_models()
    rows = run_sweep(config(tmp_path), models, evaluation, SweepStore(tmp_path))
    (tmp_path / rows[0]["grid"]).write_bytes(b"")
    (tmp_path / rows[1]["grid"]).unlink()
    rows2 = run_sweep(config(tmp_path), models, evaluation, SweepStore(tmp_path))
    assert all((tmp_path / r["grid"]).stat().st_size > 0 for r in rows2)
    assert [r["fid"] for r in sorted(rows2, key=lambda r: (r["method"], r["scale"]))] == \
        [r["fid"] for r in sorted(rows, key=lambda r: (r["method"], r["scale"]))]


def test_an_unwritable_output_directory_fails_before_sampling(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(OptionError, match=r"sweep\.output_dir.*cannot write"):
        SweepStore(tmp_path / "file" / "sweep")


BAD_OPTIONS = [
    (dict(sampling=SamplerOptions(steps=0)), "sweep.sampling.steps"),
    (dict(scales={"cfg": [0.0, float("nan")], "cg_cond": [1.0]}), "sweep.scales.cfg"),
    (dict(scales={"cfg": [1.0], "cg_cond": [1.0, float("inf")]}), "sweep.scales.cg_cond"),
    (dict(num_samples=3), "sweep.num_samples"),
    (dict(sampling=SamplerOptions(sampler="ddmi")), "sweep.sampling.sampler"),
    (dict(scales={"cgf": [1.0]}), "sweep.scales"),
    (dict(scales={"cfg": []}), "sweep.scales.cfg"),
    (dict(guidance=GuidanceOptions(interval=(600, 100))), "sweep.guidance.interval"),
    (dict(sampling=SamplerOptions(eta=-1.0)), "sweep.sampling.eta"),
    (dict(grid_size=0), "sweep.grid_size"),
    (dict(batch_size=0), "sweep.batch_size"),
    (dict(seeds=[0, 0]), "sweep.seeds"),
    (dict(methods=["cfg", "cfgg"]), "sweep.methods"),
    (dict(sampling=SamplerOptions(compile="fastest")), "sweep.sampling.compile"),
    (dict(extractor="vgg"), "sweep.extractor"),
    (dict(precision="fp8"), "sweep.precision"),
    (dict(classifier_ckpt=None), "sweep.classifier_ckpt"),
    (dict(methods=["cfgpp"], scales={"cfgpp": [0.5, 1.5]}), "sweep.scales.cfgpp"),
    (dict(sampling=SamplerOptions(threshold=1.5)), "sweep.sampling.threshold"),
    (dict(guidance=GuidanceOptions(sigma_interval=(2.0, 1.0))), "sweep.guidance.sigma_interval"),
    (dict(guidance=GuidanceOptions(apg={"threshold": 0.0})), "sweep.guidance.apg.threshold"),
]


@pytest.mark.parametrize("bad,option", BAD_OPTIONS, ids=[o for _, o in BAD_OPTIONS])
def test_every_bad_option_is_one_clear_error(tmp_path, bad, option):
    with pytest.raises(OptionError) as err:
        config(tmp_path, **bad)
    assert err.value.option == option and "Fix:" in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing sampled, nothing written


def test_ranges_that_depend_on_the_model_are_checked_with_its_timesteps(tmp_path):
    with pytest.raises(OptionError, match="sweep.sampling.steps"):
        config(tmp_path, sampling=SamplerOptions(steps=1001)).check(timesteps=1000)
    with pytest.raises(OptionError, match="sweep.guidance.interval"):
        config(tmp_path, guidance=GuidanceOptions(interval=(0, 1000))).check(timesteps=1000)


def test_corrupt_and_crafted_checkpoints_name_the_file_and_run_nothing(tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(OptionError, match=r"corrupt\.ckpt.*cannot be read"):
        load_diffusion(corrupt)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "x": Payload()}, crafted)
    with pytest.raises(OptionError, match=r"crafted\.ckpt"):
        load_diffusion(crafted)
    assert not marker.exists()
    with pytest.raises(OptionError, match=r"does not exist"):
        load_diffusion(tmp_path / "missing.ckpt")


def test_scales_run_as_one_batch_equal_each_cell_alone(tmp_path, evaluation):
    models = make_models()
    together = run_sweep(config(tmp_path / "a", batch_size=64), models, evaluation, SweepStore(tmp_path / "a"))
    alone = []
    for method, scale in (("cfg", 0.0), ("cfg", 2.0), ("cg_cond", 1.0)):
        cfg = config(tmp_path / f"b{method}{scale}", methods=[method], scales={method: [scale]}, batch_size=4)
        alone += run_sweep(cfg, models, evaluation, SweepStore(cfg.output_dir))
    for a, b in zip(sorted(together, key=lambda r: (r["method"], r["scale"])),
                    sorted(alone, key=lambda r: (r["method"], r["scale"]))):
        assert math.isclose(a["fid"], b["fid"], rel_tol=1e-4, abs_tol=1e-6)
        assert a["accuracy"] == b["accuracy"]


def test_autoguidance_cells_record_the_guide_and_count_its_cost(tmp_path, evaluation):
    models = make_models()
    torch.manual_seed(7)
    guide = UNet.from_hparams(HP)
    models = SweepModels(models.diffusion, models.classifier, Network(guide, dict(HP), 2))
    cfg = config(tmp_path, methods=["autoguidance", "cg_cond"], scales={"autoguidance": [1.0, 2.0], "cg_cond": [1.0]},
                 guide_ckpt="given")
    rows = {(r["method"], r["scale"]): r for r in run_sweep(cfg, models, evaluation, SweepStore(tmp_path))}
    ag = rows[("autoguidance", 2.0)]
    assert (ag["guide_step"], ag["guide_sha"]) == (2, models.guide.sha)
    assert (ag["nfe_per_sample"], ag["guide_evals_per_sample"]) == (3, 3)
    assert ag["unet_equivalents_per_sample"] == pytest.approx(6.0)  # the guide has the main network's size
    assert rows[("autoguidance", 1.0)]["unet_equivalents_per_sample"] == pytest.approx(3.0)
    flops = models.flops()
    cg = rows[("cg_cond", 1.0)]
    assert cg["unet_equivalents_per_sample"] == pytest.approx(3 + 3 * flops["classifier"] / flops["diffusion"])
    assert 0 < flops["classifier"] < flops["diffusion"]
    with pytest.raises(OptionError, match="guide_ckpt"):
        config(tmp_path, methods=["autoguidance"], scales=None)


def test_plain_cells_are_sampled_once_and_recorded_for_each_method(tmp_path, evaluation, monkeypatch):
    from lightning_modules.sweep import engine

    models = make_models()
    sampled = []
    real = engine.run_job

    def spy(models_, config_, evaluation_, job, *args, **kwargs):
        sampled.extend((job.method, s) for s in job.scales)
        return real(models_, config_, evaluation_, job, *args, **kwargs)

    monkeypatch.setattr(engine, "run_job", spy)
    cfg = config(tmp_path, methods=["cfg", "cg_cond", "cg_uncond"],
                 scales={"cfg": [0.0, 1.0, 2.0], "cg_cond": [0.0, 1.0], "cg_uncond": [0.0, 3.0]})
    rows = {(r["method"], r["scale"]): r for r in run_sweep(cfg, models, evaluation, SweepStore(tmp_path))}
    assert sorted(sampled) == [("cfg", 0.0), ("cfg", 1.0), ("cfg", 2.0), ("cg_cond", 1.0), ("cg_uncond", 3.0)]
    assert rows[("cg_cond", 0.0)]["same_as"] == "cfg s=1" and rows[("cg_uncond", 0.0)]["same_as"] == "cfg s=0"
    assert rows[("cg_cond", 0.0)]["fid"] == rows[("cfg", 1.0)]["fid"] and rows[("cg_cond", 0.0)]["gamma"] == 1.0
    grids = [(tmp_path / rows[cell]["grid"]).read_bytes() for cell in (("cg_cond", 0.0), ("cfg", 1.0))]
    assert grids[0] == grids[1]
    # Sampling them for real gives the same numbers (paired noise, plain conditional at every step).
    alone = config(tmp_path / "alone", methods=["cg_cond"], scales={"cg_cond": [0.0]})
    (own,) = run_sweep(alone, models, evaluation, SweepStore(tmp_path / "alone"))
    assert own["fid"] == pytest.approx(rows[("cfg", 1.0)]["fid"], rel=1e-4) and own["same_as"] == ""
