"""What a sweep leaves for a reader: figures, sample grids (columns = classes), report.md, the summary table
and the trend checks. Synthetic rows and tiny grids: no model is trained or sampled."""

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.trends import check_trends
from lightning_modules.sweep import SweepStore, format_table, summary
from lightning_modules.sweep.grids import first_samples, read_grid, to_uint8
from lightning_modules.sweep.report import write_outputs
from lightning_modules.sweep.store import COLUMNS, INTEGER, TEXT, png_bytes

GRIDS = {"cfg": [0.0, 1.0, 2.0, 3.0], "cg_cond": [0.0, 0.5, 1.0], "cg_uncond": [0.0, 1.0, 4.0, 16.0, 64.0]}
OFFSET = {"cfg": 0.0, "cg_cond": 1.0, "cg_uncond": 0.0}
FIGURES = ["best_fid_vs_cost.png", "metrics_vs_scale.png", "metrics_vs_gamma.png", "front_fid_vs_accuracy.png",
           "front_precision_vs_recall.png"]


def row(method, scale, seed, fid=1.0, accuracy=0.5, seconds_per_sample=0.01, **kw):
    base = {"method": method, "scale": float(scale), "gamma": float(scale) + OFFSET.get(method, 0.0), "seed": seed,
            "num_samples": 100, "sampler": "ddim", "steps": 10, "eta": 0.0, "nfe_per_sample": 20.0,
            "classifier_grads_per_sample": 10.0 if method.startswith("cg") and scale else 0.0, "fid": fid,
            "kid": -0.001, "kid_std": 0.001, "score": 1 + 8 * accuracy, "precision": 0.8, "recall": 0.6,
            "accuracy": accuracy, "seconds": 1.0, "seconds_per_sample": seconds_per_sample, "diffusion_step": 600,
            "diffusion_sha": "d" * 16, "classifier_step": 300, "classifier_sha": "c" * 16,
            "extractor": "evaluator-test", "signature": "0123456789abcdef"}
    blank = {c: -1 if c in INTEGER else "" if c in TEXT else 0.0 for c in COLUMNS}  # columns this test leaves out
    return {**blank, **base, **kw}


def study(tmp_path, seeds=(0, 1), k=3, size=8):
    """A study shaped like the real one, every cell recorded through the store with its grid PNG."""
    rng, store = random.Random(0), SweepStore(tmp_path)
    for seed in seeds:
        for method, scales in GRIDS.items():
            for s in scales:
                g = s + OFFSET[method]
                fid = 0.08 + 0.5 * (math.log1p(g) - math.log1p(1.5)) ** 2 + 0.01 * rng.random()
                r = row(method, s, seed, fid=fid, accuracy=min(1.0, 0.1 + 0.9 * (1 - math.exp(-1.5 * g))),
                        recall=max(0.0, 0.8 - 0.05 * g), precision=min(1.0, 0.6 + 0.1 * g))
                r["grid"] = store.grid_path(r["signature"], method, s, seed)
                images = torch.rand(2 * k, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
                store.append(r, png_bytes(images, nrow=k))
    return store.rows


def test_cell_grid_has_class_columns_upscaled_without_blur_and_reads_back_exactly(tmp_path):
    images = torch.rand(7, 1, 8, 8) * 2 - 1
    data = png_bytes(images, nrow=3)  # 3 classes: 3 columns, 3 rows (7 samples)
    (tmp_path / "cell.png").write_bytes(data)
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
    pixels, layout = read_grid(tmp_path / "cell.png")
    assert layout.columns == 3 and layout.count == 7 and layout.upscale * 8 >= 32
    assert width >= 3 * 32 and height >= 3 * 32 and (width - 2) // 3 >= 32
    up = to_uint8(images).repeat(layout.upscale, 1).repeat(layout.upscale, 2)  # nearest: exact pixel copies
    first = first_samples(tmp_path / "cell.png")  # default: the first row, one sample per class
    assert len(first) == 3
    for i, got in enumerate(first):
        assert np.array_equal(got, up[i])
    assert all(np.array_equal(a, b) for a, b in zip(first_samples(tmp_path / "cell.png", 7), up))


def test_rgb_grid_with_more_classes_than_samples_keeps_one_row(tmp_path):
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    (tmp_path / "c.png").write_bytes(png_bytes(images, nrow=10))
    pixels, layout = read_grid(tmp_path / "c.png")
    assert (layout.columns, layout.upscale, pixels.shape[2]) == (4, 1, 3)
    assert np.array_equal(first_samples(tmp_path / "c.png")[3], to_uint8(images)[3])


def test_a_grid_written_by_the_old_layout_is_read_with_the_image_size(tmp_path):
    from torchvision.utils import save_image

    images = torch.rand(12, 1, 8, 8) * 2 - 1
    save_image((images + 1) / 2, tmp_path / "old.png", nrow=10, padding=1)
    assert read_grid(tmp_path / "old.png") is None  # no stored layout, no size: not guessed
    got = first_samples(tmp_path / "old.png", 10, image_size=8)
    assert len(got) == 10 and np.array_equal(got[4][..., 0], to_uint8(images)[4][..., 0])


def test_write_outputs_draws_every_figure_and_a_report(tmp_path):
    rows = study(tmp_path)
    protocol = {"dataset": "digits", "image_size": 8, "diffusion": "runs/x/last.ckpt", "guidance": {"interval": None}}
    paths = write_outputs(rows, tmp_path, protocol, ["cat", "dog", "owl"])
    names = {p.relative_to(tmp_path).as_posix() for p in paths}
    assert set(FIGURES) <= names
    assert {f"grids/{m}_seed{s}.png" for m in GRIDS for s in (0, 1)} <= names
    for path in paths:
        with Image.open(path) as im:
            width, height = im.size
        assert width >= 400 and height >= 250, path
    with Image.open(tmp_path / "grids" / "cg_uncond_seed0.png") as im:
        assert im.size[1] >= 5 * 32  # five scales as rows, each sample >= 32 px high
    with Image.open(tmp_path / "metrics_vs_scale.png") as im:
        assert im.size[0] >= 3 * 300  # one column per method
    report = (tmp_path / "report.md").read_text()
    for needle in ("# Guidance sweep: digits", "## Best FID per method", "## All cells", "## Protocol", "## Cost",
                   "| method | scale s | γ | FID ↓", "weights sha `dddddddddddddddd`", "`runs/x/last.ckpt`",
                   "3 classes (cat, dog, owl)", "can be slightly negative", "not on Inception's scale",
                   "exp(E_x KL(p(y|x) ‖ p(y)))", "seeds**: 0, 1", "evaluator-test"):
        assert needle in report, needle
    for name in [*FIGURES, "grids/cfg_seed0.png"]:
        assert f"]({name})" in report and (tmp_path / name).is_file(), name
    assert not list(tmp_path.glob(".*tmp*")) and not list((tmp_path / "grids").glob(".*tmp*"))


def test_per_method_figure_is_rebuilt_from_disk_and_survives_a_missing_grid(tmp_path):
    study(tmp_path, seeds=(0,))
    rows = SweepStore(tmp_path).rows  # as after an interrupted run: the cells exist only on disk
    (tmp_path / next(r for r in rows if r["method"] == "cfg" and r["scale"] == 2.0)["grid"]).unlink()
    paths = write_outputs(rows, tmp_path, {"dataset": "digits"})  # no class names: indices
    assert tmp_path / "grids" / "cfg_seed0.png" in paths
    with Image.open(tmp_path / "grids" / "cfg_seed0.png") as im:
        assert im.size[1] >= 4 * 32


def test_one_seed_reports_no_spread_instead_of_zero(tmp_path):
    rows = [row("cfg", 0, 0, fid=0.5), row("cfg", 1, 0, fid=0.2), row("cfg", 2, 0, fid=0.3)]
    best = summary(rows)[0]
    assert best["best_scale"] == 1.0 and math.isnan(best["fid_std"]) and best["seeds"] == 1
    table = format_table([best], ["method", "fid", "fid_std", "seeds"])
    assert table.splitlines()[1].split() == ["cfg", "0.2", "—", "1"]
    for r in rows:
        r["grid"] = "missing.png"
    write_outputs(rows, tmp_path, {"dataset": "digits"})
    assert "0.2 ± —" in (tmp_path / "report.md").read_text()


def test_summary_reports_the_best_cells_own_seconds_per_sample():
    rows = [row("cg_cond", s, seed, fid=f, seconds_per_sample=t)
            for seed in (0, 1) for s, f, t in ((0.0, 0.5, 0.01), (1.0, 0.1, 0.03 + 0.01 * seed), (2.0, 0.4, 0.05))]
    best = summary(rows)[0]
    assert best["best_scale"] == 1.0 and best["seconds_per_sample"] == pytest.approx(0.035)
    assert best["seconds_per_sample_std"] == pytest.approx(math.sqrt(0.00005))
    assert best["classifier_grads_per_sample"] == 10.0 and best["seeds"] == 2


@pytest.mark.parametrize("fids, verdict", [([0.1, 0.3, 0.5, 0.7], "NOT MET"), ([0.7, 0.1, 0.5, 0.7], "ok"),
                                           ([0.7, 0.5, 0.3, 0.1], "NOT MET")])
def test_fid_best_at_a_moderate_scale_is_met_only_strictly_inside_the_grid(fids, verdict):
    rows = [row("cfg", s, 0, fid=f, accuracy=0.2 + 0.2 * i, recall=0.8 - 0.1 * i)
            for i, (s, f) in enumerate(zip([0, 1, 2, 3], fids))]
    lines = check_trends(rows)
    (fid_line,) = [line for line in lines if "FID best" in line]
    assert fid_line.strip().startswith(verdict)
    assert all(line.strip().startswith("ok") for line in lines if "FID best" not in line)


@pytest.mark.parametrize("accuracies, verdict", [([0.974, 0.98, 0.988], "ok"), ([0.974, 0.975, 0.98], "NOT MET"),
                                                 ([0.5, 0.6, 0.7], "ok"), ([0.974, 0.99, 0.93], "NOT MET")])
def test_accuracy_rises_by_a_margin_or_by_a_third_fewer_errors(accuracies, verdict):
    """Near 100% a model cannot rise by 0.02: 2.6% → 1.2% errors is the trend; 2.6% → 2.0% is not."""
    rows = [row("cfg", s, 0, accuracy=a) for s, a in zip((0, 1, 2), accuracies)]
    (line,) = [line for line in check_trends(rows) if "accuracy rises" in line]
    assert line.strip().startswith(verdict)


def test_flat_trends_are_not_met_and_short_grids_are_skipped():
    flat = [row("cfg", s, 0, accuracy=0.9, recall=0.5) for s in (0, 1, 2)]
    assert all(line.strip().startswith("NOT MET") for line in check_trends(flat))
    assert check_trends([row("cfg", 0, 0), row("cfg", 1, 0)])[0].strip().startswith("skipped")


def test_front_labels_never_overlap():
    from lightning_modules.sweep.fronts import place_labels
    from lightning_modules.sweep.plots import new_figure

    rng = random.Random(1)
    points = [(0.95 + 0.05 * rng.random(), 0.1 + 0.2 * rng.random()) for _ in range(40)]  # a clump
    fig, ax = new_figure((5, 4))
    ax.plot(*zip(*points), "o")
    ax.set_xlim(0.94, 1.01)
    ax.set_ylim(0.09, 0.31)
    placed = place_labels(fig, ax, [(x, y, f"{i}", "black", False) for i, (x, y) in enumerate(points)], points)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert 0 < placed == len(boxes) <= len(points)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_matched_strength_interpolates_where_each_method_reaches_the_common_accuracy():
    from lightning_modules.sweep.tables import summary

    rows = []
    grid = {"cfg": [(0, 0, 0.1, 1.0, 0.9), (1, 1, 0.8, 0.2, 0.8), (2, 2, 0.96, 0.1, 0.7), (3, 3, 0.99, 0.3, 0.5)],
            "cg_cond": [(0, 1, 0.8, 0.2, 0.8), (1, 2, 0.9, 0.15, 0.75), (2, 3, 0.94, 0.2, 0.6)]}
    for method, points in grid.items():
        for scale, gamma, acc, fid, recall in points:
            rows.append(dict(method=method, scale=scale, gamma=gamma, accuracy=acc, fid=fid, recall=recall, seed=0,
                             nfe_per_sample=1.0, classifier_grads_per_sample=0.0, seconds_per_sample=0.1))
    from lightning_modules.sweep.tables import matched_level, matched_strength

    level = matched_level(rows, target=0.94)
    matched = matched_strength(rows, level)
    assert matched["cfg"]["matched_scale"] == pytest.approx(1.875)  # 0.8 → 0.96 between s = 1 and 2
    assert matched["cfg"]["matched_fid"] == pytest.approx(0.1125)
    assert matched["cfg"]["matched_recall"] == pytest.approx(0.7125)
    assert (matched["cg_cond"]["matched_scale"], matched["cg_cond"]["matched_fid"]) == (2, 0.2)
    best = {b["method"]: b for b in summary(rows)}  # default level 0.99: cfg reaches it, cg_cond (0.94) never
    assert best["cfg"]["matched_accuracy"] == 0.99 and best["cfg"]["matched_scale"] == pytest.approx(3.0)
    assert math.isnan(best["cg_cond"]["matched_scale"])


def test_the_gamma_zoom_spans_the_range_most_methods_share():
    """Neither CFG's unconditional end (γ = 0) nor a method swept far out (clean CG to s = 128) stretches the
    zoom: it runs from the median first γ to the median last γ over methods."""
    from lightning_modules.sweep.plots import zoom_range

    grids = {"cfg": [0, 1, 1.25, 2, 3], "cg_cond": [0, 0.5, 2], "autoguidance": [1, 1.5, 3], "cg_clean": [0, 8, 128]}
    rows = [row(m, s, 0) for m, scales in grids.items() for s in scales]
    assert zoom_range(rows) == pytest.approx((0.9, 3.1))  # [1, 3] and 5% padding (cg_cond's γ is 1 + s)
    # Two methods that share no γ: the whole range.
    disjoint = [row("cfg", 0, 0), row("cfg", 2, 0), row("cg_uncond", 4, 0), row("cg_uncond", 8, 0)]
    assert zoom_range(disjoint) == pytest.approx((-0.4, 8.4))
