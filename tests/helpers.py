"""Tiny, fast recipes for the end-to-end tests: the real configs with small networks and few steps."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.train import main

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "experiments"
TINY_NET = ["--model.init_args.base_channels=16", "--model.init_args.channel_mult=[1, 2]"]
FAST_TRAINER = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=1",
                "--trainer.log_every_n_steps=1"]


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
            "--sweep.num_samples=30", "--sweep.sampling.steps=3", "--sweep.grid_size=10", "--sweep.progress=false",
            f"--trainer.logger.init_args.save_dir={save_dir}", *extra]
