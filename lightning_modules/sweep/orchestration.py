"""One sweep, start to finish, for every entry point: the store held, the engine run, the outputs written.

    outcome = sweep_and_report(config, models, evaluation, out_dir, protocol, class_names, logger=wandb_logger)
    outcome.rows, outcome.figures, outcome.report

The Lightning callback (`callbacks.GuidanceSweep`), `python -m experiments.sweep` and `experiments.compare`
(through experiments.sweep) are thin adapters around this function: they build the models and the evaluation,
and print what they like from the outcome. Rank 0 holds the output directory's lock for the whole sweep (a
second sweep into the same directory waits, then reuses every finished cell); `sweep.json` and `report.md`
are rewritten from `sweep.csv` at the end of every run, also one that had nothing left to sample.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from .config import SweepConfig
from .engine import SINGLE, Distributed, run_sweep
from .evaluation import Evaluation
from .models import SweepModels
from .report import OutputsIncomplete, write_outputs
from .store import SweepStore
from .verdicts import PairingError, verdicts


class SweepLogger(Protocol):
    """Where a sweep reports besides its directory (W&B: callbacks.sweep_wandb.WandbSweepLogger)."""

    def cell(self, row: dict, grid: Tensor | None) -> None: ...  # each cell as it is stored (rank 0)
    def sweep(self, rows: list[dict], figures: list[Path], out_dir: Path,
              verdicts: dict | None) -> None: ...  # once, at the end


@dataclass
class SweepOutcome:
    """What one sweep run leaves: every row of its signature (rank 0; [] on other ranks) and the files."""

    rows: list[dict]
    out_dir: Path
    figures: list[Path] = field(default_factory=list)
    verdicts: dict | None = None  # see lightning_modules.sweep.verdicts (None: fewer than 2 draws per cell)

    @property
    def csv(self) -> Path:
        return self.out_dir / "sweep.csv"

    @property
    def json(self) -> Path:
        return self.out_dir / "sweep.json"

    @property
    def report(self) -> Path:
        return self.out_dir / "report.md"

    def path_lines(self) -> list[str]:
        """The output paths a user reads next, only those that exist."""
        figures = ", ".join(p.name for p in self.figures if p.parent == self.out_dir and p.is_file())
        lines = [f"report:      {self.report} (tables, figures, protocol)"] if self.report.is_file() else []
        if figures:
            lines.append(f"plots:       {self.out_dir}/ {figures}")
        if (self.out_dir / "grids").is_dir():
            lines.append(f"grids:       {self.out_dir / 'grids'}/ (<method>_seed<k>.png: scale × class)")
        return [*lines, f"sweep table: {self.csv}"]


def protocol_of(config: SweepConfig, *, dataset: str | None, dataset_id: str | None, image_size: int | None,
                diffusion: str | None, bf16: bool) -> dict:
    """What report.md and the figures' titles need that the rows do not carry."""
    from dataclasses import asdict, fields

    from lightning_modules.diffusion import SharedGuidance

    # The shared options, then the own options of the swept methods only (not every method's defaults).
    guidance = {f.name: getattr(config.guidance, f.name) for f in fields(SharedGuidance)}
    guidance |= {rule.options_key(): asdict(rule.settings) for rule in config.rules().values()
                 if rule.settings is not None}
    return {"dataset": dataset, "dataset_id": dataset_id, "image_size": image_size, "diffusion": diffusion,
            "classifier": config.classifier_ckpt, "guidance": guidance,
            "precision": "bf16" if bf16 else "32"}


def sweep_and_report(config: SweepConfig, models: SweepModels, evaluation: Evaluation, out_dir: str | Path,
                     protocol: dict, class_names: list[str] | None = None, *, dist: Distributed = SINGLE,
                     autocast_dtype: torch.dtype | None = None, logger: SweepLogger | None = None) -> SweepOutcome:
    """Run every cell of `config` not yet in `out_dir`, then write sweep.json, report.md and the figures (and
    hand them to `logger`). Every rank calls it; rank 0 owns the directory.

    Raises OutputsIncomplete (an OptionError) after everything else is written and logged when a figure could
    not be written, so a full disk is an error, not a silent gap."""
    out_dir = Path(out_dir)
    on_cell = logger.cell if logger is not None else None
    if dist.rank != 0:
        run_sweep(config, models, evaluation, None, dist=dist, autocast_dtype=autocast_dtype)
        return SweepOutcome([], out_dir)
    incomplete: OutputsIncomplete | None = None
    with SweepStore.exclusive(out_dir) as store:  # the outputs too: report.md is always this CSV's
        rows = run_sweep(config, models, evaluation, store, dist=dist, autocast_dtype=autocast_dtype,
                         on_cell=on_cell)
        found = sweep_verdicts(rows, store)
        store.summary = {"verdicts": found}
        try:
            figures = write_outputs(rows, out_dir, protocol, class_names, verdicts=found)
        except OutputsIncomplete as err:
            incomplete, figures = err, err.figures
    if logger is not None and rows:
        logger.sweep(rows, figures, out_dir, found)
    if incomplete is not None:
        raise incomplete
    return SweepOutcome(rows, out_dir, figures, found)


def sweep_verdicts(rows: list[dict], store: SweepStore) -> dict | None:
    """The verdicts of these rows, or None (with the reason printed) when their draws cannot be paired."""
    if not rows or any(not r.get("draws") for r in rows):
        return None
    try:
        return verdicts(rows, store.read_draws)
    except PairingError as err:
        print(f"[sweep] no paired verdicts: {err}", file=sys.stderr, flush=True)
        return None
