"""The sweep engine: plan → chunks → samples → features → cross-rank reduction → metrics → rows → store.

One engine, thin callers: the Lightning callback (hooks, ranks, W&B), `python -m experiments.sweep` and the
benchmark all run `run_sweep` / `run_job`. All scales of a method run as one batched pass (per-sample scale
vectors); item i of a job is sample i % n at scale index i // n, and sample i's noise is a hash of
(seed, i), so every cell starts from the same noise on any batch size or number of ranks. Rank r takes
items r, r + W, ...; each item is produced by exactly one rank, so summing zero-padded buffers is exact. Samples
are scored rounded to 8 bits, as `samples/<cell>.npz` (`sweep.save_samples`) and the grids hold them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_modules.diffusion import GuidedDenoiser, cell_cost, make_rule, sample, sample_keys
from lightning_modules.evaluation.sample_files import from_pixels, to_pixels

from .config import SweepConfig
from .evaluation import Evaluation
from .models import SweepModels
from .planning import (
    Job,
    check_network,
    check_null_label,
    check_trained_guidance,
    plan_jobs,
    selected,
    shared_cells,
    signatures,
)
from .store import SweepStore, png_bytes


class Distributed(Protocol):
    """What the engine needs from a process group (injected, so the engine imports no Lightning)."""

    rank: int
    world: int

    def all_sum(self, tensor: Tensor) -> None: ...  # in place
    def broadcast(self, obj: object) -> object: ...  # rank 0's value to every rank


class SingleProcess:
    rank, world = 0, 1

    def all_sum(self, tensor: Tensor) -> None:
        pass

    def broadcast(self, obj: object) -> object:
        return obj


SINGLE = SingleProcess()


@dataclass
class JobResult:
    rows: list[dict]
    grids: list[Tensor]  # per scale: the first grid_size images of the cell
    sampling_seconds: float
    metrics_seconds: float
    draws: list[dict]  # per scale: the cell's draws record in every feature space (see Evaluation.score_with_draws)
    samples: list[Tensor] | None = None  # per scale, with save_samples: every image of the cell, uint8 (N, H, W, C)


def _record_shared(config: SweepConfig, store: SweepStore, sigs: dict[str, str], on_cell) -> None:
    """Rank 0: write each shared cell as a copy of its source row (own method, scale, γ, cost and signature)."""
    rows = {(r["method"], r["scale"], r["seed"]): r for r in selected(store, sigs)}
    for (method, scale, seed), (src_method, src_scale) in shared_cells(config).items():
        source = rows.get((src_method, src_scale, seed))
        sig = sigs[method]
        if source is None or store.done(sig, method, scale, seed, samples=config.save_samples):
            continue
        rule = make_rule(method, config.guidance)
        row = {**source, "method": method, "scale": scale, "gamma": rule.gamma(scale), "signature": sig,
               "same_as": f"{src_method} s={src_scale:g}", "grid": store.grid_path(sig, method, scale, seed)}
        # Its samples file, if any, is the source's own (`samples` is copied with the row): same images, no copy.
        store.append(row, (store.directory / source["grid"]).read_bytes())
        if on_cell is not None:
            on_cell(row, None)


def samples_cost(config: SweepConfig, models: SweepModels, cells: int, store: SweepStore) -> str:
    """What save_samples will write: bytes per cell (uint8 images + int64 labels) and in all, said before sampling."""
    c, h, w = models.shape
    per_cell = config.num_samples * (c * h * w + 8) + 512  # + the .npz's headers
    return (f"[sweep] save_samples: {cells} cell(s) to sample × {per_cell / 2**20:.2f} MiB = "
            f"{cells * per_cell / 2**20:.1f} MiB of .npz in {store.directory / 'samples'} (cells shared on paired "
            "noise point to their source's file)")


def generate_images(models: SweepModels, config: SweepConfig, job: Job, items: Tensor,
                    autocast_dtype: torch.dtype | None = None,
                    on_step: Callable[[int], None] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """(item indices, images in [-1, 1]) per chunk of `items`: the one sampling loop of every caller."""
    n, device = config.num_samples, models.device
    rule = make_rule(job.method, config.guidance)
    s = config.sampling
    network = models.network_for(job.method)  # a trained-in method's own model (mg, gft), else the sweep's
    for chunk in items.split(config.batch_size):
        sample_idx, scale_idx = chunk % n, chunk // n
        guide = models.guide
        den = GuidedDenoiser(network.net, models.schedule, (sample_idx % models.num_classes).to(device),
                             models.num_classes, rule, [job.scales[j] for j in scale_idx.tolist()],
                             grad_fn=models.grad_fn, prediction=network.hparams["prediction"],
                             guide=guide.net if guide else None,
                             guide_prediction=guide.hparams["prediction"] if guide else "eps",
                             log_prob_x0=models.clean_log_prob)
        keys = sample_keys(job.seed, sample_idx).to(device)
        stats: dict = {}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            images = models.decode(sample(den, models.shape, keys, s, callback=on_step, stats=stats))
        yield chunk, images.float(), stats["thresholded_steps"], stats["trace"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_job(models: SweepModels, config: SweepConfig, evaluation: Evaluation, job: Job, sig: str, *,
            dist: Distributed = SINGLE, autocast_dtype: torch.dtype | None = None,
            on_step: Callable[[int], None] | None = None) -> JobResult:
    """Sample, featurise and score every cell of a job; rows and grids are identical on every rank."""
    n, device = config.num_samples, models.device
    total, g = n * len(job.scales), min(config.grid_size, n)
    spaces = [evaluation, *evaluation.extras.values()]  # the main feature space, then any extra rulers
    feats = [torch.zeros(total, e.extractor.num_features, device=device) for e in spaces]
    logits = [torch.zeros(total, e.logit_width(models.shape, device), device=device) for e in spaces]
    grid = torch.zeros(len(job.scales) * g, *models.shape, device=device)
    # Every image, for samples/<cell>.npz: each item is written by one rank, so summing the zero-padded buffers
    # across ranks is exact (in uint8 too).
    pixels = torch.zeros(total, *models.shape, dtype=torch.uint8, device=device) if config.save_samples else None
    thresholded = torch.zeros(total, device=device)  # steps at which each item's x̂0 was thresholded
    traces: dict[str, Tensor] = {}  # a rule's per-sample values per step (FBG's λ_t): (steps, total) each
    start, feature_seconds = time.perf_counter(), 0.0
    for chunk, images, hits, trace in generate_images(models, config, job,
                                                      torch.arange(dist.rank, total, dist.world), autocast_dtype,
                                                      on_step):
        _sync(device)
        t0 = time.perf_counter()
        index = chunk.to(device)
        # Scored as saved: rounded to 8 bits, as a PNG or an ADM-style .npz holds the samples, so an external
        # evaluator of the saved images (python -m experiments.evaluate) reads the cell's own numbers.
        u8 = to_pixels(images)
        images = from_pixels(u8)
        if pixels is not None:
            pixels[index] = u8
        for e, f_all, lg_all in zip(spaces, feats, logits):
            f, lg = e.extractor.extract(images)
            f_all[index], lg_all[index] = f.to(device), lg.to(device)
        thresholded[index] = hits.to(device)
        for name, values in trace.items():
            traces.setdefault(name, torch.zeros(len(values), total, device=device))[:, index] = values.to(device)
        in_grid = (chunk % n < g).to(device)
        grid[(index // n * g + index % n)[in_grid]] = images[in_grid]
        _sync(device)
        feature_seconds += time.perf_counter() - t0
    for tensor in (*feats, *logits, grid, thresholded, *traces.values(), *([] if pixels is None else [pixels])):
        dist.all_sum(tensor)
    _sync(device)
    sampling_seconds = time.perf_counter() - start - feature_seconds
    t0 = time.perf_counter()
    labels = torch.arange(n) % models.num_classes
    rule = make_rule(job.method, config.guidance)
    rows, draws = [], []
    for j, scale in enumerate(job.scales):
        part = slice(j * n, (j + 1) * n)
        nfe, passes, guides = cell_cost(rule, scale, models.schedule, config.sampling.steps)
        scored = [e.score_with_draws(f[part], lg[part], labels, config.bootstrap)
                  for e, f, lg in zip(spaces, feats, logits)]
        draws.append({"spaces": {e.extractor_id: record for e, (_, record) in zip(spaces, scored)}})
        trace = {name: [round(v, 6) for v in values[:, part].mean(dim=1).tolist()] for name, values in traces.items()}
        rows.append({"method": job.method, "scale": scale, "gamma": rule.gamma(scale), "seed": job.seed,
                     "num_samples": n, "sampler": config.sampling.sampler, "steps": config.sampling.steps,
                     "eta": config.sampling.eta, "nfe_per_sample": nfe, "classifier_grads_per_sample": passes,
                     "guide_evals_per_sample": guides,
                     "unet_equivalents_per_sample": models.unet_equivalents(nfe, passes, guides,
                                                                            *rule.gradient_cost(), job.method),
                     "guidance_trace": json.dumps(trace) if trace else "",
                     "thresholded_fraction": float(thresholded[part].mean()) / config.sampling.steps,
                     **scored[0][0], **models.identity(job.method),
                     "extractor": evaluation.extractor_id, "signature": sig})
    _sync(device)
    metrics_seconds = feature_seconds + time.perf_counter() - t0
    # All scales of a job share each batched pass: its wall time is attributed to the cells in proportion to their
    # own cost (UNet-evaluation equivalents), so a cheap cell is not charged for its expensive neighbours.
    seconds = time.perf_counter() - start
    weights = [max(r["unet_equivalents_per_sample"], 1e-9) for r in rows]
    for row, weight in zip(rows, weights):
        row["seconds"] = seconds * weight / sum(weights)
        row["seconds_per_sample"] = row["seconds"] / n
    grids = [grid[j * g:(j + 1) * g].cpu() for j in range(len(job.scales))]
    samples = None if pixels is None else [pixels[j * n:(j + 1) * n].permute(0, 2, 3, 1).cpu()
                                           for j in range(len(job.scales))]
    return JobResult(rows, grids, sampling_seconds, metrics_seconds, draws, samples)


def run_sweep(config: SweepConfig, models: SweepModels, evaluation: Evaluation, store: SweepStore | None, *,
              dist: Distributed = SINGLE, autocast_dtype: torch.dtype | None = None,
              on_cell: Callable[[dict, Tensor], None] | None = None) -> list[dict]:
    """Run every cell not yet in the store (rank 0's store decides); return all rows of this signature.

    Rank 0 records each cell in the store as its job finishes (then calls `on_cell(row, grid)`), so an
    interrupted sweep keeps what it finished. Other ranks pass `store=None` and get [] back.
    """
    # With the model's schedule: a guidance band that holds none of the sampling steps fails here, before any work.
    config.check(models.schedule.timesteps, models.schedule.kind)
    check_null_label(config, models)
    check_trained_guidance(config, models)
    check_network(config, models)
    sigs = signatures(config, models, evaluation, autocast_dtype is not None)
    jobs = dist.broadcast(plan_jobs(config, store, sigs, share_plain=True) if dist.rank == 0 else None)
    steps = config.sampling.steps
    total = sum(len(range(dist.rank, config.num_samples * len(j.scales), dist.world)) for j in jobs)
    chunks = sum(-(-len(range(dist.rank, config.num_samples * len(j.scales), dist.world)) // config.batch_size)
                 for j in jobs)
    bar = tqdm(total=chunks * steps, desc="sweep", unit="step", disable=not (config.progress and dist.rank == 0),
               dynamic_ncols=True)
    bar.set_postfix_str(f"{len(jobs)} passes, {total} images")
    if config.save_samples and store is not None:
        print(samples_cost(config, models, sum(len(j.scales) for j in jobs), store), flush=True)
    for job in jobs:
        bar.set_description(f"sweep {job.method} seed {job.seed}")
        result = run_job(models, config, evaluation, job, sigs[job.method], dist=dist, autocast_dtype=autocast_dtype,
                         on_step=lambda _: bar.update())
        if store is not None:
            labels = (torch.arange(config.num_samples) % models.num_classes).numpy()
            for j, (row, grid, draws) in enumerate(zip(result.rows, result.grids, result.draws)):
                row["grid"] = store.grid_path(sigs[job.method], row["method"], row["scale"], row["seed"])
                samples = None if result.samples is None else (result.samples[j].numpy(), labels)
                store.append(row, png_bytes(grid, nrow=models.num_classes), draws, samples)
                if on_cell is not None:
                    on_cell(row, grid)
    bar.close()
    if store is not None:
        _record_shared(config, store, sigs, on_cell)
    return selected(store, sigs) if store is not None else []
