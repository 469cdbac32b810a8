"""An append-safe store for a sweep's results: `sweep.csv`, `sweep.json` and the sample grids.

Crash safety, in the order a cell is recorded: its grid PNG is written to a temporary file, fsynced and
renamed into place; only then is its CSV row appended (one fsynced line), then `sweep.json` is replaced
atomically. A cell is done when its row is in the CSV *and* its grid file is there and non-empty, so a
kill or a full disk at any point leaves either a finished cell or one that is recomputed. With
`sweep.save_samples`, a cell's samples are written the same way (`samples/<cell>.npz`) before its row. On
reading, a half-written last line (no newline) or a malformed row is reported with the file name and moved to
`sweep.csv.rejected`, never glued onto.

Concurrent runs: open the store with `SweepStore.exclusive(directory)`, which holds the directory's advisory
lock while the sweep runs, so a second sweep into the same directory waits and then reuses every cell the
first finished (nothing is sampled or stored twice, and a malformed-line repair never races an append). On
leaving, `sweep.json` is rewritten from `sweep.csv`, so it is complete after every run, even one that had
nothing left to sample after a kill between a CSV line and its JSON write.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from torch import Tensor

from lightning_modules.diffusion import OptionError
from lightning_modules.evaluation.registry import METRICS
from lightning_modules.evaluation.sample_files import write_npz
from lightning_modules.files import atomic_write as _atomic_write
from lightning_modules.files import exclusive_lock, remove_stale_temp_files

from .grids import encode_grid

# Per metric of the registry: its value, then its 95% interval over samples (KID also its subset std).
_METRIC_COLUMNS = [c for m in METRICS for c in (m, *(["kid_std"] if m == "kid" else []), f"{m}_lo", f"{m}_hi")]
COLUMNS = [
    "method", "scale", "gamma", "seed", "num_samples", "sampler", "steps", "eta",
    "nfe_per_sample", "classifier_grads_per_sample", "guide_evals_per_sample", "unet_equivalents_per_sample",
    "thresholded_fraction", "guidance_trace", *_METRIC_COLUMNS, "seconds",
    "seconds_per_sample", "diffusion_step", "diffusion_sha", "training_objective", "training_steps", "training_flops",
    "training_seconds", "classifier_step", "classifier_sha", "guide_step",
    "guide_sha", "clean_classifier_step", "clean_classifier_sha", "extractor", "signature", "grid", "same_as",
    "draws", "samples",
]
TEXT = {"method", "sampler", "guidance_trace", "diffusion_sha", "training_objective",
        "classifier_sha", "guide_sha", "clean_classifier_sha",
        "extractor", "signature", "grid", "same_as", "draws", "samples"}
INTEGER = {"seed", "num_samples", "steps", "diffusion_step", "classifier_step", "guide_step", "clean_classifier_step"}


def check_writable(directory: str | Path, option: str = "sweep.output_dir") -> Path:
    """Create `directory` and prove a file can be written there, before any sampling."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}-{threading.get_ident()}"  # unique per writer, also per thread
        probe.write_bytes(b"ok")
        probe.unlink(missing_ok=True)
    except OSError as err:
        raise OptionError(option, f"cannot write to {path} ({err.strerror or err})",
                          "choose a writable directory (or fix its permissions / free space)") from err
    return path


def png_bytes(images: Tensor, nrow: int) -> bytes:
    """A cell's grid of images in [-1, 1] as PNG bytes: `nrow` images per row (pass the number of classes,
    so columns are classes), upscaled without blur to >= 32 px, layout stored in the PNG (see grids.py)."""
    return encode_grid(images, columns=nrow)


class SweepStore:
    """The results in one output directory; rows of any signature live side by side."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = check_writable(directory)
        self.csv_path = self.directory / "sweep.csv"
        self.json_path = self.directory / "sweep.json"
        self.rows: list[dict] = self._read()
        self.summary: dict = {}  # what sweep.json carries besides the rows (set by the orchestration)

    @classmethod
    @contextmanager
    def exclusive(cls, directory: str | Path) -> Iterator[SweepStore]:
        """The store of `directory`, held for this process alone (see the module docstring); leftovers of
        killed writers are removed first, and sweep.json is rewritten from sweep.csv on the way out."""
        path = check_writable(directory)
        with exclusive_lock(path):
            remove_stale_temp_files(path, path / "grids", path / "draws", path / "samples")
            store = cls(path)
            try:
                yield store
            finally:
                store.write_json()

    def write_json(self) -> None:
        """sweep.json = {"rows": every row of sweep.csv (all signatures), re-read from the file itself, and
        whatever the sweep put in `self.summary` (its verdicts)}."""
        self.rows = self._read()
        self._dump_json()

    def _dump_json(self) -> None:
        _atomic_write(self.json_path, json.dumps({"rows": self.rows, **self.summary}, indent=1, default=str).encode())

    # ------------------------------------------------------------------ reading
    def _read(self) -> list[dict]:
        if not self.csv_path.exists():
            return []
        text = self.csv_path.read_text()
        lines = text.splitlines(keepends=True)
        if not lines:
            return []
        if lines[0].rstrip("\r\n").split(",") != COLUMNS:
            self._set_aside(lines, "its header is not this version's columns (written by another version)")
            return []
        rows, good, bad = [], [lines[0]], []
        for number, line in enumerate(lines[1:], start=2):
            row = _parse(line)
            if row is None:
                bad.append((number, line))
            else:
                rows.append(row)
                good.append(line)
        if bad:
            numbers = ", ".join(str(n) for n, _ in bad)
            self._reject([line for _, line in bad], f"line(s) {numbers} are incomplete or malformed (a run was "
                         "probably interrupted while writing); those cells will be recomputed")
            _atomic_write(self.csv_path, "".join(good).encode())
        return rows

    def _set_aside(self, lines: list[str], why: str) -> None:
        self._reject(lines, why)
        self.csv_path.unlink()

    def _reject(self, lines: list[str], why: str) -> None:
        rejected = self.csv_path.with_name("sweep.csv.rejected")
        with open(rejected, "a") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in lines)
        warnings.warn(f"{self.csv_path}: {why}; moved to {rejected}", stacklevel=3)

    # ------------------------------------------------------------------ queries
    def done(self, signature: str, method: str, scale: float, seed: int, samples: bool = False) -> bool:
        """Whether this cell is recorded and its files (grid, draws, samples) are intact; `samples`: it must also
        have its samples file (a sweep with save_samples recomputes a cell recorded without one)."""
        for r in reversed(self.rows):  # the latest row of a cell, as `select` reads it
            if (r["signature"] == signature and r["method"] == method and r["seed"] == seed
                    and math.isclose(r["scale"], scale)):
                if samples and not r["samples"]:
                    return False
                files = [self.directory / r[key] for key in ("grid", "draws", "samples") if r[key]]
                return all(f.is_file() and f.stat().st_size > 0 for f in files)
        return False

    def select(self, signature: str) -> list[dict]:
        """The rows of one signature (the latest row per cell, if a cell was recomputed)."""
        latest = {(r["method"], r["scale"], r["seed"]): r for r in self.rows if r["signature"] == signature}
        return list(latest.values())

    # ------------------------------------------------------------------ writing
    def grid_path(self, signature: str, method: str, scale: float, seed: int) -> str:
        return f"grids/{method}_s{scale:g}_seed{seed}_{signature[:8]}.png"

    def draws_path(self, row: dict) -> str:
        return f"draws/{Path(row['grid']).stem}.json"

    def samples_path(self, row: dict) -> str:
        return f"samples/{Path(row['grid']).stem}.npz"

    def read_draws(self, row: dict) -> dict:
        """A cell's draws record (its metrics on every random half and complement, in every feature space)."""
        if not row.get("draws"):
            raise ValueError(f"cell {row['method']} s={row['scale']:g} seed {row['seed']} has no draws file "
                             "(sweep.bootstrap = 0, or written by an older version): it cannot be paired")
        return json.loads((self.directory / row["draws"]).read_text())

    def append(self, row: dict, grid_png: bytes, draws: dict | None = None,
               samples: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Record one finished cell: grid, draws and samples first (atomically), then its CSV line, then sweep.json.
        `samples`: (uint8 (N, H, W, C) images, labels), written as an ADM-style .npz (`arr_0`, `arr_1`)."""
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:  # a value the CSV would silently drop: a new metric or field must get its column
            raise ValueError(f"row keys {unknown} are not columns of sweep.csv (store.COLUMNS): add them there")
        grid = self.directory / row["grid"]
        grid.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(grid, grid_png)
        if draws is not None:
            row = {**row, "draws": self.draws_path(row)}
            (self.directory / "draws").mkdir(exist_ok=True)
            _atomic_write(self.directory / row["draws"], json.dumps(draws).encode())
        if samples is not None:
            row = {**row, "samples": self.samples_path(row)}
            write_npz(self.directory / row["samples"], arr_0=samples[0], arr_1=samples[1])
        new_file = not self.csv_path.exists()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        if new_file:
            writer.writeheader()
        writer.writerow(row)
        with open(self.csv_path, "a", newline="") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(_parse(buffer.getvalue().splitlines(keepends=True)[-1]))
        self._dump_json()


def read_rows(directory: str | Path) -> list[dict]:
    """The rows of `directory/sweep.csv`, read only (nothing is locked, repaired or written: for a reader such as
    `python -m experiments.evaluate`); malformed lines are skipped, another version's file reads as no rows."""
    path = Path(directory) / "sweep.csv"
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    if not lines or lines[0].rstrip("\r\n").split(",") != COLUMNS:
        return []
    return [row for row in map(_parse, lines[1:]) if row is not None]


def _parse(line: str) -> dict | None:
    """One CSV data line as a typed row, or None if it is cut short or malformed."""
    if not line.endswith("\n"):
        return None  # every complete line ends with a newline: this one was cut off mid-write
    try:
        values = next(csv.reader([line]))
    except (csv.Error, StopIteration):
        return None
    if len(values) != len(COLUMNS):
        return None
    row: dict = {}
    try:
        for key, value in zip(COLUMNS, values):
            if key in TEXT:
                row[key] = value
            elif key in INTEGER:
                row[key] = int(value)
            else:
                row[key] = float(value) if value not in ("", "None") else float("nan")
    except ValueError:
        return None
    if not row["method"] or not row["signature"] or not row["grid"]:
        return None
    return row
