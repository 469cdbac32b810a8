"""Sweep results on disk: one row per (method, scale, seed) cell in sweep.csv and sweep.json,
appended as cells finish, so a killed sweep keeps what it finished and a rerun skips it."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

COLUMNS = [
    "method", "scale", "gamma", "seed", "num_samples", "steps", "sampler", "nfe_per_sample",
    "classifier_grads_per_sample", "fid", "kid", "kid_std", "score", "precision", "recall", "accuracy",
    "seconds", "seconds_per_sample", "global_step", "extractor", "signature",
]


class SweepTable:
    """sweep.csv + sweep.json in `directory`; `signature` names everything that makes a cell
    comparable (model step, sampler, steps, sample count, extractor, guidance options)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.csv_path = self.directory / "sweep.csv"
        self.json_path = self.directory / "sweep.json"
        self.rows: list[dict] = self._read()

    def _read(self) -> list[dict]:
        if not self.csv_path.exists():
            return []
        with self.csv_path.open(newline="") as f:
            return [_typed(row) for row in csv.DictReader(f)]

    def done(self, signature: str, method: str, scale: float, seed: int) -> bool:
        return any(r["signature"] == signature and r["method"] == method and r["seed"] == seed
                   and math.isclose(r["scale"], scale) for r in self.rows)

    def append(self, rows: list[dict]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        new_file = not self.csv_path.exists()
        with self.csv_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerows(rows)
            f.flush()
        self.rows.extend(_typed({k: str(v) for k, v in r.items()}) for r in rows)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.rows, indent=1))
        tmp.replace(self.json_path)  # atomic: a kill never leaves half a JSON file

    def select(self, signature: str) -> list[dict]:
        return [r for r in self.rows if r["signature"] == signature]


def _typed(row: dict) -> dict:
    out: dict = {}
    for key, value in row.items():
        if key in ("method", "sampler", "extractor", "signature"):
            out[key] = value
        elif key in ("seed", "num_samples", "steps", "global_step"):
            out[key] = int(float(value))
        else:
            out[key] = float(value) if value not in ("", "None", "nan") else float("nan")
    return out


def aggregate(rows: list[dict], metric: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """Per method: sorted (scale, gamma, mean, std over seeds) of `metric`."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["scale"])].append(r)
    out: dict[str, list] = defaultdict(list)
    for (method, scale), cell in sorted(groups.items()):
        values = [c[metric] for c in cell]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        out[method].append((scale, cell[0]["gamma"], mean, std))
    return dict(out)


def summary(rows: list[dict]) -> list[dict]:
    """Best FID per method (mean over seeds), with the accuracy and cost at that scale."""
    fid = aggregate(rows, "fid")
    acc = aggregate(rows, "accuracy")
    out = []
    for method, points in fid.items():
        i = min(range(len(points)), key=lambda k: points[k][2])
        scale, gamma, mean, std = points[i]
        cell = next(r for r in rows if r["method"] == method and math.isclose(r["scale"], scale))
        out.append({"method": method, "best_scale": scale, "gamma": gamma, "fid": mean, "fid_std": std,
                    "accuracy": acc[method][i][2], "accuracy_std": acc[method][i][3],
                    "nfe_per_sample": cell["nfe_per_sample"],
                    "classifier_grads_per_sample": cell["classifier_grads_per_sample"],
                    "seconds_per_sample": cell["seconds_per_sample"],
                    "seeds": sum(1 for r in rows if r["method"] == method and math.isclose(r["scale"], scale))})
    return out


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table for the terminal."""
    def fmt(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
