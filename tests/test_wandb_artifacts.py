"""W&B Artifacts, offline: a fit records its best checkpoint and last.ckpt as versions of `model-<run id>` (type
model, aliases best / latest), a sweep its sweep.csv, sweep.json and report.md as `<sweep name>` (type
sweep-results). Read back from the offline `.wandb` transaction log (helpers.read_wandb_run: artifact records)."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest

from callbacks.sweep_wandb import RESULTS_TYPE, sweep_name

from .helpers import CONFIGS, FAST_TRAINER, TINY_NET, fit, offline_runs, sweep_args
from .test_wandb_readback import offline

pytestmark = pytest.mark.slow  # fresh processes (W&B's mode is read once per process)


def md5(path: Path) -> str:
    """A file's digest as W&B's manifest writes it: base64 of its MD5."""
    return base64.b64encode(hashlib.md5(Path(path).read_bytes()).digest()).decode()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("artifacts")
    # W&B stages a copy of every artifact file before upload: into the test's directory, not the user's home.
    old = os.environ.get("WANDB_DATA_DIR")
    os.environ["WANDB_DATA_DIR"] = str(root / "wandb-data")
    try:
        classifier = fit("classifier", root / "cls")  # in process, W&B disabled: the callback does nothing
        # Validation at steps 3 and 6 (an epoch is longer than the fit): the monitored callback keeps a best-step=N.
        offline(["fit", "--config", str(CONFIGS / "digits_diffusion.yaml"), *TINY_NET, *FAST_TRAINER,
                 "--trainer.max_steps=6", "--trainer.val_check_interval=3", "--data.batch_size=64",
                 f"--trainer.logger.init_args.save_dir={root / 'diff'}"])
        (diffusion,) = (root / "diff").glob("guidelab/*/checkpoints/last.ckpt")
        out = root / "sweep"
        offline(sweep_args(diffusion, classifier, out, root / "cache", root / "logs", {"cfg": [0.0, 2.0]}))
    finally:
        os.environ.pop("WANDB_DATA_DIR") if old is None else os.environ.update(WANDB_DATA_DIR=old)
    (fit_run,) = offline_runs(root / "diff")
    (sweep_run,) = offline_runs(root / "logs")
    return {"fit": fit_run, "sweep": sweep_run, "checkpoints": diffusion.parent, "out": out, "root": root}


def of_type(run, kind: str) -> list[dict]:
    return [a for a in run.artifacts if a["type"] == kind]


def test_a_fit_logs_its_best_checkpoint_then_last_ckpt(study):
    checkpoints = study["checkpoints"]
    run_id = checkpoints.parent.name  # runs/guidelab/<W&B run id>/checkpoints
    best, latest = of_type(study["fit"], "model")  # in this order: W&B moves `latest` to the newest version
    (best_file,) = checkpoints.glob("best-step=*.ckpt")
    for artifact, source, alias in ((best, best_file, "best"), (latest, checkpoints / "last.ckpt", "latest")):
        assert artifact["name"] == f"model-{run_id}" and alias in artifact["aliases"]
        assert set(artifact["files"]) == {"model.ckpt"}
        entry = artifact["files"]["model.ckpt"]
        assert entry["size"] == source.stat().st_size and entry["digest"] == md5(source)
        assert Path(entry["local_path"]).is_relative_to(study["root"] / "wandb-data")  # staged, then uploaded
        assert artifact["metadata"]["file"] == source.name and artifact["metadata"]["fit_end_step"] == 6
    assert "best" not in latest["aliases"] and best["metadata"]["monitor"] == "val/loss"
    assert best["metadata"]["best_score"] is not None


def test_a_sweep_logs_its_result_files(study):
    out, run = study["out"], study["sweep"]
    (artifact,) = of_type(run, RESULTS_TYPE)
    assert artifact["name"] == sweep_name(out) == f"sweep-{out.parent.name}"  # <dir>/sweep → sweep-<dir>
    assert set(artifact["files"]) == {"sweep.csv", "sweep.json", "report.md"}
    for name, entry in artifact["files"].items():
        assert entry["digest"] == md5(out / name), name
    assert artifact["metadata"]["cells"] == 2 and artifact["metadata"]["methods"] == ["cfg"]
    assert not of_type(run, "model")  # `validate` has no fit end: no checkpoint is logged again
