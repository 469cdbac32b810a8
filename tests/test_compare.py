"""The README's main command, at a tiny setting: it finishes, names its outputs, and reuses stages."""

import pytest

from experiments import compare
from lightning_modules.sweep import engine

pytestmark = pytest.mark.slow

TINY = ["--classifier_steps", "5", "--diffusion_steps", "5", "--num_samples", "20", "--steps", "2", "--seeds", "0",
        "1", "--extra", "--sweep.progress=false", "--trainer.enable_progress_bar=false"]


def test_compare_runs_end_to_end_then_reuses_every_stage(tmp_path, monkeypatch, capsys, recwarn):
    monkeypatch.chdir(tmp_path)  # caches (.cache/guidelab) and runs/ land here
    monkeypatch.setenv("WANDB_MODE", "disabled")
    rows = compare.main(["--out", str(tmp_path / "out"), *TINY])
    methods = {r["method"] for r in rows}
    assert methods == {"cfg", "cg_cond", "cg_uncond", "autoguidance", "cg_clean"}
    assert {r["seed"] for r in rows} == {0, 1}
    out = capsys.readouterr().out
    assert "Best FID per method" in out and "Trend checks" in out
    tail = out.strip().splitlines()[-1]
    assert tail.startswith("sweep table:") and tail.endswith("sweep.csv")
    (sweep_dir,) = (tmp_path / "out").glob("sweep-*")
    assert (sweep_dir / "metrics_vs_scale.png").exists() and (sweep_dir / "sweep.json").exists()

    # The checkpoints handed on are exactly the ones the stages trained (their final steps), and the sweep's
    # rows say so, with the networks' weight hashes.
    assert {r["diffusion_step"] for r in rows} == {5} and {r["classifier_step"] for r in rows} == {5}
    assert {r["clean_classifier_step"] for r in rows} == {5} and {r["guide_step"] for r in rows} == {1}
    assert len({r["diffusion_sha"] for r in rows}) == 1 and len({r["classifier_sha"] for r in rows}) == 1

    # Second run: both fits and every sweep cell are reused; no sampling pass runs.
    calls = []
    monkeypatch.setattr(engine, "generate_images", lambda *a, **k: calls.append(a) or iter(()))
    again_rows = compare.main(["--out", str(tmp_path / "out"), *TINY])
    again = capsys.readouterr().out
    assert "[classifier] reusing" in again and "[diffusion] reusing" in again
    assert calls == [] and len(again_rows) == len(rows)
    # Lightning's known noise is fixed at its source: compare's argv is hidden from LightningCLI, and the sweep
    # stage checkpoints nothing (restoring the diffusion checkpoint warned that its dirpath changed).
    noise = [str(w.message) for w in recwarn if "dirpath has changed" in str(w.message)
             or "args parameter is intended" in str(w.message)]
    assert noise == []


def test_trained_recipe_trains_mg_and_gft_and_sweeps_them_beside_cfg(tmp_path, monkeypatch, capsys):
    """The trained-in guidance study at a tiny setting: it adds an MG model (from scratch, the CFG model's steps)
    and a GFT fine-tune of the CFG model (--gft_steps), sweeps them beside CFG at one evaluation per step, and
    every row carries the network that made it and what that network cost to train."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tiny = ["--classifier_steps", "5", "--diffusion_steps", "8", "--gft_steps", "3", "--num_samples", "20",
            "--steps", "2", "--seeds", "0", "--extra", "--sweep.progress=false", "--trainer.enable_progress_bar=false"]
    rows = compare.main(["--out", str(tmp_path / "out"), "--sweep_recipe",
                         str(compare.CONFIGS / "digits_sweep_trained.yaml"), *tiny])
    assert {r["method"] for r in rows} == {"cfg", "cg_cond", "autoguidance", "mg", "gft"}
    by_method = {m: [r for r in rows if r["method"] == m] for m in ("cfg", "mg", "gft")}
    objective = {m: {r["training_objective"] for r in rs} for m, rs in by_method.items()}
    assert objective == {"cfg": {"none"}, "mg": {"mg w=0.45 t<0.75"}, "gft": {"gft β∈[0, 1] + init"}}
    steps = {m: {r["diffusion_step"] for r in rs} for m, rs in by_method.items()}
    assert steps == {"cfg": {8}, "mg": {8}, "gft": {3}}
    shas = {m: {r["diffusion_sha"] for r in rs} for m, rs in by_method.items()}
    assert len(shas["cfg"] | shas["mg"] | shas["gft"]) == 3  # three distinct networks
    # Sampling cost: CFG pays two evaluations a step (one at s = 0 and s = 1), trained-in guidance one.
    nfe = {m: {r["scale"]: r["nfe_per_sample"] for r in rs} for m, rs in by_method.items()}
    assert nfe["cfg"][1.5] == 2 * nfe["mg"][0.45] == 2 * nfe["gft"][1.5] == 4
    # Training cost: MG's steps pay an extra no-grad EMA forward of both branches, so at equal steps it costs
    # more than the CFG model; GFT's fine-tune includes the CFG model it started from.
    flops = {m: rs[0]["training_flops"] for m, rs in by_method.items()}
    assert flops["mg"] > flops["cfg"] > 0 and flops["gft"] > flops["cfg"]
    out = capsys.readouterr().out
    assert "Training cost beside sampling cost" in (next((tmp_path / "out").glob("sweep-*")) / "report.md").read_text()
    assert "mg model:" in out and "gft model:" in out
