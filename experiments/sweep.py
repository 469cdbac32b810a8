"""Sweep guidance on trained checkpoints, without a Trainer.

    python -m experiments.sweep --diffusion runs/.../checkpoints/last.ckpt \
        --config configs/experiments/digits_sweep.yaml --sweep.classifier_ckpt runs/.../last.ckpt \
        --sweep.seeds '[0, 1]' --sweep.scales '{"cfg": [0, 1, 2]}' --sweep.output_dir runs/my-sweep

Options come from `--config` YAML files (their `sweep:` section; a recipe's `trainer:` section is ignored)
and `--sweep.*` flags, exactly as in `python -m experiments.train validate`. The data set is the one the
diffusion model was trained on (read from its checkpoint; `--data_dir` if the files moved). `--diffusion` may
also be a diffusers UNet2DModel directory with its scheduler config (`--dataset` names its data set; see
lightning_modules/sweep/diffusers_models.py). Ends with the best-FID table and the output paths. Add
`--wandb true` to log the sweep as a W&B run (mode from WANDB_MODE; offline needs no account).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from callbacks.sweep_wandb import WandbSweepLogger
from lightning_modules.diffusion import OptionError
from lightning_modules.sweep import (
    SUMMARY_COLUMNS,
    SUMMARY_TITLE,
    Evaluation,
    SweepConfig,
    SweepModels,
    build_evaluation,
    check_extractor_available,
    check_writable,
    format_table,
    load_diffusion,
    resolve_extractor,
    summary,
)
from lightning_modules.sweep.diffusers_models import is_diffusers_dir
from lightning_modules.sweep.loading import load_helper_networks, load_trained_networks, read_checkpoint
from lightning_modules.sweep.orchestration import SweepOutcome, protocol_of, sweep_and_report
from lightning_modules.sweep.planning import check_network, check_null_label, check_trained_guidance
from lightning_modules.sweep.verdicts import verdict_text


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m experiments.sweep", description=__doc__)
    p.add_argument("--config", action=ActionConfigFile, help="YAML file(s) with a `sweep:` section")
    p.add_argument("--diffusion", type=str, required=True,
                   help="ConditionalDiffusion checkpoint (.ckpt), or a diffusers UNet2DModel directory (config.json, "
                   "diffusion_pytorch_model.safetensors and its scheduler_config.json; give --dataset)")
    p.add_argument("--dataset", type=str | None, default=None,
                   help="the data set a diffusers model was trained on: digits, mnist, fashion_mnist, cifar10, "
                   "cifar100 or folder (a .ckpt records its own)")
    p.add_argument("--data_dir", type=str | None, default=None, help="where the training data now lives")
    p.add_argument("--device", type=str, default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--wandb", type=bool, default=False, help="also log the sweep as a W&B run (job type 'sweep')")
    p.add_argument("--wandb_group", type=str | None, default=None, help="W&B group (default: $WANDB_RUN_GROUP)")
    p.add_argument("--wandb_tags", type=list[str], default=[], help="extra W&B tags")
    p.add_argument("--trainer", type=dict | None, default=None, help="ignored: a LightningCLI recipe's trainer")
    p.add_class_arguments(SweepConfig, "sweep", instantiate=True)
    return p


def datamodule_from(path: str, image_size: int | None, data_dir: str | None, dataset: str | None = None):
    """The DataModule the diffusion model was trained with, rebuilt from its checkpoint; for a diffusers directory,
    which records none, the `dataset` named (`image_size` None: the data set's own)."""
    from datamodules import ImageDataModule
    from datamodules.image_datamodule import DATASETS

    if is_diffusers_dir(path):
        if dataset not in DATASETS:
            raise OptionError("dataset", f"{path} is a diffusers model directory, which records no data set, and "
                              f"--dataset is {dataset!r}", f"name the data set it was trained on: --dataset "
                              f"{'|'.join(DATASETS)} (--data_dir: where its files are)")
        saved = {"name": dataset}
    else:
        saved = read_checkpoint(path, "diffusion").get("datamodule_hyper_parameters") or {"name": "digits"}
        if dataset is not None and dataset != saved.get("name"):
            raise OptionError("dataset", f"{path} was trained on {saved.get('name')!r}, not {dataset!r}",
                              "leave --dataset out for a checkpoint: it records its data set")
    names = inspect.signature(ImageDataModule.__init__).parameters
    kwargs = {k: v for k, v in saved.items() if k in names and k != "image_size"}
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    return ImageDataModule(**kwargs, image_size=image_size)


@dataclass
class SweepRun:
    """What `sweep(argv)` leaves for a caller that prints more (experiments.compare)."""

    outcome: SweepOutcome
    evaluation: Evaluation


def sweep(argv: list[str] | None = None) -> SweepRun:
    """Parse `argv` (this module's command line), check everything, run the sweep and write its outputs."""
    p = parser()
    args = p.instantiate(p.parse_args(argv))
    config: SweepConfig = args.sweep
    if not config.methods:
        p.error("no methods to sweep: give --sweep.methods '[cfg, cg_cond]' or a --config with sweep.methods")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    # Everything that can fail is checked before any sampling.
    # A diffusers model's classes are the data set's (an unconditional one has none of its own).
    diffusers = is_diffusers_dir(args.diffusion)
    classes = datamodule_from(args.diffusion, None, args.data_dir, args.dataset).num_classes if diffusers else None
    diffusion = load_diffusion(args.diffusion, device, option="diffusion", num_classes=classes)
    config.check(timesteps=diffusion.hparams["timesteps"], schedule=diffusion.hparams.get("schedule"))
    data = datamodule_from(args.diffusion, diffusion.hparams["image_size"], args.data_dir, args.dataset)
    if diffusion.hparams["channels"] != data.channels:
        raise OptionError("dataset", f"{args.diffusion} takes {diffusion.hparams['channels']}-channel images, "
                          f"{data.name} has {data.channels}", "pass the data set the model was trained on")
    check_extractor_available(resolve_extractor(config.extractor, data.name), config.inception_weights,
                              config.dinov2_dir, config.extra_extractors)
    home = Path(args.diffusion).resolve() if diffusers else Path(args.diffusion).resolve().parent.parent
    out_dir = check_writable(config.output_dir or home / "sweep")  # next to checkpoints/, or in the model's dir
    classifier, guide, clean = load_helper_networks(config, diffusion.hparams, args.diffusion, device)
    trained = load_trained_networks(config, diffusion.hparams, device)
    models = SweepModels(diffusion, classifier, guide, clean, trained).to(device)
    check_null_label(config, models)  # (the engine checks these too; here before the evaluator and references)
    check_trained_guidance(config, models)
    check_network(config, models)
    evaluation = build_evaluation(config.extractor, data, config.cache_dir, config.inception_weights,
                                  config.reference_split, device, config.extra_extractors, config.dinov2_dir,
                                  config.reference_stats)
    run = _wandb_run(config, args, out_dir, data.name) if args.wandb else None
    bf16 = config.precision == "bf16"
    protocol = protocol_of(config, dataset=data.name, dataset_id=data.dataset_id,
                           image_size=diffusion.hparams["image_size"], diffusion=args.diffusion, bf16=bf16)
    try:
        outcome = sweep_and_report(config, models, evaluation, out_dir, protocol, data.class_names,
                                   autocast_dtype=torch.bfloat16 if bf16 else None,
                                   logger=WandbSweepLogger(run, models.num_classes) if run is not None else None)
    finally:
        if run is not None:
            run.finish()
    return SweepRun(outcome, evaluation)


def main(argv: list[str] | None = None) -> list[dict]:
    done = sweep(argv)
    rows, outcome = done.outcome.rows, done.outcome
    print(f"\n== {SUMMARY_TITLE} ==")
    print(format_table(summary(rows), SUMMARY_COLUMNS))
    if outcome.verdicts:
        print("\n== Paired verdicts: every method against the best and against CFG (joint 95%) ==")
        print(verdict_text(outcome.verdicts))
    if rows:
        r = rows[0]
        print(f"\ndiffusion:   step {r['diffusion_step']}, sha {r['diffusion_sha']}")
        if r.get("classifier_sha"):
            print(f"classifier:  step {r['classifier_step']}, sha {r['classifier_sha']}")
    print("\n".join(outcome.path_lines()))
    return rows


def _wandb_run(config: SweepConfig, args, out_dir: Path, dataset: str):
    """A W&B run (mode from WANDB_MODE) named after the output directory, job type 'sweep', tagged with the
    dataset, methods and sampler; the config has one key per option (`sweep.sampling.steps`, ...), as in the
    Lightning runs. Group, entity and notes come from W&B's own variables (WANDB_RUN_GROUP, ...)."""
    import dataclasses
    import json

    import wandb

    from callbacks.config_saver import flatten
    from callbacks.sweep_wandb import sweep_name, sweep_tags

    options = json.loads(json.dumps({"sweep": dataclasses.asdict(config)}, default=str))
    name = sweep_name(out_dir)  # default <run>/sweep: sweep-<run>; also its results artifact's name
    return wandb.init(project="guidelab", job_type="sweep", name=name, dir=str(out_dir), group=args.wandb_group,
                      tags=[*args.wandb_tags, *sweep_tags(config, dataset)],
                      config={**flatten(options), "diffusion": args.diffusion, "data_dir": args.data_dir,
                              "device": args.device})


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except OptionError as err:  # a bad setting: one message, no traceback
        sys.exit(f"error: {err}")
