"""Every experiment recipe is exercised: the digits ones elsewhere (test_sweep, test_training), the
CIFAR-10 ones here with a fast run on tiny files in the real CIFAR format."""

from pathlib import Path

import pytest

from experiments.train import main

from .helpers import CONFIGS
from .test_datamodule import make_cifar10

FAST_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32", "--trainer.max_steps=1",
            "--data.batch_size=2", "--data.num_workers=0", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--model.init_args.compile=false"]  # the recipes compile for GPUs; a CPU inductor build takes minutes


@pytest.mark.parametrize("recipe", ["cifar10_diffusion.yaml", "cifar10_classifier.yaml"])
def test_cifar10_recipe_fits_one_step(recipe, tmp_path):
    make_cifar10(tmp_path / "data")
    cli = main(["fit", "--config", str(CONFIGS / recipe), *FAST_CPU, f"--data.data_dir={tmp_path / 'data'}",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"])
    assert cli.trainer.global_step == 1
    assert cli.model.hparams.image_size == 32 and cli.model.hparams.channels == 3
    params = sum(p.numel() for p in cli.model.net.parameters())
    if recipe == "cifar10_diffusion.yaml":
        assert 35e6 < params < 40e6  # the DDPM-CIFAR size


def test_cifar10_classifier_shares_the_diffusion_schedule():
    import yaml

    diff = yaml.safe_load((CONFIGS / "cifar10_diffusion.yaml").read_text())["model"]["init_args"]
    cls = yaml.safe_load((CONFIGS / "cifar10_classifier.yaml").read_text())["model"]["init_args"]
    assert (diff["schedule"], diff["timesteps"]) == (cls["schedule"], cls["timesteps"])
    digits_diff = yaml.safe_load((CONFIGS / "digits_diffusion.yaml").read_text())["model"]["init_args"]
    digits_cls = yaml.safe_load((CONFIGS / "digits_classifier.yaml").read_text())["model"]["init_args"]
    assert (digits_diff["schedule"], digits_diff["timesteps"]) == (digits_cls["schedule"], digits_cls["timesteps"])


def test_no_committed_config_forces_wandb_offline():
    for path in Path(CONFIGS).parent.rglob("*.yaml"):
        assert "offline: true" not in path.read_text(), path
