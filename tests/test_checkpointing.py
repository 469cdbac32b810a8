"""Checkpoints a killed fit resumes from exactly: last.ckpt at the final step and on a step cadence whatever the
validation cadence, RNG states and the train loader's mid-epoch position restored, stages handed on verified."""

import json

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks import ExactResume, LastCheckpoint
from datamodules import ImageDataModule
from datamodules.datasets import DeviceBatches, EpochSampler, ResumableLoader, TensorImageDataset
from experiments import compare
from experiments.train import main

from .helpers import CONFIGS, FAST_TRAINER, TINY_NET


class Kill(Callback):
    """Dies like a kill -9 would find it: at the start of the step after `at`, no end-of-fit hook runs."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("killed")


def build(kind: str, save_dir, every: int | None = None, kill: int | None = None, extra: list[str] = ()):
    """A digits recipe with the tiny network, not yet fitted; `every` replaces LastCheckpoint's cadence."""
    cli = main(["--config", str(CONFIGS / f"digits_{kind}.yaml"), *TINY_NET, *FAST_TRAINER,
                f"--trainer.logger.init_args.save_dir={save_dir}", *extra], run=False)
    callbacks = cli.trainer.callbacks
    if every is not None:
        callbacks = [LastCheckpoint(every_n_train_steps=every) if isinstance(c, LastCheckpoint) else c
                     for c in callbacks]
    cli.trainer.callbacks = [*callbacks, *([Kill(kill)] if kill is not None else [])]
    return cli


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # what experiments.compare reads


def checkpoints(root):
    return sorted(p.name for p in root.glob("guidelab/*/checkpoints/*.ckpt"))


@pytest.mark.parametrize("on_device", [False, True], ids=["loader", "on_device"])
def test_killed_mid_epoch_then_resumed_ends_with_the_uninterrupted_weights(tmp_path, on_device):
    # 23 steps per epoch at batch 64: the kill at step 14 falls mid-epoch, on a periodic (every 7) checkpoint.
    extra = ["--trainer.max_steps=30", "--data.batch_size=64", f"--data.on_device={str(on_device).lower()}"]
    full = build("diffusion", tmp_path / "full", every=7, extra=extra)
    full.trainer.fit(full.model, full.datamodule)

    killed = build("diffusion", tmp_path / "killed", every=7, kill=14, extra=extra)
    with pytest.raises(RuntimeError, match="killed"):
        killed.trainer.fit(killed.model, killed.datamodule)
    last = killed.trainer.checkpoint_callback.last_model_path
    ckpt = load(last)
    assert ckpt["global_step"] == 14
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 14}]
    assert len(killed.trainer.train_dataloader) == 23  # so 14 is mid-epoch

    resumed = build("diffusion", tmp_path / "killed", every=7, extra=extra)
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=last)
    assert resumed.trainer.global_step == full.trainer.global_step == 30
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert any(k.startswith("ema_net.") for k in a) and a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # network and EMA, bit for bit


def test_last_checkpoint_holds_the_final_step_with_sparse_validation(tmp_path):
    # 5 steps per epoch at batch 256, validation every 2 epochs: it runs at step 10, the fit ends at 12.
    cli = build("classifier", tmp_path, extra=["--trainer.max_steps=12", "--data.batch_size=256",
                                               "--trainer.check_val_every_n_epoch=2"])
    cli.trainer.fit(cli.model, cli.datamodule)
    assert load(cli.trainer.checkpoint_callback.last_model_path)["global_step"] == 12
    assert checkpoints(tmp_path) == ["best-step=10.ckpt", "last.ckpt"]


def test_fit_killed_before_its_first_validation_still_has_a_checkpoint(tmp_path):
    cli = build("classifier", tmp_path, every=5, kill=8,
                extra=["--trainer.max_steps=40", "--data.batch_size=256", "--trainer.check_val_every_n_epoch=50"])
    with pytest.raises(RuntimeError, match="killed"):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert checkpoints(tmp_path) == ["last.ckpt"]
    assert load(cli.trainer.checkpoint_callback.last_model_path)["global_step"] == 5


def recipe_callbacks(name: str) -> list[dict]:
    return yaml.safe_load((CONFIGS / name).read_text())["trainer"]["callbacks"]


@pytest.mark.parametrize("recipe, most_lost", [("digits_diffusion.yaml", 100), ("digits_classifier.yaml", 100),
                                               ("cifar10_diffusion.yaml", 1000), ("cifar10_classifier.yaml", 1000)])
def test_recipes_bound_what_a_kill_loses_and_resume_exactly(recipe, most_lost):
    callbacks = recipe_callbacks(recipe)
    (last,) = [c for c in callbacks if c["class_path"] == "callbacks.LastCheckpoint"]
    assert 1 <= last["init_args"]["every_n_train_steps"] <= most_lost
    assert any(c["class_path"] == "callbacks.ExactResume" for c in callbacks)
    # LastCheckpoint alone owns last.ckpt; the monitored checkpoint keeps only best-step=N.ckpt.
    others = [c.get("init_args", {}) for c in callbacks if c["class_path"].endswith(".ModelCheckpoint")]
    assert any(a.get("monitor") == "val/loss" for a in others)
    assert not any(a.get("save_last") for a in others)


def test_recipe_instantiates_last_checkpoint_first():
    """`trainer.checkpoint_callback` (the first ModelCheckpoint) is the one whose last_model_path is last.ckpt."""
    cli = main(["--config", str(CONFIGS / "digits_diffusion.yaml"), "--trainer.logger=false"], run=False)
    assert isinstance(cli.trainer.checkpoint_callback, LastCheckpoint)
    assert cli.trainer.checkpoint_callback._every_n_train_steps == 100
    assert sum(isinstance(c, ExactResume) for c in cli.trainer.callbacks) == 1
    assert sum(type(c) is ModelCheckpoint for c in cli.trainer.callbacks) == 1


@pytest.mark.parametrize("on_device", [False, True], ids=["loader", "on_device"])
def test_train_loader_order_is_seeded_per_epoch_and_resumes_mid_epoch(on_device):
    dm = ImageDataModule("digits", batch_size=100, on_device=on_device)
    dm.setup()
    rng = torch.get_rng_state()
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader)
    epoch0 = [y for _, y in loader]
    assert torch.equal(torch.get_rng_state(), rng)  # iterating never draws from the global RNG
    assert [torch.equal(a, b) for a, b in zip(epoch0, [y for _, y in dm.train_dataloader()])] == [True] * len(epoch0)
    assert loader.state_dict() == {"epoch": 0, "batches": len(epoch0)}

    resumed = dm.train_dataloader()
    resumed.load_state_dict({"epoch": 0, "batches": 4})
    it = iter(resumed)
    first = next(it)[1]
    assert torch.equal(first, epoch0[4]) and resumed.state_dict() == {"epoch": 0, "batches": 5}
    assert all(torch.equal(y, ref) for (_, y), ref in zip(it, epoch0[5:], strict=True))
    again = [y for _, y in resumed]  # the skip applies to one pass only
    assert len(again) == len(epoch0)
    if not on_device:  # map-style: Lightning calls set_epoch; an epoch-1 state never skips epoch 2
        resumed.sampler.set_epoch(1)
        assert not torch.equal(next(iter(resumed))[1], epoch0[0])
        resumed.load_state_dict({"epoch": 1, "batches": 3})
        resumed.sampler.set_epoch(2)
        assert len(list(resumed)) == len(epoch0)


def test_epoch_sampler_gives_ranks_disjoint_equal_shares_in_the_device_order():
    ds = TensorImageDataset(torch.zeros(21, 1, 1, 1, dtype=torch.uint8), torch.arange(21), 255, 1, False)
    shards = [list(EpochSampler(ds, seed=3, rank=r, world=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 10 and not set(shards[0]) & set(shards[1])
    device = torch.cat([y for _, y in DeviceBatches(ds, 5, True, 3, lambda: 0, rank=1, world=2)]).tolist()
    assert device == shards[1]  # the on-device path trains in the same order


def test_compare_stage_hands_on_the_checkpoint_of_its_final_step(tmp_path, capsys):
    args = ["--config", str(CONFIGS / "digits_classifier.yaml"), *TINY_NET, *FAST_TRAINER, "--trainer.max_steps=4",
            "--data.batch_size=256"]
    last = compare.fit_stage(tmp_path, "classifier", args)
    done = last.parent.parent / "done.json"
    assert json.loads(done.read_text())["global_step"] == load(last)["global_step"] == 4
    assert "[classifier] training" in capsys.readouterr().out

    assert compare.fit_stage(tmp_path, "classifier", args) == last
    assert "[classifier] reusing" in capsys.readouterr().out

    # done.json disagreeing with the checkpoint is not trusted: the stage resumes (here: nothing left to train).
    done.write_text(json.dumps({**json.loads(done.read_text()), "global_step": 3}))
    assert compare.fit_stage(tmp_path, "classifier", args) == last
    out = capsys.readouterr().out
    assert "holds step 4: resuming" in out and "reusing" not in out
    assert json.loads(done.read_text())["global_step"] == 4
