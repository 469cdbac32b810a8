"""The second evaluator architecture (arch "mlp") and the sweep's extra feature spaces (CPU, offline, fast)."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

import lightning_modules.evaluation.evaluator as evaluator_mod
from lightning_modules.diffusion import OptionError
from lightning_modules.evaluation import (
    EVALUATOR_ARCHS,
    EvaluatorMLP,
    EvaluatorNet,
    FeatureExtractor,
    load_or_train_evaluator,
    target_accuracy,
    train_evaluator,
)
from lightning_modules.evaluation.evaluator_cache import _fingerprint
from lightning_modules.sweep.evaluation import EXTRA_EXTRACTORS, Evaluation, build_extra_evaluations


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(x))
    tr, va = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[va], y[va]


def no_training(*args, **kwargs):
    raise AssertionError("the cached evaluator must be loaded, not retrained")


def test_archs_and_mlp_network():
    assert EVALUATOR_ARCHS == ("cnn", "mlp")
    net = EvaluatorMLP((1, 8, 8), 10)
    assert net.num_features == 64 and not any(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    x = torch.randn(5, 1, 8, 8)
    assert net.features(x).shape == (5, 64) and net(x).shape == (5, 10)
    with pytest.raises(ValueError, match="arch"):
        train_evaluator(x, torch.zeros(5, dtype=torch.long), 10, steps=1, arch="vit")


def test_mlp_trains_well_above_chance(digits):
    x_tr, y_tr, x_va, y_va = digits
    net = train_evaluator(x_tr, y_tr, 10, steps=150, seed=1, arch="mlp")
    assert isinstance(net, EvaluatorMLP)
    with torch.no_grad():
        acc = target_accuracy(net(x_va), y_va)
    assert acc >= 0.9  # chance is 0.1 (about 0.98 at the default 400 steps)


def test_mlp_features_are_another_space(digits):
    x_tr, y_tr, x_va, y_va = digits
    cnn = train_evaluator(x_tr, y_tr, 10, steps=60, seed=0)
    mlp = train_evaluator(x_tr, y_tr, 10, steps=60, seed=1, arch="mlp")
    assert isinstance(cnn, EvaluatorNet)
    with torch.no_grad():
        fc_tr, fc_va = cnn.features(x_tr).double(), cnn.features(x_va).double()
        fm_tr, fm_va = mlp.features(x_tr).double(), mlp.features(x_va).double()
    assert fc_va.shape[1] == 128 and fm_va.shape[1] == 64
    # Not a linear image of the main space: the best affine map CNN -> MLP (fitted on train) leaves much of
    # the MLP features' variance on held-out images unexplained.
    ones = torch.ones(len(fc_tr), 1, dtype=torch.float64)
    w = torch.linalg.lstsq(torch.cat([fc_tr, ones], 1), fm_tr).solution
    pred = torch.cat([fc_va, torch.ones(len(fc_va), 1, dtype=torch.float64)], 1) @ w
    r2 = 1 - ((fm_va - pred) ** 2).sum() / ((fm_va - fm_va.mean(0)) ** 2).sum()
    assert r2 < 0.95


def test_mlp_cache_is_reused_and_keyed_apart_from_the_main_evaluator(tmp_path, digits, monkeypatch):
    kw = {"num_classes": 10, "cache_dir": tmp_path, "dataset_id": "digits-8px", "steps": 40}
    main = load_or_train_evaluator(*digits, **kw)
    mlp = load_or_train_evaluator(*digits, **kw, seed=1, arch="mlp")
    assert isinstance(mlp, FeatureExtractor) and mlp.num_features == 64 and main.num_features == 128
    assert mlp.heldout_accuracy > 0.5

    # The main evaluator's file name and id are exactly as before arch/seed existed: same settings, same hash.
    settings = {"recipe_version": evaluator_mod._RECIPE_VERSION, "dataset_id": "digits-8px", "num_classes": 10,
                "steps": 40, "seed": 0, "image_shape": [1, 8, 8], "data": _fingerprint(*digits),
                **evaluator_mod._TRAIN_HPARAMS}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    assert re.fullmatch(rf"evaluator-digits-8px-{key}-[0-9a-f]{{12}}", main.extractor_id)
    assert re.fullmatch(r"evaluator-mlp-s1-digits-8px-[0-9a-f]{12}-[0-9a-f]{12}", mlp.extractor_id)
    names = sorted(p.name for p in tmp_path.glob("evaluator-*.pt"))
    assert len(names) == 2 and f"evaluator-digits-8px-{key}.pt" in names
    assert mlp.extractor_id.rsplit("-", 1)[0] + ".pt" in names

    # Second calls load, for both; another seed of the same arch is another entry (would train: raises).
    monkeypatch.setattr(evaluator_mod, "train_evaluator", no_training)
    mlp2 = load_or_train_evaluator(*digits, **kw, seed=1, arch="mlp")
    assert mlp2.extractor_id == mlp.extractor_id and mlp2.heldout_accuracy == mlp.heldout_accuracy
    x = digits[2][:16]
    torch.testing.assert_close(mlp2.extract(x)[0], mlp.extract(x)[0])
    assert load_or_train_evaluator(*digits, **kw).extractor_id == main.extractor_id
    with pytest.raises(AssertionError, match="retrained"):
        load_or_train_evaluator(*digits, **kw, seed=2, arch="mlp")

    # LayerNorm only: a sample's features do not depend on the rest of its batch.
    feats = mlp.extract(digits[2])[0]
    torch.testing.assert_close(mlp.extract(digits[2][:7])[0], feats[:7], rtol=1e-4, atol=1e-5)


def test_unknown_extra_extractor_is_an_option_error():
    class Untouchable:  # nothing may be trained or read before the names are checked
        def __getattr__(self, name):
            raise AssertionError(f"datamodule.{name} used before the names were validated")

    with pytest.raises(OptionError, match="sweep.extra_extractors") as err:
        build_extra_evaluations(["evaluator-mlp", "inception-v4"], Untouchable(), "/nonexistent", "train", "cpu")
    assert err.value.option == "sweep.extra_extractors" and "evaluator-mlp" in str(err.value)
    assert build_extra_evaluations([], Untouchable(), "/nonexistent", "train", "cpu") == {}
    assert set(EXTRA_EXTRACTORS) >= {"evaluator-mlp"} and EXTRA_EXTRACTORS["evaluator-mlp"] == ("mlp", 1)


def test_build_extra_evaluations_scores_in_the_mlp_space(tmp_path, monkeypatch):
    from datamodules import ImageDataModule

    dm = ImageDataModule(name="digits")
    extras = build_extra_evaluations(["evaluator-mlp", "evaluator-mlp"], dm, tmp_path, "train", torch.device("cpu"))
    assert list(extras) == ["evaluator-mlp"]
    ev = extras["evaluator-mlp"]
    assert isinstance(ev, Evaluation) and ev.kind == "evaluator"
    assert ev.extractor_id.startswith(f"evaluator-mlp-s1-{dm.dataset_id}-")
    assert ev.ref_feats.shape[1] == 64 and ev.extractor.heldout_accuracy >= 0.9
    assert ev.reference_id == f"{dm.dataset_id}-train"

    x_va, y_va = dm.split_tensors("val")
    feats, logits = ev.extractor.extract(x_va)
    row = ev.score(feats, logits, y_va)
    assert row["accuracy"] == pytest.approx(ev.extractor.heldout_accuracy)
    assert 0 <= row["fid"] < 50  # held-out real digits are close to the train split in this space

    # Evaluator and reference features both come from the cache on a second call.
    monkeypatch.setattr(evaluator_mod, "train_evaluator", no_training)
    again = build_extra_evaluations(["evaluator-mlp"], dm, tmp_path, "train", torch.device("cpu"))["evaluator-mlp"]
    assert again.extractor_id == ev.extractor_id
    torch.testing.assert_close(again.ref_feats, ev.ref_feats)
    assert len(list(tmp_path.glob("ref-*.pt"))) == 1
