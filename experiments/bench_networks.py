"""The network half of `experiments/benchmark.py`: our UNet at the DDPM-CIFAR size and diffusers' UNet2DModel of
the same size (the peer), the identical training step and sampling forward both are timed with, their FLOPs per
image and the ours/peer ratios; also the random-init networks the sweep half times (`sweep_models`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.bench_sweep import autocast, count_flops, median_seconds, peak_flops
from lightning_modules.networks import EncoderClassifier, UNet
from lightning_modules.sweep import Network, SweepModels

NUM_CLASSES = 10  # CIFAR-10; the embedding tables hold one more row, the null label
IMAGE_SIZE, CHANNELS, CHANNEL_MULT = 32, 3, (1, 2, 2, 2)
# What the engine reads from a network's hyperparameters (the classifier shares the compatibility keys).
HPARAMS = {"schedule": "linear", "timesteps": 1000, "prediction": "eps", "num_classes": NUM_CLASSES,
           "image_size": IMAGE_SIZE, "channels": CHANNELS}
PEER_HINT = "diffusers not installed: pip install -e .[bench]"

Step = Callable[[], object]


def build_ours(base: int, dropout: float = 0.1) -> nn.Module:
    return UNet(IMAGE_SIZE, CHANNELS, NUM_CLASSES, base_channels=base, channel_mult=CHANNEL_MULT, num_res_blocks=2,
                attention_resolutions=(16,), dropout=dropout, num_heads=4)


def build_peer(base: int, dropout: float = 0.1) -> nn.Module:
    """diffusers' UNet2DModel with our layout: attention at 16x16 (the second level), AdaGN (scale_shift),
    4 heads of the attention width like ours, a class table with the null row."""
    from diffusers import UNet2DModel

    widths = tuple(base * m for m in CHANNEL_MULT)
    return UNet2DModel(
        sample_size=IMAGE_SIZE, in_channels=CHANNELS, out_channels=CHANNELS, block_out_channels=widths,
        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=NUM_CLASSES + 1,
        resnet_time_scale_shift="scale_shift", dropout=dropout, attention_head_dim=widths[1] // 4, norm_num_groups=32)


def call_ours(net: nn.Module, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    return net(x, t, y)


def call_peer(net: nn.Module, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
    return net(x, t, class_labels=y).sample


def fake_batch(n: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x_t, t, y (10% null labels, as CFG training sees them) and the noise target; identical for both nets."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    y = torch.where(torch.rand(n, generator=gen) < 0.1, torch.full_like(y, NUM_CLASSES), y)
    noise = torch.randn(x.shape, generator=gen)
    return x.to(device), t.to(device), y.to(device), noise.to(device)


def flops_per_image(net: nn.Module, call, device: torch.device, train: bool) -> float:
    """FLOPs per image of one training step (forward + backward) or one network evaluation, counted at
    batch 2 (every counted op is linear in the batch)."""
    x, t, y, noise = fake_batch(2, device, seed=1)
    if train:
        flops = count_flops(lambda: F.mse_loss(call(net, x, t, y).float(), noise).backward())
        net.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            flops = count_flops(lambda: call(net, x, t, y))
    return flops / 2


def _mark_step(device: torch.device, mode: str | None) -> None:
    if mode is not None and "reduce-overhead" in mode and device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the last one's graph outputs are dead


def train_step(net: nn.Module, call, batch: int, device: torch.device, dtype: str, mode: str | None) -> Step:
    x, t, y, noise = fake_batch(batch, device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        _mark_step(device, mode)
        with autocast(device, dtype):
            out = call(net, x, t, y)
        loss = F.mse_loss(out.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sample_step(net: nn.Module, call, batch: int, device: torch.device, dtype: str, mode: str | None) -> Step:
    x, t, y, _ = fake_batch(batch, device)

    def step() -> Tensor:
        _mark_step(device, mode)
        with torch.inference_mode(), autocast(device, dtype):
            return call(net, x, t, y)

    return step


def measure(impl: str, build, call, args, device: torch.device, compile_: bool, flops: dict) -> list[dict]:
    """Training and sampling throughput of one network in one compile mode."""
    records = []
    for bench, batch in (("train", args.train_batch), ("sample", args.sample_batch)):
        torch.manual_seed(0)
        net = build(args.base_channels).to(device).train(bench == "train")
        key = (impl, bench)
        if key not in flops:  # counted once on the eager network; compiling does not change the maths
            flops[key] = flops_per_image(net, call, device, train=bench == "train")
        mode = args.compile_mode if compile_ else None
        runner = torch.compile(net, mode=None if mode == "default" else mode) if compile_ else net
        make = train_step if bench == "train" else sample_step
        record = {"bench": bench, "impl": impl, "compile": compile_, "compile_mode": mode, "dtype": args.dtype,
                  "batch": batch, "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 3)}
        try:
            seconds = median_seconds(make(runner, call, batch, device, args.dtype, mode), args.iters,
                                     args.warmup + (2 if compile_ else 0), device)
        except Exception as err:  # e.g. no C++ compiler for inductor on this machine: report, go on
            records.append({**record, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            continue
        finally:
            del net, runner
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        per_image = flops[key]
        achieved = per_image * batch / seconds
        peak = peak_flops(device, args.dtype)
        records.append({**record, "images_per_s": round(batch / seconds, 2), "ms_per_iter": round(1e3 * seconds, 3),
                        "gflops_per_image": round(per_image / 1e9, 3), "achieved_tflops": round(achieved / 1e12, 4),
                        "mfu": None if peak is None else round(achieved / peak, 4)})
    return records


def ratios(records: list[dict]) -> list[dict]:
    """ours/peer images/s for every (bench, compile mode) measured on both sides."""
    speed = {(r["impl"], r["bench"], r["compile"]): r["images_per_s"] for r in records if "images_per_s" in r}
    out = []
    for (impl, bench, compile_), ours in speed.items():
        peer = speed.get(("peer", bench, compile_))
        if impl == "ours" and peer:
            out.append({"bench": "ratio", "of": bench, "compile": compile_, "dtype": records[0]["dtype"],
                        "ours_over_peer": round(ours / peer, 4)})
    return out


def sweep_models(args) -> SweepModels:
    """Our UNet (no dropout) and a random-init noisy classifier as the engine's models: speed, not quality."""
    torch.manual_seed(0)
    net = build_ours(args.base_channels, dropout=0.0)
    width, mult = (32, (1, 2, 2)) if args.small else (args.base_channels, CHANNEL_MULT)
    classifier = EncoderClassifier(IMAGE_SIZE, CHANNELS, NUM_CLASSES, base_channels=width, channel_mult=mult,
                                   num_res_blocks=1 if args.small else 2, attention_resolutions=(16,),
                                   pool="attention")
    return SweepModels(Network(net, HPARAMS, step=0), Network(classifier, HPARAMS, step=0)).to(args.device)
