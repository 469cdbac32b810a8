"""Checkpoints are read safely (no URL, no code, a clear error for an empty file), saved atomically beside their
target (never through $TMPDIR), and a fit resumed elsewhere keeps its guide snapshots."""

from __future__ import annotations

import errno
import http.server
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import traceback
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import torch

import callbacks.checkpoint_io as checkpoint_io
from callbacks import GuideSnapshots, LastCheckpoint, SafeCheckpointIO
from experiments import compare
from experiments.train import main
from lightning_modules.diffusion import OptionError
from lightning_modules.sweep import SweepConfig
from lightning_modules.sweep.loading import load_guide, load_helper_networks, read_checkpoint

from .helpers import CONFIGS, FAST_TRAINER, TINY_NET
from .test_checkpointing import build, load


class Touch:
    """Unpickling this creates `marker` (pathlib.Path.touch): the stand-in for a payload that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return pathlib.Path.touch, (self.marker,)


def crafted(path: Path, marker: Path) -> Path:
    """A checkpoint-shaped file whose unpickling (weights_only=False) touches `marker`."""
    torch.save({"state_dict": {}, "hyper_parameters": {}, "global_step": 0, "x": Touch(marker)}, path)
    return path


@contextmanager
def serve(directory: Path):
    """`directory` over HTTP on loopback, in a thread that is always stopped; yields (base URL, requests seen)."""
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        timeout = 10  # a stuck client cannot hold the thread

        def log_message(self, *args) -> None:
            seen.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def shown(err: BaseException | None) -> str:
    """The messages a traceback of `err` shows: its own and those of the exceptions chained to it."""
    text = ""
    while err is not None:
        text += "".join(traceback.format_exception_only(type(err), err))
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return text


TORCH_ADVICE = ("weights_only=False", "Re-running", "add_safe_globals", "safe_globals(")
FIT = ["fit", "--config", str(CONFIGS / "digits_classifier.yaml"), *TINY_NET, *FAST_TRAINER, "--trainer.max_steps=1",
       "--data.batch_size=256"]


# --------------------------------------------------------------------------------- 1. URLs and crafted files
@pytest.mark.parametrize("kind", ["http", "file", "local"])
def test_ckpt_path_url_or_crafted_file_is_refused_and_runs_nothing(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # where a download would land
    served, marker = tmp_path / "served", tmp_path / "MARKER"
    served.mkdir()
    ckpt = crafted(served / "crafted.ckpt", marker)
    with serve(served) as (base, seen):
        source = {"http": f"{base}/crafted.ckpt", "file": ckpt.as_uri(), "local": str(ckpt)}[kind]
        with pytest.raises(OptionError) as err:
            main([*FIT, f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--ckpt_path", source])
    msg = str(err.value)
    assert not marker.exists()
    assert "ckpt_path" in msg and source in msg and not any(a in shown(err.value) for a in TORCH_ADVICE)
    if kind == "local":
        assert "could run code" in msg
    else:
        assert "URL" in msg and "download it" in msg and "local file" in msg and seen == []  # nothing fetched


def test_lightning_special_ckpt_values_still_reach_lightning(tmp_path):
    # "last" with nothing saved yet: Lightning warns and starts fresh (not an OptionError of ours).
    cli = main([*FIT, f"--trainer.logger.init_args.save_dir={tmp_path}", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 1


def test_every_trainer_load_is_weights_only_even_when_asked_otherwise(tmp_path, monkeypatch):
    """Past the CLI's check (experiments.compare calls trainer.fit itself): SafeCheckpointIO still refuses."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    served, marker = tmp_path / "served", tmp_path / "MARKER"
    served.mkdir()
    ckpt = crafted(served / "crafted.ckpt", marker)
    cli = build("classifier", tmp_path / "logs", extra=["--trainer.max_steps=1", "--data.batch_size=256"])
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)
    with serve(served) as (base, seen):
        for source in (str(ckpt), f"{base}/crafted.ckpt", ckpt.as_uri()):
            with pytest.raises(OptionError, match="ckpt_path") as err:
                cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=source, weights_only=False)
            assert not any(a in shown(err.value) for a in TORCH_ADVICE)
    assert not marker.exists() and seen == []


def test_user_checkpoint_io_plugins_are_refused_other_plugins_kept(tmp_path):
    from lightning.pytorch.plugins.environments import LightningEnvironment

    from experiments.train import _with_safe_checkpoint_io

    env = LightningEnvironment()
    plugins = _with_safe_checkpoint_io([env])
    assert plugins[0] is env and isinstance(plugins[1], SafeCheckpointIO)
    with pytest.raises(OptionError, match="trainer.plugins"):
        _with_safe_checkpoint_io(checkpoint_io.TorchCheckpointIO())


# ---------------------------------------------------------------------------- 4. torch's advice never shown
def test_crafted_checkpoint_error_gives_the_reason_not_torchs_advice(tmp_path):
    marker = tmp_path / "MARKER"
    ckpt = crafted(tmp_path / "crafted.ckpt", marker)
    readers = (lambda: read_checkpoint(ckpt, "sweep.classifier_ckpt"), lambda: SafeCheckpointIO().load_checkpoint(ckpt))
    for read in readers:
        with pytest.raises(OptionError) as err:
            read()
        msg, text = str(err.value), shown(err.value)
        assert str(ckpt) in msg and "not plain tensors/containers" in msg and "could run code" in msg
        assert not any(a in text for a in TORCH_ADVICE) and "\x1b[" not in text
    assert not marker.exists()


# ------------------------------------------------------------------------------------ 3. empty checkpoints
def _options(empty: str) -> dict:
    return {"sweep.classifier_ckpt": SweepConfig(methods=["cg_cond"], classifier_ckpt=empty),
            "sweep.guide_ckpt": SweepConfig(methods=["autoguidance"], guide_ckpt=empty),
            "sweep.clean_classifier_ckpt": SweepConfig(methods=["cg_clean"], clean_classifier_ckpt=empty)}


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_empty_or_truncated_checkpoint_is_one_clear_error_for_every_option(tmp_path, damage):
    good = io.BytesIO()
    torch.save({"state_dict": {"w": torch.randn(500)}, "hyper_parameters": {}}, good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"" if damage == "empty" else good.getvalue()[:300])
    errors = {}
    for option, config in _options(str(bad)).items():
        with pytest.raises(OptionError) as err:
            load_helper_networks(config, {}, str(tmp_path / "last.ckpt"))
        errors[option] = err.value
    for subcommand in ("fit", "validate"):
        with pytest.raises(OptionError) as err:
            main([subcommand, *FIT[1:], f"--trainer.logger.init_args.save_dir={tmp_path}", "--ckpt_path", str(bad)])
        errors[f"ckpt_path ({subcommand})"] = err.value
    from experiments.sweep import main as sweep_main

    with pytest.raises(OptionError) as err:
        sweep_main(["--diffusion", str(bad), "--sweep.methods", "[cfg]", "--sweep.output_dir", str(tmp_path / "o")])
    errors["diffusion"] = err.value
    for option, e in errors.items():
        msg = str(e)
        assert option.split(" ")[0] in msg and str(bad) in msg and damage in msg and "Fix:" in msg, (option, msg)
        assert "Traceback" not in msg and not any(a in shown(e) for a in TORCH_ADVICE)


def test_compare_stage_with_an_unreadable_last_ckpt_trains_again(tmp_path, capsys):
    args = ["--config", str(CONFIGS / "digits_classifier.yaml"), *TINY_NET, *FAST_TRAINER, "--trainer.max_steps=3",
            "--data.batch_size=256"]
    last = compare.fit_stage(tmp_path, "classifier", args)
    done, aside = last.parent.parent / "done.json", last.with_name("last.ckpt.corrupt")
    good = last.read_bytes()
    capsys.readouterr()
    # A finished stage whose last.ckpt is empty; then an interrupted one (no done.json) with a truncated one.
    for damaged, keep_done in ((b"", True), (good[: len(good) // 2], False)):
        last.write_bytes(damaged)
        if not keep_done:
            done.unlink()
        assert compare.fit_stage(tmp_path, "classifier", args) == last
        out, err = capsys.readouterr()
        lines = [line for line in out.splitlines() if "cannot be read" in line]
        assert len(lines) == 1 and "last.ckpt.corrupt" in lines[0] and "Traceback" not in out + err
        assert aside.read_bytes() == damaged  # moved aside, not deleted
        assert load(last)["global_step"] == 3 and json.loads(done.read_text())["global_step"] == 3


# ------------------------------------------------------------------------------------------ 2. atomic saves
def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_every_checkpoint_save_goes_beside_its_target_never_through_tmpdir(tmp_path, monkeypatch):
    cli = build("diffusion", tmp_path / "logs", every=2,
                extra=["--trainer.max_steps=4", "--data.batch_size=256", "--trainer.limit_train_batches=2"])
    # A $TMPDIR that does not exist: a save that goes through it (Lightning's fsspec transaction) fails.
    monkeypatch.setenv("TMPDIR", str(tmp_path / "no-tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-tmp"))
    real_replace, renames = os.replace, []

    def replace(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    cli.trainer.fit(cli.model, cli.datamodule)
    manual = tmp_path / "manual" / "step4.ckpt"
    cli.trainer.save_checkpoint(manual)
    names = {dst.name for _, dst in renames}
    assert {"last.ckpt", "guide-1of4.ckpt", "step4.ckpt"} <= names and any(n.startswith("best-") for n in names)
    assert all(src == dst.with_name(f".{dst.name}.tmp-{os.getpid()}") for src, dst in renames)
    assert load(manual)["global_step"] == load(cli.trainer.checkpoint_callback.last_model_path)["global_step"] == 4
    assert _temps(tmp_path) == [] and not (tmp_path / "no-tmp").exists()


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk_full", "interrupted"])
def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, failure):
    cli = build("classifier", tmp_path / "logs", extra=["--trainer.max_steps=2", "--data.batch_size=256"])
    cli.trainer.fit(cli.model, cli.datamodule)
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    before = last.read_bytes()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, io.BytesIO):
            return real_save(obj, f, *args, **kwargs)
        f.write(b"\0" * 4096)  # some bytes reached the disk, then it filled up / the process was stopped
        raise failure

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(type(failure)):
        cli.trainer.save_checkpoint(last)
    assert last.read_bytes() == before and _temps(tmp_path) == [] and list(tmp.iterdir()) == []


def test_fit_start_removes_temp_files_of_dead_processes_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cli = build("classifier", tmp_path / "logs", extra=["--trainer.max_steps=1", "--data.batch_size=256"])
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    for callback in cli.trainer.checkpoint_callbacks:
        callback.dirpath = str(directory)
    stale, live = directory / f".last.ckpt.tmp-{dead.pid}", directory / f".guide-1of4.ckpt.tmp-{os.getppid()}"
    stale.write_bytes(b"partial")
    live.write_bytes(b"a save in progress")
    cli.trainer.fit(cli.model, cli.datamodule)
    assert not stale.exists() and live.exists() and (directory / "last.ckpt").is_file()


# ------------------------------------------------------------------------- 5. snapshots of a resumed fit
def _with_snapshots(cli, fractions: list[str]):
    cli.trainer.callbacks = [GuideSnapshots(fractions) if isinstance(c, GuideSnapshots) else c
                             for c in cli.trainer.callbacks]
    assert any(isinstance(c, LastCheckpoint) for c in cli.trainer.callbacks)
    return cli


def test_fit_resumed_into_a_new_directory_keeps_the_earlier_guide_snapshots(tmp_path):
    extra = ["--trainer.max_steps=8", "--data.batch_size=256", "--trainer.check_val_every_n_epoch=50"]
    killed = _with_snapshots(build("diffusion", tmp_path / "old", every=2, kill=4, extra=extra), ["1/4", "3/4"])
    with pytest.raises(RuntimeError, match="killed"):
        killed.trainer.fit(killed.model, killed.datamodule)
    old_last = Path(killed.trainer.checkpoint_callback.last_model_path)
    old = old_last.parent
    assert load(old_last)["global_step"] == 4 and (old / "guide-1of4.ckpt").is_file()

    resumed = _with_snapshots(build("diffusion", tmp_path / "new", every=2, extra=extra), ["1/4", "3/4"])
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(old_last))
    new = Path(resumed.trainer.checkpoint_callback.dirpath)
    assert new != old and load(new / "last.ckpt")["global_step"] == 8
    assert (new / "guide-1of4.ckpt").read_bytes() == (old / "guide-1of4.ckpt").read_bytes()  # copied
    assert load(new / "guide-3of4.ckpt")["global_step"] == 6 and not (old / "guide-3of4.ckpt").exists()
    assert _temps(tmp_path) == []

    hparams = load(new / "last.ckpt")["hyper_parameters"]
    guide = load_guide(SweepConfig(methods=["autoguidance"], guide_ckpt="snapshot:1/4"), hparams, new / "last.ckpt")
    assert guide.step == 2
    with pytest.raises(OptionError) as err:  # a fraction this fit never saved
        load_guide(SweepConfig(methods=["autoguidance"], guide_ckpt="snapshot:1/8"), hparams, new / "last.ckpt")
    msg = str(err.value)
    assert "sweep.guide_ckpt" in msg and str(new / "guide-1of8.ckpt") in msg and "does not exist" in msg
    assert "GuideSnapshots" in msg and "--sweep.guide_ckpt PATH" in msg
