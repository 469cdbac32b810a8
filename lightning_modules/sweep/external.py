"""Scoring samples made anywhere on the sweep's own scoring path (`python -m experiments.evaluate`).

The samples' features go through `Evaluation.score_with_draws`, as a sweep cell's do: the same metrics, the same
stratified random halves and intervals, the same extractor and reference (`references.py`), so a cell saved with
`--sweep.save_samples` re-scores to its own row.

What is computed against what:
- reference images (a data set's split, a folder, an `.npz` with `arr_0`): every metric; FID against their
  statistics, or against a statistics file's with `--reference_stats`;
- reference statistics alone (`mu`, `sigma`): FID only of the metrics that need a reference; KID and
  precision/recall need reference features. The classifier score and accuracy need no reference;
- accuracy needs the samples' labels (`arr_1`, `--labels`) and a classifier: the evaluator, or `--classifier`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_modules.diffusion import OptionError
from lightning_modules.evaluation.intervals import centred_interval, clip_interval, half_indices
from lightning_modules.evaluation.metrics import target_accuracy
from lightning_modules.evaluation.registry import METRICS, RANGES
from lightning_modules.evaluation.sample_files import (
    nhwc_to_images,
    read_image_folder,
    read_images_npz,
    read_labels,
)

from .evaluation import Evaluation
from .store import read_rows

RERUN = "rerun the sweep with --sweep.save_samples true (it samples such cells again and saves every image)"


@dataclass
class Samples:
    """Images to score, with the classes they were generated for (if known) and where they came from."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray | None  # int64 (N,)
    source: str
    row: dict | None = None  # the sweep's row, when the samples are a sweep cell's
    scored: dict | None = None  # and how the sweep scored it: its draws record (extractor, reference, draws)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W), as the extractors take images."""
        n, h, w, c = self.images.shape
        return c, h, w


def _cell_spec(spec: str, option: str) -> tuple[str, float, int, str]:
    """METHOD:SCALE:SEED[:SIGNATURE] → (method, scale, seed, signature prefix)."""
    parts = spec.split(":")
    try:
        if len(parts) not in (3, 4):
            raise ValueError(spec)
        return parts[0], float(parts[1]), int(parts[2]), parts[3] if len(parts) == 4 else ""
    except ValueError:
        raise OptionError(option, f"{spec!r} is not METHOD:SCALE:SEED", "e.g. --cell cfg:1.5:0 (append :SIGNATURE "
                          "when one directory holds several sweeps of that cell)") from None


def cell_row(directory: str | Path, spec: str, option: str = "cell") -> dict:
    """The row of one cell of a sweep directory (its latest, if recomputed): `spec` = METHOD:SCALE:SEED[:SIG]."""
    rows = read_rows(directory)
    if not rows:
        raise OptionError(option, f"{directory} has no readable sweep.csv", "pass a sweep's output directory")
    method, scale, seed, sig = _cell_spec(spec, option)
    found = {r["signature"]: r for r in rows if r["method"] == method and r["seed"] == seed
             and math.isclose(r["scale"], scale) and r["signature"].startswith(sig)}
    if not found:
        cells = sorted({f"{r['method']}:{r['scale']:g}:{r['seed']}" for r in rows})
        raise OptionError(option, f"{directory} has no cell {spec} (it has {', '.join(cells[:12])}"
                          f"{' ...' if len(cells) > 12 else ''})", "pick one of its cells")
    if len(found) > 1:
        raise OptionError(option, f"{directory} holds cell {spec} of {len(found)} sweeps (signatures "
                          f"{', '.join(s[:8] for s in found)})", f"name one: --cell {spec}:<signature>")
    return next(iter(found.values()))


def cell_samples(directory: str | Path, row: dict, option: str = "cell") -> Samples:
    """A sweep cell's saved samples (`samples/<cell>.npz`), or an OptionError saying how to get them."""
    name = f"{row['method']}:{row['scale']:g}:{row['seed']}"
    if not row.get("samples"):
        raise OptionError(option, f"cell {name} was swept without --sweep.save_samples: its grid keeps only its first "
                          f"images, not the {row['num_samples']} it was scored on, so it cannot be re-scored", RERUN)
    path = Path(directory) / row["samples"]
    if not path.is_file():
        raise OptionError(option, f"cell {name}'s samples file {path} is missing", RERUN)
    images, labels = read_images_npz(path, option)
    draws = Path(directory) / row["draws"] if row["draws"] else None
    scored = json.loads(draws.read_text())["spaces"].get(row["extractor"]) if draws and draws.is_file() else None
    return Samples(images, labels, f"{name} of {directory} ({path})", row, scored)


def _owning_sweep(path: Path) -> tuple[Path, dict] | None:
    """(sweep directory, row) when `path` is a cell's grid, draws or samples file inside a sweep directory."""
    directory = path.resolve().parent.parent
    if not (directory / "sweep.csv").is_file():
        return None
    rel = path.resolve().relative_to(directory).as_posix()
    rows = [r for r in read_rows(directory) if rel in (r["grid"], r["draws"], r["samples"])]
    return (directory, rows[-1]) if rows else None


def read_samples(path: str | Path, cell: str | None = None, labels: str | None = None,
                 option: str = "samples") -> Samples:
    """Samples from an `.npz`, an image folder, a sweep directory with `cell`, or a cell's grid / draws file."""
    p = Path(path)
    owner = _owning_sweep(p) if p.is_file() else None
    if cell is not None or (p.is_dir() and (p / "sweep.csv").is_file()):
        if cell is None:
            raise OptionError("cell", f"{p} is a sweep directory", "choose a cell: --cell METHOD:SCALE:SEED")
        samples = cell_samples(p, cell_row(p, cell), "cell")
    elif owner is not None:  # a cell's grid, draws or samples file: that cell, compared with its row
        samples = cell_samples(*owner, option)
    elif p.is_file() and p.suffix == ".npz":
        samples = Samples(*read_images_npz(p, option), str(p))
    elif p.is_dir():
        samples = Samples(read_image_folder(p, option), None, str(p))
    else:
        raise OptionError(option, f"{str(path)!r} is not an .npz, a folder of images or a sweep directory",
                          "pass one of those (a sweep directory with --cell METHOD:SCALE:SEED)")
    if labels is not None:
        samples.labels = read_labels(labels, len(samples.images), "labels")
    return samples


@torch.no_grad()
def sample_features(extractor, images: np.ndarray, device: torch.device, batch_size: int = 500
                    ) -> tuple[Tensor, Tensor]:
    """(features, logits) of uint8 (N, H, W, C) images on `device`, in chunks (never all images as floats)."""
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        f, lg = extractor.extract(nhwc_to_images(images[start:start + batch_size]).to(device))
        feats.append(f.to(device, torch.float32))
        logits.append(lg.to(device, torch.float32))
    return torch.cat(feats), torch.cat(logits)


class ClassifierLogits:
    """A classifier checkpoint's network (`sweep.loading.load_classifier`) as a logits source for accuracy: its
    logits at t = 0 (a clean classifier; a noisy one at its least noise)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def extract(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.net(x, torch.zeros(len(x), dtype=torch.long, device=x.device)).float()
        return logits, logits


def classifier_accuracy(logits: Tensor, labels: Tensor, bootstrap: int) -> dict[str, float]:
    """Target-class accuracy from another classifier's logits, with its interval over the same stratified halves
    (`intervals.half_indices` on the labels) every metric of the evaluation uses."""
    value = target_accuracy(logits, labels)
    halves = half_indices(labels, bootstrap)
    lo, hi = centred_interval(torch.tensor([target_accuracy(logits[h], labels[h]) for h in halves]), value) \
        if bootstrap else (math.nan, math.nan)
    lo, hi = clip_interval(lo, hi, *RANGES["accuracy"])
    return {"accuracy": value, "accuracy_lo": lo, "accuracy_hi": hi}


def evaluate(samples: Samples, evaluation: Evaluation, bootstrap: int, device: torch.device,
             classifier_logits: Tensor | None = None) -> dict:
    """Every metric the inputs allow, with its interval; what is not computed, and why."""
    feats, logits = sample_features(evaluation.extractor, samples.images, device)
    labels = None if samples.labels is None else torch.from_numpy(samples.labels)
    if labels is not None and evaluation.kind == "evaluator" and int(labels.max()) >= logits.shape[1]:
        raise OptionError("labels", f"labels reach {int(labels.max())}, but the evaluator has {logits.shape[1]} "
                          "classes", "give the classes the samples were generated for, 0-based")
    values, record = evaluation.score_with_draws(feats, logits, labels, bootstrap)
    if classifier_logits is not None and labels is not None:
        values |= classifier_accuracy(classifier_logits, labels, bootstrap)
    missing = {}
    if evaluation.ref_feats is None:
        missing |= dict.fromkeys(("kid", "precision", "recall"), "needs reference features: the reference is "
                                 "statistics only (give images or a data set)")
    if labels is None:
        missing["accuracy"] = "needs the samples' labels (arr_1 in the .npz, or --labels)"
    elif evaluation.kind != "evaluator" and classifier_logits is None:
        missing["accuracy"] = f"needs a classifier of the samples' classes ({evaluation.kind} has none): " \
                              "--extractor evaluator with --dataset, or --classifier CKPT"
    if math.isnan(values["score"]):
        missing.setdefault("score", f"{evaluation.kind} has no classifier head")
    notes = []
    if samples.scored and (samples.scored["extractor"], samples.scored["reference"]) != (
            evaluation.extractor_id, evaluation.reference_id):
        notes.append(f"the sweep scored this cell with {samples.scored['extractor']} against "
                     f"{samples.scored['reference']}: these numbers are in another space or against another "
                     "reference than its row's")
    columns = [c for m in METRICS for c in (m, *(["kid_std"] if m == "kid" else []), f"{m}_lo", f"{m}_hi")]
    return {"samples": samples.source, "n": len(samples.images), "labels": labels is not None,
            "extractor": evaluation.extractor_id, "reference": evaluation.reference_id, "bootstrap": bootstrap,
            "metrics": {c: _number(values[c]) for c in columns}, "not_computed": missing, "notes": notes,
            "draws": {"labels_sha": record["labels_sha"], "halves_sha": record["halves_sha"]},
            "row": None if samples.row is None else {c: _number(samples.row.get(c)) for c in columns}}


def _number(value: object) -> float | None:
    """JSON-safe: NaN (not computed) as None."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def format_result(result: dict) -> str:
    """The metrics as a table (value, 95% interval over samples; the sweep row's value for a cell), then the notes."""
    row = result["row"]
    lines = [f"samples:   {result['samples']} ({result['n']} images{', labelled' if result['labels'] else ''})",
             f"reference: {result['reference']}", f"extractor: {result['extractor']}",
             f"intervals: 95% over samples from {result['bootstrap']} stratified random halves", "",
             f"{'metric':<10} {'value':>12}  {'95% interval':<26}" + ("  sweep row" if row else "")]
    m, missing = result["metrics"], result["not_computed"]
    for name in METRICS:
        if name in missing:
            lines.append(f"{name:<10} not computed: {missing[name]}")
            continue
        interval = f"[{_fmt(m[f'{name}_lo'])}, {_fmt(m[f'{name}_hi'])}]"
        lines.append(f"{name:<10} {_fmt(m[name]):>12}  {interval:<26}" + (f"  {_fmt(row[name])}" if row else ""))
    return "\n".join(lines + [f"note: {note}" for note in result["notes"]])


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.6g}"


def result_json(result: dict) -> bytes:
    return json.dumps(result, indent=1).encode()
