"""Training behaviour through the CLI: EMA continues on resume, a non-finite loss stops cleanly."""

import pytest
import torch

import lightning_modules.diffusion_module as diffusion_module
from experiments.train import main
from lightning_modules.training import EMA

from .helpers import CONFIGS, FAST_TRAINER, TINY_NET

BASE = ["fit", "--config", str(CONFIGS / "digits_diffusion.yaml"), *TINY_NET, *FAST_TRAINER, "--data.batch_size=256"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_continues_global_step_and_ema(tmp_path):
    first = main([*BASE, "--trainer.max_steps=5", f"--trainer.logger.init_args.save_dir={tmp_path / 'a'}"])
    last = first.trainer.checkpoint_callback.last_model_path
    second = main([*BASE, "--trainer.max_steps=6", f"--trainer.logger.init_args.save_dir={tmp_path / 'b'}",
                   f"--ckpt_path={last}"])
    a, b = load(last)["state_dict"], load(second.trainer.checkpoint_callback.last_model_path)
    assert b["global_step"] == 6
    # One more EMA step from the *saved* average: ema6 = lerp(ema5, net6, 1 - decay(6)).
    decay = EMA(second.model.hparams.ema_decay).decay_at(6)
    for key in [k for k in a if k.startswith("ema_net.")][:20]:
        raw = key.replace("ema_net.", "net.", 1)
        expected = torch.lerp(a[key], b["state_dict"][raw], 1 - decay)
        torch.testing.assert_close(b["state_dict"][key], expected, atol=1e-6, rtol=1e-5)


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = diffusion_module.denoising_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) > 7 else loss

    monkeypatch.setattr(diffusion_module, "denoising_loss", poisoned)
    with pytest.raises(FloatingPointError, match="last.ckpt"):
        main([*BASE, "--trainer.max_steps=20",
              f"--trainer.logger.init_args.save_dir={tmp_path}"])
    (last,) = tmp_path.glob("guidelab/*/checkpoints/last.ckpt")
    ckpt = load(last)
    assert ckpt["global_step"] == 5  # the end of the first epoch, before the bad step
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_gpu_path_options_train_on_cpu(tmp_path):
    """bf16 autocast, channels_last and data kept on the device (here the CPU) run through Lightning."""
    cli = main([*BASE, "--trainer.max_steps=2", "--trainer.precision=bf16-mixed", "--data.on_device=true",
                "--model.init_args.channels_last=true", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert cli.trainer.global_step == 2
    assert cli.datamodule.train_dataset.images.device == cli.trainer.strategy.root_device
    assert torch.isfinite(torch.tensor(float(cli.trainer.callback_metrics["train/loss"])))
