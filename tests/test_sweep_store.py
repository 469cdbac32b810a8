"""The sweep's output directory under kills, concurrent runs and full disks, through the one orchestration
every entry point calls (`sweep_and_report`)."""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest

from lightning_modules.files import exclusive_lock, remove_stale_temp_files
from lightning_modules.sweep import SweepStore
from lightning_modules.sweep import engine as engine_module
from lightning_modules.sweep import plots as plots_module
from lightning_modules.sweep.orchestration import sweep_and_report
from lightning_modules.sweep.report import OutputsIncomplete

from .test_sweep_engine import config, make_models, toy_evaluation

PROTOCOL = {"dataset": "toy", "image_size": 8}


@pytest.fixture(scope="module")
def evaluation():
    return toy_evaluation()


def cells(rows: list[dict]) -> list[tuple]:
    return sorted((r["method"], r["scale"], r["seed"]) for r in rows)


def test_sweep_json_is_rewritten_from_the_csv_by_a_run_with_nothing_to_sample(tmp_path, evaluation):
    cfg, models = config(tmp_path), make_models()
    full = sweep_and_report(cfg, models, evaluation, tmp_path, PROTOCOL).rows
    # A kill between the last cell's CSV line and its sweep.json write: the JSON is one row short.
    short = json.loads((tmp_path / "sweep.json").read_text())
    (tmp_path / "sweep.json").write_text(json.dumps({**short, "rows": short["rows"][:-1]}))
    (tmp_path / "report.md").unlink()
    again = sweep_and_report(cfg, models, evaluation, tmp_path, PROTOCOL).rows
    assert cells(again) == cells(full)
    assert cells(json.loads((tmp_path / "sweep.json").read_text())["rows"]) == cells(full)
    assert (tmp_path / "report.md").is_file()


def test_two_sweeps_into_one_directory_at_once_store_every_cell_once(tmp_path, evaluation, monkeypatch):
    cfg, models = config(tmp_path, seeds=[0, 1]), make_models()  # built here: threads share torch's global RNG
    passes, errors = [], []
    real = engine_module.run_job

    def counted(*args, **kwargs):
        passes.append(args[3])  # the job
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "run_job", counted)

    def one_run():
        try:
            sweep_and_report(cfg, models, evaluation, tmp_path, PROTOCOL)
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads)
    rows = SweepStore(tmp_path).rows
    assert len(rows) == len(set(cells(rows))) == 6  # 3 cells × 2 seeds, each stored once
    assert len(passes) == len({(j.method, j.seed) for j in passes})  # the second run sampled nothing again
    assert cells(json.loads((tmp_path / "sweep.json").read_text())["rows"]) == cells(rows)


def test_the_lock_makes_a_second_writer_wait(tmp_path):
    order = []

    def second():
        with exclusive_lock(tmp_path):
            order.append("second")

    with exclusive_lock(tmp_path):
        t = threading.Thread(target=second)
        t.start()
        t.join(timeout=0.5)
        assert t.is_alive() and order == []  # blocked while the first holds the lock
        order.append("first")
    t.join(timeout=30)
    assert order == ["first", "second"]
    assert (tmp_path / ".sweep.lock").is_file()


def test_temp_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path, evaluation):
    (tmp_path / "grids").mkdir()
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = [tmp_path / f".sweep.json.tmp-{dead}", tmp_path / "grids" / f".cfg_s2_seed0_x.png.tmp-{dead}"]
    live = tmp_path / f".report.md.tmp-{os.getppid()}"  # the parent process is alive
    for path in (*stale, live):
        path.write_bytes(b"partial")
    assert set(remove_stale_temp_files(tmp_path, tmp_path / "grids")) == set(stale)
    assert live.exists() and not any(p.exists() for p in stale)
    live.unlink()
    stale[0].write_bytes(b"partial")
    sweep_and_report(config(tmp_path), make_models(), evaluation, tmp_path, PROTOCOL)
    assert not stale[0].exists()
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_a_full_disk_while_drawing_figures_is_an_error_after_everything_else(tmp_path, evaluation, monkeypatch):
    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plots_module, "_atomic_write", full_disk)  # every figure PNG
    with pytest.raises(OutputsIncomplete, match="could not be written") as err:
        sweep_and_report(config(tmp_path), make_models(), evaluation, tmp_path, PROTOCOL)
    assert "sweep.output_dir" in str(err.value) and "No space left" in str(err.value)
    assert len(SweepStore(tmp_path).rows) == 3 and (tmp_path / "report.md").is_file()  # the rows are safe
    assert not list(tmp_path.glob("*.png"))
    monkeypatch.undo()
    outcome = sweep_and_report(config(tmp_path), make_models(), evaluation, tmp_path, PROTOCOL)  # rerun: redrawn
    assert outcome.figures and all(p.is_file() for p in outcome.figures)
    assert "best_fid_vs_cost.png" in "\n".join(outcome.path_lines())


def test_a_row_key_the_store_does_not_know_raises_instead_of_being_dropped(tmp_path):
    store = SweepStore(tmp_path)
    with pytest.raises(ValueError, match=r"\['fd_dinov2'\].*store.COLUMNS"):
        store.append({"method": "cfg", "scale": 1.0, "seed": 0, "grid": "grids/x.png", "signature": "s",
                      "fd_dinov2": 1.0}, b"png")
    assert not (tmp_path / "sweep.csv").exists() and not (tmp_path / "grids").exists()
