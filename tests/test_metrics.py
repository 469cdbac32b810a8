"""Metrics, feature extractors and their caches (CPU, offline, fast)."""

from __future__ import annotations

import hashlib
import math
import urllib.request

import numpy as np
import pytest
import scipy.linalg
import torch

import lightning_modules.evaluation.evaluator as evaluator_mod
from lightning_modules.evaluation import (
    INCEPTION_WEIGHTS_FILENAME,
    FeatureExtractor,
    InceptionExtractor,
    cell_metrics,
    check_inception_weights,
    classifier_score,
    feature_statistics,
    fid_from_features,
    fid_from_stats,
    kid_from_features,
    load_or_train_evaluator,
    precision_recall,
    reference_features,
    target_accuracy,
)
from lightning_modules.evaluation.features import to_uint8_range


def gaussian(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


# ----------------------------------------------------------------------------------------------- FID
def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    # Independent reference: textbook formula with scipy's matrix square root, float64 throughout.
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_matches_scipy_sqrtm():
    real = gaussian(500, 64, seed=0)
    g = torch.Generator().manual_seed(1)
    mix = torch.eye(64, dtype=torch.float64) + 0.3 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    fake = gaussian(500, 64, seed=2, shift=0.2) @ mix  # different mean and covariance
    ref = scipy_frechet(real.numpy(), fake.numpy())
    assert fid_from_features(real, fake) == pytest.approx(ref, rel=1e-6)
    # float32 inputs are promoted to float64 statistics: same answer to float32 input precision.
    assert fid_from_features(real.float(), fake.float()) == pytest.approx(ref, rel=1e-5)
    mu, sigma = feature_statistics(real)
    assert mu.dtype == np.float64 and sigma.shape == (64, 64)
    assert fid_from_stats(mu, sigma, fake) == pytest.approx(ref, rel=1e-6)
    assert fid_from_stats(torch.from_numpy(mu), torch.from_numpy(sigma), fake) == pytest.approx(ref, rel=1e-6)


def test_fid_self_zero_and_monotone_in_shift():
    real = gaussian(500, 64, seed=0)
    assert abs(fid_from_features(real, real)) < 1e-8
    fids = [fid_from_features(real, gaussian(500, 64, seed=3, shift=s)) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(b > a for a, b in zip(fids, fids[1:])), fids


# ----------------------------------------------------------------------------------------------- KID
def test_kid_same_vs_shifted_and_deterministic():
    real = gaussian(400, 32, seed=0)
    same = gaussian(400, 32, seed=1)
    shifted = gaussian(400, 32, seed=1, shift=0.5)
    kid_same, std_same = kid_from_features(real, same, subset_size=200, subsets=20)
    kid_shift, _ = kid_from_features(real, shifted, subset_size=200, subsets=20)
    assert abs(kid_same) < 0.02
    assert std_same >= 0
    assert kid_shift > 0.2 and kid_shift > 10 * abs(kid_same)
    # Seeded: identical across calls, whatever the global RNG does in between.
    torch.manual_seed(123)
    np.random.seed(123)
    assert kid_from_features(real, shifted, subset_size=200, subsets=20) == kid_from_features(
        real, shifted, subset_size=200, subsets=20
    )
    # Subset size larger than either set shrinks instead of failing.
    assert math.isfinite(kid_from_features(real[:50], same[:80], subset_size=1000, subsets=5)[0])


def test_fid_and_kid_equal_torch_fidelity_numpy_reference():
    """Our torch FID (symmetric Σ_r^½ Σ_f Σ_r^½ route, cached root) and batched KID give torch-fidelity's
    numbers: same definition, same subset draws."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    from lightning_modules.evaluation.metrics import reference_moments

    real = gaussian(600, 48, seed=0)
    fake = gaussian(500, 48, seed=4, shift=0.3) @ (torch.eye(48, dtype=torch.float64) * 1.3)
    stats_r, stats_f = fid_features_to_statistics(real), fid_features_to_statistics(fake)
    expected = fid_statistics_to_metric(stats_r, stats_f, verbose=False)["frechet_inception_distance"]
    assert fid_from_features(real, fake) == pytest.approx(expected, rel=1e-9)
    moments = reference_moments(stats_r["mu"], stats_r["sigma"])
    assert fid_from_stats(*moments[:2], fake, sqrt_sigma_r=moments[2]) == pytest.approx(expected, rel=1e-9)
    ref = kid_features_to_metric(real, fake, kid_subsets=7, kid_subset_size=300, rng_seed=3, verbose=False)
    mean, std = kid_from_features(real, fake, subset_size=300, subsets=7, seed=3, subsets_per_batch=3)
    assert mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-10)
    assert std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-8)


# ---------------------------------------------------------------------------------- precision/recall
def test_precision_recall_identical_collapsed_far():
    real = gaussian(500, 16, seed=0).float()
    assert precision_recall(real, real.clone(), k=3) == (1.0, 1.0)

    # Mode collapse: a tight cluster around one real point is inside the real manifold but covers little.
    collapsed = real[0] + 0.01 * gaussian(200, 16, seed=5).float()
    p, r = precision_recall(real, collapsed, k=3)
    assert p > 0.95 and r < 0.05, (p, r)

    far = gaussian(300, 16, seed=6, shift=100.0).float()
    p, r = precision_recall(real, far, k=3)
    assert p < 0.01 and r < 0.01, (p, r)


# --------------------------------------------------------------------------- classifier score, acc
def test_classifier_score_and_accuracy():
    k, n = 10, 1000
    labels = torch.arange(n) % k
    uniform_onehot = 20.0 * torch.nn.functional.one_hot(labels, k).double()
    assert classifier_score(uniform_onehot) == pytest.approx(k, rel=1e-6)
    same = 20.0 * torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), k).double()
    assert classifier_score(same) == pytest.approx(1.0, abs=1e-6)
    assert target_accuracy(uniform_onehot, labels) == 1.0
    assert target_accuracy(uniform_onehot, (labels + 1) % k) == 0.0


# ------------------------------------------------------------------------------------ digits evaluator
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


@pytest.fixture(scope="module")
def evaluator_cache(tmp_path_factory, digits):
    cache = tmp_path_factory.mktemp("evaluator")
    ev = load_or_train_evaluator(*digits, num_classes=10, cache_dir=cache, dataset_id="digits-8px")
    return cache, ev


def test_evaluator_accuracy_and_interface(evaluator_cache, digits):
    cache, ev = evaluator_cache
    x_tr, y_tr, x_va, y_va = digits
    assert ev.heldout_accuracy >= 0.95
    assert isinstance(ev, FeatureExtractor)
    files = list(cache.glob("evaluator-digits-8px-*.pt"))
    assert len(files) == 1
    assert files[0].stem.split("-")[-1] in ev.extractor_id  # settings hash of the cache file

    feats, logits = ev.extract(x_va)
    assert feats.shape == (len(x_va), ev.num_features) and feats.dtype == torch.float32
    assert logits.shape == (len(x_va), 10) and logits.dtype == torch.float32
    assert target_accuracy(logits, y_va) == pytest.approx(ev.heldout_accuracy)
    # GroupNorm only: a sample's features do not depend on the rest of its batch.
    torch.testing.assert_close(ev.extract(x_va[:7])[0], feats[:7], rtol=1e-4, atol=1e-5)
    # Autocast requests are ignored: features are always float32 maths.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(ev.extract(x_va[:7])[0], feats[:7], rtol=1e-4, atol=1e-5)


def test_evaluator_second_call_hits_cache(evaluator_cache, digits, monkeypatch):
    cache, ev = evaluator_cache

    def no_training(*args, **kwargs):
        raise AssertionError("the cached evaluator must be loaded, not retrained")

    monkeypatch.setattr(evaluator_mod, "train_evaluator", no_training)
    ev2 = load_or_train_evaluator(*digits, num_classes=10, cache_dir=cache, dataset_id="digits-8px")
    assert ev2.extractor_id == ev.extractor_id
    assert ev2.heldout_accuracy == ev.heldout_accuracy
    x = digits[2][:16]
    torch.testing.assert_close(ev2.extract(x)[0], ev.extract(x)[0])
    # Other settings are another cache entry (here: would train, hence the patched function raises).
    with pytest.raises(AssertionError, match="retrained"):
        load_or_train_evaluator(*digits, num_classes=10, cache_dir=cache, dataset_id="digits-8px", seed=1)


def test_cell_metrics_on_digits(evaluator_cache, digits):
    _, ev = evaluator_cache
    x_tr, _, x_va, y_va = digits
    real = ev.extract(x_tr)[0]
    fake_f, fake_l = ev.extract(x_va)  # held-out real digits stand in for a perfect generator
    good = cell_metrics(real, fake_f, fake_l, y_va, kid_subsets=10)
    assert set(good) == {"fid", "kid", "kid_std", "score", "precision", "recall", "accuracy"}
    noise = torch.rand(len(x_va), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad_f, bad_l = ev.extract(noise)
    bad = cell_metrics(real, bad_f, bad_l, y_va, ref_stats=feature_statistics(real), kid_subsets=10)
    assert good["accuracy"] >= 0.95 and good["score"] > 6.0
    assert bad["fid"] > 10 * good["fid"] and bad["kid"] > good["kid"]
    assert good["precision"] > 0.7 and good["recall"] > 0.7
    assert math.isnan(cell_metrics(real, fake_f, fake_l, None, kid_subsets=2)["accuracy"])


# ----------------------------------------------------------------------------------- reference cache
class ToyExtractor:
    num_features = 4

    def __init__(self, extractor_id: str = "toy-v1"):
        self.extractor_id = extractor_id
        self.calls = 0

    def extract(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        f = x.flatten(1)[:, :4].float()
        return f, f[:, :2]


def test_reference_features_cached(tmp_path, monkeypatch):
    x = torch.rand(10, 1, 8, 8) * 2 - 1
    ext = ToyExtractor()
    f1 = reference_features(x, ext, tmp_path, key="digits-train-8px", batch_size=4)
    assert ext.calls == 3 and f1.shape == (10, 4) and f1.dtype == torch.float32
    files = list(tmp_path.glob("ref-digits-train-8px-*.pt"))
    assert len(files) == 1

    def boom(_x):
        raise AssertionError("reference features must be loaded from the cache")

    monkeypatch.setattr(ext, "extract", boom)
    torch.testing.assert_close(reference_features(x, ext, tmp_path, key="digits-train-8px"), f1)

    # Another extractor identity (other weights) gets its own file; DataLoader-style (x, y) batches work.
    other = ToyExtractor("toy-v2")
    batches = [(x[:5], torch.zeros(5)), (x[5:], torch.zeros(5))]
    torch.testing.assert_close(reference_features(batches, other, tmp_path, key="digits-train-8px"), f1)
    assert other.calls == 2 and len(list(tmp_path.glob("ref-digits-train-8px-*.pt"))) == 2


# ------------------------------------------------------------------------------------------ Inception
@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(fe, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_inception_weights_missing_is_a_clear_error(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError) as err:
        check_inception_weights(None)
    msg = str(err.value)
    assert str(expected) in msg and "inception_weights" in msg and "TORCH_HOME" in msg
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        InceptionExtractor()
    given = tmp_path / "elsewhere.pth"
    with pytest.raises(FileNotFoundError, match=str(given)):
        check_inception_weights(given)


def test_inception_extractor_with_local_weights(tmp_path, monkeypatch, no_network):
    # Random-init weights in the real file layout: exercises the offline path end to end.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    assert check_inception_weights(None) == path

    # Random weights fail the official name's hash prefix: a copy named by its own SHA-256 (torch.hub style).
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    own = path.with_name(f"weights-inception-random-{digest[:8]}.pth")
    own.write_bytes(path.read_bytes())
    ext = InceptionExtractor(own, batch_size=1)  # chunked extraction
    assert ext.extractor_id == f"inception-v3-compat-sha256-{digest[:16]}"
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    f, lg = ext.extract(x)
    assert f.shape == (2, 2048) and lg.shape == (2, 1008) and f.dtype == lg.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(ext.extract(x)[0], f)


def test_uint8_conversion_rounds_and_repeats_grey():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0, 1.5]).view(1, 1, 1, 6)
    u = to_uint8_range(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 3, 1, 6)
    assert u[0, 0, 0].tolist() == [0, 0, 128, 255, 255, 255]
    assert torch.equal(u[:, 0], u[:, 2])
