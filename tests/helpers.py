"""Tiny, fast recipes for the end-to-end tests: the real configs with small networks and few steps."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiments.train import main

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "experiments"
TINY_NET = ["--model.init_args.base_channels=16", "--model.init_args.channel_mult=[1, 2]"]
FAST_TRAINER = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=1",
                "--trainer.log_every_n_steps=1"]


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them as traced."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


def fit(kind: str, save_dir: Path, steps: int = 6, extra: list[str] = ()) -> Path:
    """Fit the digits recipe of `kind` ('diffusion' or 'classifier') for a few steps; returns last.ckpt."""
    cli = main(["fit", "--config", str(CONFIGS / f"digits_{kind}.yaml"), *TINY_NET, *FAST_TRAINER,
                f"--trainer.max_steps={steps}", "--data.batch_size=64",
                f"--trainer.logger.init_args.save_dir={save_dir}", *extra])
    return Path(cli.trainer.checkpoint_callback.last_model_path)


def sweep_args(diffusion_ckpt: Path, classifier_ckpt: Path, out: Path, cache: Path, save_dir: Path,
               scales: dict | None = None, extra: list[str] = ()) -> list[str]:
    scales = scales or {"cfg": [0.0, 2.0], "cg_cond": [0.0, 3.0], "cg_uncond": [2.0]}
    return ["validate", "--config", str(CONFIGS / "digits_diffusion.yaml"), *TINY_NET, *FAST_TRAINER,
            "--config", str(CONFIGS / "digits_sweep.yaml"), f"--ckpt_path={diffusion_ckpt}",
            f"--sweep.classifier_ckpt={classifier_ckpt}", f"--sweep.output_dir={out}", f"--sweep.cache_dir={cache}",
            f"--sweep.methods={json.dumps(list(scales))}", f"--sweep.scales={json.dumps(scales)}",
            "--sweep.num_samples=30", "--sweep.sampling.steps=3", "--sweep.seeds=[0]", "--sweep.grid_size=10",
            "--sweep.progress=false",
            f"--trainer.logger.init_args.save_dir={save_dir}", *extra]


# ---------------------------------------------------------------------------------------------- W&B read-back
# wandb 0.31 writes an offline run as one `run-<id>.wandb` file (no config.yaml / wandb-summary.json): a
# LevelDB-style log of `wandb_internal_pb2.Record` messages after a 7-byte header (b":W&B", 0xBEE1, version 0),
# in 32 KiB blocks of chunks, each with a 7-byte header (crc32c: u32, length: u16, type: u8 =
# full/first/middle/last); a block tail shorter than a chunk header is zero padding.
_BLOCK, _FULL, _FIRST, _MIDDLE, _LAST = 32768, 1, 2, 3, 4


@dataclass
class WandbRun:
    """What an offline run holds, replayed in order: the last run record's fields, the config and the summary
    after every update, the history rows (nested keys as nested dicts), the logged artifacts, and the run's files
    directory."""

    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    artifacts: list[dict] = field(default_factory=list)  # see _artifact
    files: Path = Path()

    def series(self, key: str, x: str) -> list[tuple[float, float]]:
        """(x, value) of every history row that has `key` (and `x`)."""
        return [(row[x], row[key]) for row in self.history if key in row and x in row]

    def media(self, value: dict) -> Path:
        """The file of a logged image / table (its `path` is relative to files/)."""
        return self.files / value["path"]

    def table(self, value: dict) -> list[dict]:
        """A logged wandb.Table as rows of {column: value}."""
        data = json.loads(self.media(value).read_text())
        return [dict(zip(data["columns"], row)) for row in data["data"]]


def wandb_records(path: Path) -> Iterator[bytes]:
    """The raw protobuf records of a `.wandb` file."""
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding up to the next block
            pos += room
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk


def _apply(tree: dict, items, remove=()) -> None:
    for item in items:
        path = list(item.nested_key) or [item.key]
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    for item in remove:
        path = list(item.nested_key) or [item.key]
        node = tree
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)


def _artifact(a) -> dict:
    """An ArtifactRecord (what `run.log_artifact` writes, offline too; `wandb sync` uploads it) as a dict: name,
    type, aliases (W&B's client adds `latest` to each), metadata, and files: path in the artifact → size, its
    base64 MD5 digest and the staged copy W&B uploads from (`local_path`)."""
    return {"name": a.name, "type": a.type, "aliases": list(a.aliases),
            "metadata": json.loads(a.metadata) if a.metadata else {},
            "files": {e.path: {"size": e.size, "digest": e.digest, "local_path": e.local_path}
                      for e in a.manifest.contents}}


def read_wandb_run(directory: Path) -> WandbRun:
    """Replay one offline run directory (`.../wandb/offline-run-*`)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = Path(directory).glob("run-*.wandb")
    run = WandbRun(files=Path(directory) / "files")
    for raw in wandb_records(log):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.name, run.group, run.job_type, run.tags = r.display_name, r.run_group, r.job_type, list(r.tags)
            _apply(run.config, r.config.update, r.config.remove)
        elif kind == "config":
            _apply(run.config, record.config.update, record.config.remove)
        elif kind == "summary":
            _apply(run.summary, record.summary.update, record.summary.remove)
        elif kind == "history":
            row: dict = {}
            _apply(row, record.history.item)
            run.history.append(row)
        elif kind == "artifact":
            run.artifacts.append(_artifact(record.artifact))
    return run


def offline_runs(save_dir: Path) -> list[WandbRun]:
    """Every offline run under a logger's save_dir, oldest first."""
    return [read_wandb_run(d) for d in sorted(Path(save_dir).glob("wandb/offline-run-*"))]
