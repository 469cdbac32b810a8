"""Paired verdicts through the sweep: persisted draws, outputs, resume, refusals (tiny random networks)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_modules.evaluation.paired import held_out_difference, paired_difference
from lightning_modules.sweep import SweepStore
from lightning_modules.sweep import engine as engine_module
from lightning_modules.sweep.orchestration import sweep_and_report
from lightning_modules.sweep.verdicts import PairingError, method_draws, verdicts

from .test_sweep_engine import config, make_models, toy_evaluation

PROTOCOL = {"dataset": "toy", "image_size": 8}
SCALES = {"cfg": [0.0, 1.0, 3.0], "cg_cond": [0.0, 2.0]}


@pytest.fixture(scope="module")
def evaluation():
    return toy_evaluation()


def study(tmp_path, **kw):
    return config(tmp_path, **{"scales": SCALES, "seeds": [0, 1], "num_samples": 12, "bootstrap": 20, **kw})


def test_every_cell_persists_its_draws_and_the_sweep_writes_verdicts_everywhere(tmp_path, evaluation):
    outcome = sweep_and_report(study(tmp_path), make_models(), evaluation, tmp_path, PROTOCOL)
    store = SweepStore(tmp_path)
    for row in outcome.rows:
        record = store.read_draws(row)["spaces"][row["extractor"]]
        assert record["n"] == 12 and record["draws"] == 20 and len(record["rest"]["fid"]) == 20
        assert record["full"]["fid"] == pytest.approx(row["fid"], rel=1e-12)
    # Cells of one seed share their halves and labels (paired); a shared plain cell points to its source's draws.
    assert len({store.read_draws(r)["spaces"][r["extractor"]]["halves_sha"] for r in outcome.rows}) == 1
    v = outcome.verdicts
    assert v is not None and v["adjustment"] == "Bonferroni" and v["z"] > 1.96
    for c in v["comparisons"]:
        if not math.isnan(c["delta"]):
            assert c["lo"] <= c["delta"] <= c["hi"] and c["verdict"] in ("better", "tie", "worse")
    assert {c["vs"] for c in v["comparisons"]} <= {"cfg", v["ranking"][0][0]}
    assert json.loads((tmp_path / "sweep.json").read_text())["verdicts"]["comparisons"] == json.loads(
        json.dumps(v["comparisons"]))
    report = (tmp_path / "report.md").read_text()
    assert "## Paired verdicts" in report and "paired_delta_fid.png" in report
    assert (tmp_path / "paired_delta_fid.png").stat().st_size > 0


def test_the_pooled_difference_is_the_mean_of_the_per_seed_differences(tmp_path, evaluation):
    outcome = sweep_and_report(study(tmp_path), make_models(), evaluation, tmp_path, PROTOCOL)
    store, rows = SweepStore(tmp_path), outcome.rows
    space = rows[0]["extractor"]
    both = method_draws(rows, store.read_draws, space)
    per_seed = []
    for seed in (0, 1):
        one = method_draws([r for r in rows if r["seed"] == seed], store.read_draws, space)
        per_seed.append(paired_difference([one["cfg"].pooled["fid"][3.0]], [one["cg_cond"].pooled["fid"][2.0]]))
    pooled = paired_difference([both["cfg"].pooled["fid"][3.0]], [both["cg_cond"].pooled["fid"][2.0]])
    assert pooled.estimate == pytest.approx((per_seed[0].estimate + per_seed[1].estimate) / 2, rel=1e-12)
    assert torch.allclose(pooled.draws, (per_seed[0].draws + per_seed[1].draws) / 2)
    best = {m: d.best() for m, d in both.items()}
    assert held_out_difference(best["cfg"], best["cg_cond"]).estimate == pytest.approx(
        float((best["cfg"].held_out - best["cg_cond"].held_out).mean()))


def test_a_resumed_sweep_gives_the_verdicts_of_an_uninterrupted_one(tmp_path, evaluation, monkeypatch):
    full = sweep_and_report(study(tmp_path / "full"), make_models(), evaluation, tmp_path / "full", PROTOCOL)
    real, calls = engine_module.run_job, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill after two finished jobs
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "run_job", killed)
    with pytest.raises(KeyboardInterrupt):
        sweep_and_report(study(tmp_path / "cut"), make_models(), evaluation, tmp_path / "cut", PROTOCOL)
    monkeypatch.setattr(engine_module, "run_job", real)
    resumed = sweep_and_report(study(tmp_path / "cut"), make_models(), evaluation, tmp_path / "cut", PROTOCOL)
    assert json.dumps(resumed.verdicts, sort_keys=True) == json.dumps(full.verdicts, sort_keys=True)


def test_cells_that_are_not_the_same_draws_are_refused(tmp_path, evaluation):
    a = sweep_and_report(study(tmp_path / "a"), make_models(), evaluation, tmp_path / "a", PROTOCOL).rows
    b = sweep_and_report(study(tmp_path / "b", num_samples=10), make_models(), evaluation, tmp_path / "b",
                         PROTOCOL).rows
    stores = {id(r): SweepStore(tmp_path / d) for d, rows in (("a", a), ("b", b)) for r in rows}

    def read(row):
        return stores[id(row)].read_draws(row)

    mixed_n = [r for r in a if r["method"] == "cfg"] + [r for r in b if r["method"] == "cg_cond"]
    with pytest.raises(PairingError, match="cannot be paired.*n"):
        verdicts(mixed_n, read)
    mixed_seeds = [r for r in a if r["method"] == "cfg"] + [r for r in a if r["method"] == "cg_cond"
                                                             and r["seed"] == 0]
    with pytest.raises(PairingError, match="seeds"):
        verdicts(mixed_seeds, read)

    def other_reference(row):  # cg_cond's cells scored against another reference set
        record = read(row)
        for space in record["spaces"].values():
            space["reference"] = "other" if row["method"] == "cg_cond" else space["reference"]
        return record

    with pytest.raises(PairingError, match="cannot be paired.*reference"):
        verdicts(a, other_reference)


def test_verdicts_reach_the_wandb_summary_and_a_table(tmp_path, evaluation):
    from callbacks.sweep_wandb import log_verdicts

    class Run:
        def __init__(self):
            self.summary, self.logged = {}, []

        def log(self, payload):
            self.logged.append(payload)

    v = sweep_and_report(study(tmp_path), make_models(), evaluation, tmp_path, PROTOCOL).verdicts
    run = Run()
    log_verdicts(run, v)
    (table,) = [p["sweep/verdicts"] for p in run.logged]
    assert len(table.data) == len(v["comparisons"])
    c = v["comparisons"][0]
    key = f"verdict/{c['method']}_vs_{c['vs']}/{c['at'].replace(' ', '_')}/{c['metric']}"
    assert run.summary[key] == pytest.approx(c["delta"]) and run.summary[f"{key}/verdict"] == c["verdict"]
    assert run.summary["verdict/ranking"] == [" = ".join(g) for g in v["ranking"]]
