"""A DDP training step of the MG and GFT objectives equals one process (2 gloo CPU processes, as Lightning wraps the
module that computes the loss): the all-reduced gradient of each rank's half batch is the one-process gradient of
the mean of both halves' losses, and one optimiser step gives the same weights on every rank."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_modules.diffusion import NoiseSchedule
from lightning_modules.diffusion.guidance_training import guidance_free_loss, model_guidance_loss

from .test_guidance_training import NULL, batch, unet

pytestmark = pytest.mark.slow
SCHEDULE = NoiseSchedule("cosine", 1000)


class Objective(nn.Module):
    """The loss as a module's forward (Lightning's DDP wraps the LightningModule whose training_step calls it)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.net = kind, unet(beta=kind == "gft")
        self.ema = unet(beta=False, seed=5).requires_grad_(False) if kind == "mg" else None

    def forward(self, x, y, generator):
        if self.kind == "mg":
            return model_guidance_loss(self.net, self.ema, SCHEDULE, x, y, NULL, 0.45, 0.75, generator=generator)
        return guidance_free_loss(self.net, SCHEDULE, x, y, NULL, (0.0, 1.0), generator=generator)


def halves():
    x, y = batch(16)
    return (x[:8], y[:8]), (x[8:], y[8:])


def one_step(model: nn.Module, loss: torch.Tensor) -> dict:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return {"grads": grads, "weights": {k: v.clone() for k, v in model.state_dict().items()}}


def rank_main(rank: int, kind: str, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = Objective(kind)
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = halves()[rank]
    result = one_step(model, ddp(x, y, torch.Generator().manual_seed(rank)))
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["mg", "gft"])
def test_a_ddp_step_equals_one_process(kind):
    model = Objective(kind)
    losses = [model(x, y, torch.Generator().manual_seed(r)) for r, (x, y) in enumerate(halves())]
    reference = one_step(model, (losses[0] + losses[1]) / 2)
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        mp.spawn(rank_main, args=(kind, init, os.path.join(tmp, "result")), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"result.{r}"), weights_only=True) for r in range(2)]
    assert reference["grads"].keys() == ranks[0]["grads"].keys() and reference["grads"]
    for name, grad in reference["grads"].items():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name, weight in reference["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][name], weight, rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
