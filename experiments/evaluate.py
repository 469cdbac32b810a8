"""Score samples made anywhere with the sweep's metrics and intervals (FID, KID, precision/recall, score, accuracy).

    python -m experiments.evaluate SAMPLES --reference REF [--json FILE]

SAMPLES: an ADM-style .npz (arr_0 uint8 (N, H, W, C), optional arr_1 labels), a folder of PNG/JPEG images, a
sweep output directory with --cell METHOD:SCALE:SEED (a cell swept with --sweep.save_samples true; its grid or
draws file names it too), or DATASET:SPLIT (real images, e.g. digits:val).
REF: a data set name (its --reference_split, read as the sweep reads it), a folder or .npz of images, or an .npz
of FID statistics (mu, sigma; FID only). The samples are scored on the sweep's own path, so a saved cell gives
its row's numbers (lightning_modules/sweep/external.py says what is computed against what).
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from lightning_modules.diffusion import OptionError
from lightning_modules.evaluation.sample_files import read_statistics, to_pixels, write_npz
from lightning_modules.files import atomic_write
from lightning_modules.sweep import SweepConfig, check_extractor_available, resolve_extractor
from lightning_modules.sweep.config import EXTRACTORS
from lightning_modules.sweep.external import (
    ClassifierLogits,
    Samples,
    evaluate,
    format_result,
    read_samples,
    result_json,
    sample_features,
)
from lightning_modules.sweep.loading import load_classifier
from lightning_modules.sweep.references import read_reference, reference_evaluation

SWEEP_DEFAULTS = {f.name: f.default for f in fields(SweepConfig)}


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m experiments.evaluate", description=__doc__)
    p.add_argument("samples", type=str, help="an .npz, a folder of images, a sweep directory (with --cell), or "
                   "DATASET:SPLIT")
    p.add_argument("--reference", type=str, required=True, help="a data set name, a folder or .npz of images, or "
                   "an .npz of statistics (mu, sigma)")
    p.add_argument("--cell", type=str | None, default=None, help="METHOD:SCALE:SEED[:SIGNATURE] of a sweep directory")
    p.add_argument("--labels", type=str | None, default=None, help="the samples' classes: .npy, .npz or text")
    p.add_argument("--reference_stats", type=str | None, default=None, help="FID against these statistics "
                   "(mu, sigma) instead of the reference's own; KID and precision/recall stay against its images")
    p.add_argument("--extractor", type=str, default="auto", choices=list(EXTRACTORS), help="as --sweep.extractor")
    p.add_argument("--inception_weights", type=str | None, default=None, help="as --sweep.inception_weights")
    p.add_argument("--dinov2_dir", type=str | None, default=None, help="as --sweep.dinov2_dir")
    p.add_argument("--dataset", type=str | None, default=None, help="the data set whose evaluator scores the "
                   "samples when REF is not one (default: REF)")
    p.add_argument("--classifier", type=str | None, default=None, help="a classifier checkpoint whose argmax "
                   "gives the accuracy (default: the evaluator's)")
    p.add_argument("--reference_split", type=str, default="train", choices=["train", "val"])
    p.add_argument("--data_dir", type=str, default="data", help="where the data set's files are")
    p.add_argument("--cache_dir", type=str, default=SWEEP_DEFAULTS["cache_dir"])
    p.add_argument("--bootstrap", type=int | None, default=None, help="random halves per interval (default: the "
                   f"cell's, else {SWEEP_DEFAULTS['bootstrap']}; 0 = none)")
    p.add_argument("--device", type=str, default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--json", type=str | None, default=None, help="also write the result to this file")
    p.add_argument("--save_npz", type=str | None, default=None, help="also write the samples as an ADM-style .npz")
    p.add_argument("--write_stats", type=str | None, default=None, help="also write the reference's (mu, sigma) "
                   "in the extractor's space, for --reference_stats / --sweep.reference_stats")
    return p


def _datasets() -> tuple[str, ...]:
    from datamodules import DATASETS  # late: the data modules import Lightning

    return tuple(d for d in DATASETS if d != "folder")


def datamodule(name: str, data_dir: str, image_size: int | None):
    from datamodules import ImageDataModule

    return ImageDataModule(name=name, data_dir=data_dir, image_size=image_size)


def _split_samples(spec: str, data_dir: str) -> Samples | None:
    """DATASET:SPLIT as samples (real images, quantised to 8 bits as saved samples are), or None."""
    name, _, split = spec.rpartition(":")
    if Path(spec).exists() or name not in _datasets() or split not in ("train", "val"):
        return None
    x, y = datamodule(name, data_dir, None).split_tensors(split)
    return Samples(to_pixels(x).permute(0, 2, 3, 1).numpy(), y.numpy(), spec)


def _check_shape(what: str, shape: tuple[int, int, int], data, option: str) -> None:
    want = (data.channels, data.image_size, data.image_size)
    if shape != want:
        raise OptionError(option, f"{what} are {'x'.join(map(str, shape))} (C×H×W), the {data.name} evaluator "
                          f"takes {'x'.join(map(str, want))}", "score them with --extractor inception, or give "
                          "images of the data set's shape")


def _classifier(path: str, samples: Samples, device: torch.device):
    """The classifier checkpoint that gives the accuracy, checked against the samples before any work."""
    classifier = load_classifier(path, device, option="classifier")
    hp = classifier.hparams
    top = None if samples.labels is None else int(samples.labels.max())
    if (hp["channels"], hp["image_size"], hp["image_size"]) != samples.shape or top is None or top >= hp["num_classes"]:
        labels = "unlabelled" if top is None else f"labelled 0..{top}"
        raise OptionError("classifier", f"it takes {hp['channels']}x{hp['image_size']}x{hp['image_size']} images "
                          f"of {hp['num_classes']} classes; the samples are {'x'.join(map(str, samples.shape))}, "
                          f"{labels}", "give a classifier of the samples' data, and their labels (arr_1 or --labels)")
    return classifier


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    # Every input is read and checked before any feature is computed or any network trained.
    samples = _split_samples(args.samples, args.data_dir) or read_samples(args.samples, args.cell, args.labels)
    reference = read_reference(args.reference, _datasets())
    if args.reference_stats is not None:
        read_statistics(args.reference_stats, "reference_stats")
    if args.dataset and reference.dataset and args.dataset != reference.dataset:
        raise OptionError("dataset", f"REF is the data set {reference.dataset}, --dataset says {args.dataset}",
                          "omit --dataset (it names the evaluator's data when REF is files)")
    dataset = args.dataset or reference.dataset
    kind = resolve_extractor(args.extractor, dataset or "")
    try:
        check_extractor_available(kind, args.inception_weights, args.dinov2_dir)
    except OptionError as err:  # the sweep's check names --sweep.X; here the option is --X
        renamed = OptionError(err.option.removeprefix("sweep."), "", "")
        renamed.args = (str(err).replace("--sweep.", "--").replace("`sweep.", "`"),)
        raise renamed from None
    if kind == "evaluator" and dataset is None:
        raise OptionError("dataset", "the evaluator is trained on a data set, and REF is none",
                          "pass --dataset digits (or mnist, fashion_mnist, ...), or --extractor inception")
    data = datamodule(dataset, args.data_dir, samples.shape[1]) if dataset else None
    if kind == "evaluator":
        _check_shape("the samples", samples.shape, data, "samples")
        if reference.images is not None:
            n, h, w, c = reference.images.shape
            _check_shape("the reference images", (c, h, w), data, "reference")
    classifier = None if args.classifier is None else _classifier(args.classifier, samples, device)
    bootstrap = args.bootstrap if args.bootstrap is not None else (
        samples.scored["draws"] if samples.scored else 0 if samples.row else SWEEP_DEFAULTS["bootstrap"])
    evaluation = reference_evaluation(reference, kind, data, args.cache_dir, args.inception_weights,
                                      args.reference_split, device, args.dinov2_dir, args.reference_stats)
    logits = None if classifier is None else sample_features(ClassifierLogits(classifier.net), samples.images,
                                                             device)[1]
    result = evaluate(samples, evaluation, bootstrap, device, logits)
    print(format_result(result))
    if args.json is not None:
        atomic_write(args.json, result_json(result))
    if args.save_npz is not None:
        write_npz(args.save_npz, arr_0=samples.images, **({} if samples.labels is None else {"arr_1": samples.labels}))
    if args.write_stats is not None:
        mu, sigma = (t.double().cpu().numpy() for t in evaluation.ref_stats[:2])
        write_npz(args.write_stats, mu=mu, sigma=sigma)
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except OptionError as err:  # a bad input: one message, no traceback
        sys.exit(f"error: {err}")
