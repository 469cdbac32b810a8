"""The one-command study: CFG vs classifier guidance (noisy and clean classifier) vs autoguidance on the embedded
digits, end to end, on a CPU.

    python -m experiments.compare                 # ≈10 minutes on 2 CPU cores
    python -m experiments.compare --seeds 0 1 2   # error bars over sampling seeds
    python -m experiments.compare --sweep_recipe configs/experiments/digits_sweep_frontier.yaml   # every method
    python -m experiments.compare --p_uncond 0 --sweep_recipe configs/experiments/digits_sweep_no_dropout.yaml
    python -m experiments.compare --sweep_recipe configs/experiments/digits_sweep_trained.yaml   # + MG, GFT

Stages: noisy classifier → clean classifier → CFG diffusion model (keeping its own guide snapshots) →
guidance sweep (evaluator trained/cached on the way). A recipe sweeping a trained-in method adds its model's
stage: MG trained from scratch like the CFG model (same network and steps), GFT fine-tuned from the CFG model
(`--gft_steps`); the sweep samples them through `sweep.trained_ckpts`. Each stage lives in a directory keyed
by a hash of its settings: a finished stage is reused, an interrupted fit resumes from its last.ckpt, a
half-written sweep skips finished cells.
On W&B the stages' runs are named after their directories (`classifier-<hash>`, ...), have the job
types classifier / diffusion / sweep and share one group per study (`--out`): `<out name>-<hash of its path>`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from experiments.sweep import sweep as sweep_cli
from experiments.train import main as train_cli
from experiments.trends import check_trends
from lightning_modules.diffusion import OptionError
from lightning_modules.sweep import SUMMARY_COLUMNS, SUMMARY_TITLE, format_table, summary
from lightning_modules.sweep.verdicts import verdict_text

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "experiments"



def cli(args: list[str], run: bool = True):
    """experiments.train's CLI on `args`, with compare's own command line hidden from it (LightningCLI warns on
    every stage when it sees both)."""
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return train_cli(args, run=run)

def stage_dir(root: Path, name: str, args: list[str]) -> Path:
    """A directory per (stage, settings): the recipe files' contents and the overrides are hashed."""
    blob = json.dumps([Path(a).read_text() if a.endswith(".yaml") else a for a in args])
    return root / f"{name}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def study_group(root: Path) -> str:
    """The W&B group of every run of one study: the `--out` directory's name and a hash of its full path."""
    path = str(root.resolve())
    return f"{Path(path).name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def wandb_args(directory: Path, job_type: str, group: str) -> list[str]:
    """LightningCLI overrides for a stage's W&B run: named after its directory, the study's group, a job type, tags."""
    return [f"--trainer.logger.init_args.name={directory.name}", f"--trainer.logger.init_args.group={group}",
            f"--trainer.logger.init_args.job_type={job_type}", "--trainer.logger.init_args.tags=[digits, compare]"]


def fit_stage(root: Path, name: str, args: list[str], group: str | None = None) -> Path:
    """Train (or reuse, or resume) one model; returns its last checkpoint, verified to hold the stage's final step.

    done.json records the step the fit ended at; a stage is reused only while last.ckpt still holds that step
    (otherwise it resumes from last.ckpt, which the recipes' LastCheckpoint writes every few steps).
    """
    import torch

    def saved_step(path: Path) -> int | None:
        """The step `path` holds; None if it cannot be read (empty or truncated by a kill or a full disk)."""
        try:
            return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
        except Exception:
            return None

    directory = stage_dir(root, name, args)
    last, done = directory / "checkpoints" / "last.ckpt", directory / "done.json"
    saved = saved_step(last) if last.exists() else None
    if last.exists() and saved is None:  # not finished, whatever done.json says; kept aside, not deleted
        aside = last.with_name(last.name + ".corrupt")
        os.replace(last, aside)
        done.unlink(missing_ok=True)
        print(f"[{name}] {last} cannot be read (empty or truncated): moved to {aside.name}, training from scratch",
              flush=True)
    if done.exists() and last.exists():
        recorded = json.loads(done.read_text()).get("global_step")
        if recorded == saved:
            print(f"[{name}] reusing finished stage {directory} (step {saved})", flush=True)
            return last
        print(f"[{name}] done.json says step {recorded} but {last} holds step {saved}: resuming", flush=True)
        done.unlink()
    print(f"[{name}] training -> {directory}", flush=True)
    run = cli([*args, *wandb_args(directory, name, group or study_group(root)),
               "--trainer.logger.init_args.save_dir", str(directory)], run=False)
    for callback in run.trainer.callbacks:
        if isinstance(callback, ModelCheckpoint):
            callback.dirpath = str(directory / "checkpoints")
    start = time.perf_counter()
    run.trainer.fit(run.model, run.datamodule, ckpt_path=str(last) if last.exists() else None)
    metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items()}
    finish_wandb(run.trainer)
    step = run.trainer.global_step
    saved = saved_step(last) if last.exists() else None
    if saved != step:
        raise RuntimeError(f"[{name}] the fit ended at step {step} but {last} holds step {saved}: the recipe needs "
                           "a callbacks.LastCheckpoint (last.ckpt at the final step); nothing was marked done.")
    done.write_text(json.dumps({"seconds": time.perf_counter() - start, "global_step": step,
                                "metrics": metrics}, indent=1))
    return last


def finish_wandb(trainer: Trainer | None = None) -> None:
    """Close this stage's W&B run: WandbLogger would otherwise log the next stage into it (it reuses `wandb.run`)."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers if trainer is not None else []:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
    if wandb.run is not None:
        wandb.finish()


def trained_stages(root: Path, diff_args: list[str], diffusion: Path, args: argparse.Namespace,
                   group: str) -> dict[str, Path]:
    """The models of the trained-in methods the sweep recipe lists (and does not bring): `mg` from scratch with the
    CFG model's settings and steps, `gft` fine-tuned from the CFG model's checkpoint for `--gft_steps`."""
    import yaml

    sweep = (yaml.safe_load(Path(args.sweep_recipe).read_text()) or {}).get("sweep", {})
    given, out = sweep.get("trained_ckpts") or {}, {}
    if "mg" in sweep.get("methods", []) and "mg" not in given:
        out["mg"] = fit_stage(root, "mg_diffusion", [*diff_args, "--model.init_args.guidance_training", "mg"], group)
    if "gft" in sweep.get("methods", []) and "gft" not in given:
        steps = args.gft_steps or diffusion_steps(diff_args) // 4
        out["gft"] = fit_stage(root, "gft_diffusion", [*diff_args, "--model.init_args.guidance_training", "gft",
                                                       "--model.init_args.init_from", str(diffusion),
                                                       "--trainer.max_steps", str(steps)], group)
    return out


def diffusion_steps(diff_args: list[str]) -> int:
    """The CFG model's max_steps: the last --trainer.max_steps override, else its recipe's."""
    import yaml

    if "--trainer.max_steps" in diff_args:
        return int(diff_args[len(diff_args) - 1 - diff_args[::-1].index("--trainer.max_steps") + 1])
    return int(yaml.safe_load((CONFIGS / "digits_diffusion.yaml").read_text())["trainer"]["max_steps"])


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/compare", help="root directory of all stages")
    # Unset, these three are the recipe's own (digits_sweep.yaml: seeds 0 1, 500 samples, DDIM-20).
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="sampling seeds (error bars)")
    p.add_argument("--num_samples", type=int, default=None, help="samples per (method, scale, seed) cell")
    p.add_argument("--steps", type=int, default=None, help="sampling steps")
    p.add_argument("--diffusion_steps", type=int, default=None, help="override the diffusion recipe's max_steps")
    p.add_argument("--classifier_steps", type=int, default=None, help="override both classifiers' max_steps")
    p.add_argument("--p_uncond", type=float, default=None,
                   help="override the diffusion recipe's label-dropout rate (0: no null label, e.g. for "
                        "configs/experiments/digits_sweep_no_dropout.yaml, which sweeps ICG on such a model)")
    p.add_argument("--sweep_recipe", default=str(CONFIGS / "digits_sweep.yaml"),
                   help="the sweep's YAML (methods, scale grids, sampler); "
                        "configs/experiments/digits_sweep_frontier.yaml runs every method")
    p.add_argument("--gft_steps", type=int, default=None,
                   help="steps of the GFT fine-tune from the CFG model (recipes sweeping gft; default: a quarter of "
                        "the CFG model's)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further LightningCLI overrides for the sweep stage, e.g. --sweep.sampling.eta=1.0")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    os.environ.setdefault("WANDB_MODE", "offline")  # a W&B run on disk, no account needed
    root, start = Path(args.out), time.perf_counter()
    cls_args = ["--config", str(CONFIGS / "digits_classifier.yaml")]
    if args.classifier_steps:
        cls_args += ["--trainer.max_steps", str(args.classifier_steps)]
    diff_args = ["--config", str(CONFIGS / "digits_diffusion.yaml")]
    if args.diffusion_steps:
        diff_args += ["--trainer.max_steps", str(args.diffusion_steps)]
    if args.p_uncond is not None:
        diff_args += ["--model.init_args.p_uncond", str(args.p_uncond)]
    group = study_group(root)
    classifier = fit_stage(root, "classifier", cls_args, group)
    clean_args = ["--config", str(CONFIGS / "digits_clean_classifier.yaml")]
    if args.classifier_steps:
        clean_args += ["--trainer.max_steps", str(args.classifier_steps)]
    clean = fit_stage(root, "clean_classifier", clean_args, group)
    diffusion = fit_stage(root, "diffusion", diff_args, group)

    trained = trained_stages(root, diff_args, diffusion, args, group)
    base = [*diff_args, "--config", args.sweep_recipe, "--sweep.classifier_ckpt", str(classifier),
            "--sweep.clean_classifier_ckpt", str(clean)]
    if trained:
        base += ["--sweep.trained_ckpts", json.dumps({m: str(path) for m, path in trained.items()})]
    for option, value in (("--sweep.num_samples", args.num_samples), ("--sweep.sampling.steps", args.steps),
                          ("--sweep.seeds", args.seeds)):
        if value is not None:  # otherwise the recipe's
            base += [option, json.dumps(value)]
    sweep_dir = stage_dir(root, "sweep", [*base, *args.extra, str(diffusion)])
    print(f"[sweep] CFG vs CG -> {sweep_dir}", flush=True)
    # The sweep stage runs without a Trainer (experiments.sweep, the same orchestration as every entry point):
    # a --trainer.* override has nothing to act on.
    ignored = [a for a in args.extra if a.startswith("--trainer.")]
    if ignored:
        print(f"[sweep] ignoring {' '.join(ignored)} (the sweep stage has no Trainer)", flush=True)
    extra = [a for a in args.extra if not a.startswith("--trainer.")]
    done = sweep_cli(["--diffusion", str(diffusion), *base[len(diff_args):], *extra,
                      "--sweep.output_dir", str(sweep_dir), "--wandb", "true", "--wandb_group", group,
                      "--wandb_tags", json.dumps(["digits", "compare"])])
    rows = done.outcome.rows

    best = summary(rows)
    print(f"\n== {SUMMARY_TITLE} ==")
    print(format_table(best, SUMMARY_COLUMNS))
    if best and best[0]["matched_accuracy"] == best[0]["matched_accuracy"]:  # not NaN
        print(f"\n== At matched strength: the first scale reaching accuracy {best[0]['matched_accuracy']:.3g} "
              "(interpolated) ==")
        print(format_table(best, ["method", "matched_scale", "matched_gamma", "matched_fid", "matched_recall"]))
    if done.outcome.verdicts:
        print("\n== Paired verdicts: every method against the best and against CFG (joint 95%) ==")
        print(verdict_text(done.outcome.verdicts))
    print("\n== Trend checks (Ho & Salimans 2022; Dhariwal & Nichol 2021) ==")
    for line in check_trends(rows):
        print(line)
    wandb_dir = max(sweep_dir.glob("wandb/offline-run-*"), default=sweep_dir / "wandb")  # the newest (timestamped)
    print(f"\nfinished in {time.perf_counter() - start:.0f} s")
    extractor = done.evaluation.extractor
    if hasattr(extractor, "heldout_accuracy"):
        print(f"evaluator held-out accuracy: {extractor.heldout_accuracy:.3f}")
    print(f"classifier checkpoint: {classifier}")
    print(f"clean classifier:      {clean}")
    print(f"diffusion checkpoint:  {diffusion}")
    for method, path in trained.items():
        print(f"{method} model:{' ' * (15 - len(method))}{path}")
    if os.environ.get("WANDB_MODE") != "disabled":
        print(f"W&B run ({os.environ.get('WANDB_MODE')}): {wandb_dir}  (group {group}; upload: wandb sync {wandb_dir})")
    print("\n".join(done.outcome.path_lines()))
    return rows


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except OptionError as err:  # a bad setting or an output that could not be written: one message
        sys.exit(f"error: {err}")
