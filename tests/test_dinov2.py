"""FD_DINOv2: a tiny, randomly initialised transformers Dinov2Model saved locally stands in for ViT-L/14 (nothing is
downloaded). Features, preprocessing against independent torchvision / PIL / transformers computations, a sweep scored
in its space (main and extra ruler), and the errors for a missing or broken directory."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.diffusion import OptionError
from lightning_modules.evaluation import feature_statistics
from lightning_modules.evaluation.dinov2 import DINOv2Extractor, dinov2_inputs, hub_position_embeddings
from lightning_modules.evaluation.metrics import reference_moments
from lightning_modules.sweep import Evaluation, SweepConfig, SweepStore, check_extractor_available, run_sweep
from lightning_modules.sweep.orchestration import protocol_of, sweep_and_report, sweep_verdicts

from .test_sweep_engine import config, make_models, toy_evaluation

transformers = pytest.importorskip("transformers")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def save_tiny_dinov2(directory: Path, image_size: int = 224, seed: int = 0) -> Path:
    """A random Dinov2Model (hidden 32, 2 layers, 2 heads, patch 14) saved with save_pretrained (safetensors)."""
    torch.manual_seed(seed)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    patch_size=14, image_size=image_size)
    transformers.Dinov2Model(cfg).save_pretrained(directory)
    assert (directory / "model.safetensors").is_file() and not list(directory.glob("*.bin"))
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def extractor(tiny) -> DINOv2Extractor:
    return DINOv2Extractor(tiny)


def grey(n: int = 5, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_features_are_the_cls_token_deterministic_and_batch_independent(tiny, extractor):
    x = grey()
    feats, logits = extractor.extract(x)
    assert feats.shape == (5, 32) and feats.dtype == torch.float32 and logits.shape == (5, 0)
    assert extractor.num_features == 32 and torch.isfinite(feats).all()
    assert torch.equal(feats, extractor.extract(x)[0])
    again = DINOv2Extractor(tiny, batch_size=2)  # another instance, other chunks
    torch.testing.assert_close(again.extract(x)[0], feats, atol=1e-5, rtol=1e-5)
    assert again.extractor_id == extractor.extractor_id and extractor.extractor_id.startswith("dinov2-d3214-cls224-")


def test_the_id_follows_the_weights(tmp_path, extractor):
    other = DINOv2Extractor(save_tiny_dinov2(tmp_path / "other", seed=1))
    assert other.extractor_id != extractor.extractor_id
    assert not torch.allclose(other.extract(grey())[0], extractor.extract(grey())[0])


def smooth(n: int = 3, size: int = 16) -> torch.Tensor:
    """Grey images in [-0.8, 0.8] without edges: bicubic stays within [0, 1], so PIL's uint8 clamp never bites."""
    t = torch.linspace(0, math.pi, size)
    base = torch.sin(t)[:, None] * torch.cos(t / 2)[None, :]
    return torch.stack([0.8 * torch.roll(base, k, dims=1) for k in range(n)])[:, None]


def test_preprocessing_matches_torchvision_and_dgm_evals_pil_route(extractor, tiny):
    from PIL import Image
    from torchvision.transforms import functional as TF
    from torchvision.transforms import v2

    x = smooth()
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    # torchvision on tensors (bicubic, antialias), then ImageNet normalisation.
    tv = v2.functional.normalize(v2.functional.resize(u8.float() / 255, [224, 224], v2.InterpolationMode.BICUBIC,
                                                      antialias=True), MEAN, STD)
    ours = dinov2_inputs(x)
    torch.testing.assert_close(ours, tv, atol=1e-5, rtol=0)
    # dgm-eval's own route: PIL bicubic resize of the uint8 image, ToTensor, Normalize (uint8 rounding apart).
    pil = torch.stack([TF.to_tensor(TF.resize(Image.fromarray(img.permute(1, 2, 0).numpy()), [224, 224],
                                              TF.InterpolationMode.BICUBIC)) for img in u8])
    unnormalised = ours * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert float((unnormalised - pil).abs().max()) <= 1.5 / 255
    # The features: transformers' own forward on that input, CLS token of the last layer after its LayerNorm.
    model = transformers.Dinov2Model.from_pretrained(tiny, use_safetensors=True, local_files_only=True).eval()
    with torch.no_grad():
        out = model(pixel_values=tv)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])
    torch.testing.assert_close(extractor.extract(x)[0], out.pooler_output, atol=1e-5, rtol=1e-5)


def test_position_embeddings_are_interpolated_the_hub_way(tmp_path):
    """Checkpoints trained at 518 px (37 × 37 patches): the hub model samples (16 + 0.1) / 37, transformers 16 / 37."""
    directory = save_tiny_dinov2(tmp_path / "p518", image_size=518)
    ext = DINOv2Extractor(directory)
    stored = transformers.Dinov2Model.from_pretrained(directory).embeddings.position_embeddings.detach()
    grid = stored[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    hub = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic")
    hub = hub.permute(0, 2, 3, 1).reshape(1, -1, 32)
    used = ext.model.embeddings.position_embeddings.detach()
    torch.testing.assert_close(used, torch.cat([stored[:, :1], hub], 1))
    assert torch.equal(hub_position_embeddings(used, 16), used)  # already 16 × 16: unchanged
    size = F.interpolate(grid, size=(16, 16), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 32)
    assert not torch.allclose(used[:, 1:], size, atol=1e-4)  # what transformers alone would use
    assert ext.extract(grey(2))[0].shape == (2, 32)


def dinov2_evaluation(extractor: DINOv2Extractor) -> Evaluation:
    real = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    feats = extractor.extract(real)[0]
    return Evaluation(extractor, "dinov2", feats, reference_moments(*feature_statistics(feats)), "toy-train")


def test_a_sweep_scored_in_dinov2_space(tmp_path, tiny, extractor):
    settings = config(tmp_path, extractor="dinov2", dinov2_dir=str(tiny), bootstrap=4, num_samples=12)
    protocol = protocol_of(settings, dataset="toy", dataset_id="toy", image_size=8, diffusion=None, bf16=False)
    outcome = sweep_and_report(settings, make_models(), dinov2_evaluation(extractor), tmp_path, protocol)
    rows = outcome.rows
    assert len(rows) == 3 and "FD_DINOv2" in outcome.report.read_text()  # the report names the space
    for r in rows:
        assert r["extractor"] == extractor.extractor_id and "dinov2" in r["extractor"]
        for metric in ("fid", "kid", "precision", "recall"):
            assert math.isfinite(r[metric]) and r[f"{metric}_lo"] <= r[metric] <= r[f"{metric}_hi"], metric
        assert math.isnan(r["score"]) and math.isnan(r["accuracy"])  # no classifier head


def test_dinov2_as_an_extra_ruler(tmp_path, tiny, extractor):
    evaluation = toy_evaluation()
    evaluation.extras = {"dinov2": dinov2_evaluation(extractor)}
    store = SweepStore(tmp_path)
    settings = config(tmp_path, extra_extractors=["dinov2"], dinov2_dir=str(tiny), bootstrap=4, num_samples=12)
    rows = run_sweep(settings, make_models(), evaluation, store)
    assert {r["extractor"] for r in rows} == {"toy-projection"}
    draws = store.read_draws(rows[0])["spaces"]
    assert set(draws) == {"toy-projection", extractor.extractor_id}
    assert np.isfinite(draws[extractor.extractor_id]["half"]["fid"]).all()
    found = sweep_verdicts(rows, store)
    assert found is not None and extractor.extractor_id in found["spaces"]


def test_a_missing_or_broken_directory_names_the_option(tmp_path, tiny):
    with pytest.raises(OptionError) as err:
        SweepConfig(extractor="dinov2")
    assert err.value.option == "sweep.dinov2_dir"
    with pytest.raises(OptionError, match="sweep.dinov2_dir"):
        SweepConfig(extra_extractors=["dinov2"])
    cases = {"missing": None, "no_weights": ["config.json"], "pickle_only": ["config.json", "pytorch_model.bin"],
             "truncated": ["config.json", "model.safetensors"], "not_dinov2": ["model.safetensors", "config.json"]}
    for case, files in cases.items():
        directory = tmp_path / case
        if files is not None:
            directory.mkdir()
            for name in files:
                (directory / name).write_bytes((tiny / name).read_bytes() if name != "pytorch_model.bin" else b"x")
        if case == "truncated":
            (directory / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes()[:200])
        if case == "not_dinov2":
            (directory / "config.json").write_text('{"model_type": "vit"}')
        with pytest.raises(OptionError) as err:
            check_extractor_available("dinov2", None, str(directory))
        assert err.value.option == "sweep.dinov2_dir", case
        with pytest.raises(OptionError, match="sweep.dinov2_dir"):  # the same as an extra ruler
            check_extractor_available("evaluator", None, str(directory), ["dinov2"])
    assert "refused" in str(pytest.raises(OptionError, DINOv2Extractor, tmp_path / "pickle_only").value)
    check_extractor_available("dinov2", None, str(tiny))  # a good directory passes


def test_a_ruler_without_accuracy_reads_matched_strength_off_the_main_space():
    """Verdicts from hand-made draws: the DINOv2 space has no accuracy of its own, the main space's reaches 0.95."""
    from lightning_modules.sweep.verdicts import verdicts

    gen = torch.Generator().manual_seed(0)
    rows, records = [], {}
    for method, scales in (("cfg", (1.0, 3.0)), ("cg_cond", (0.0, 2.0))):
        for j, scale in enumerate(scales):
            acc = 0.9 + 0.1 * j  # reaches the matched level (0.99) between the two scales
            spaces = {}
            for space, offset in (("main", 0.0), ("dinov2-test", 1.0)):
                full = {"fid": 1.0 + offset - 0.2 * j, "kid": 0.01, "score": math.nan if offset else 2.0,
                        "precision": 0.8, "recall": 0.7 - 0.1 * j, "accuracy": math.nan if offset else acc}
                draws = {m: [v + 0.002 * float(torch.randn((), generator=gen)) for _ in range(4)]
                         for m, v in full.items()}
                spaces[space] = {"n": 8, "draws": 4, "labels_sha": "l", "halves_sha": "h", "extractor": space,
                                 "reference": "r", "full": full, "half": draws, "rest": draws}
            row = {"method": method, "scale": scale, "gamma": scale + (method == "cg_cond"), "seed": 0,
                   "extractor": "main", "draws": f"{method}{scale}", **spaces["main"]["full"]}
            rows.append(row)
            records[row["draws"]] = {"spaces": spaces}
    found = verdicts(rows, lambda r: records[r["draws"]])
    matched = [c for c in found["comparisons"] if c["at"] == "matched strength"]
    assert matched and all(c["verdict"] != "—" for c in matched)
    assert all(c["spaces"]["dinov2-test"] != "—" for c in matched)  # defined: the main space's accuracy
