"""What a sweep will do before it does it: cell signatures, the jobs left, shared plain cells, and the checks
that need the model (a method that would evaluate an untrained null label, or a branch its network cannot give).

A cell's signature holds everything that makes two cells comparable, per method (only what its rule reads), so a
rerun reuses every cell whose signature it finds in the store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from lightning_modules.diffusion import (
    METHODS,
    GuidanceRule,
    NoiseSchedule,
    OptionError,
    StepMode,
    make_rule,
    respaced_timesteps,
)
from lightning_modules.diffusion.denoiser import CLEAN
from lightning_modules.diffusion.guidance import guidance_weight

from .config import DEFAULT_SCALES, SweepConfig
from .evaluation import Evaluation
from .models import SweepModels
from .store import SweepStore

# The main network's label branches (one batched forward), as messages name them.
LABEL_BRANCHES = dict(zip(CLEAN, ("conditional", "null-label (unconditional)", "random-class")))
# How a diffusion model was trained, in every signature (its weights' hash already pins it; this keeps it readable).
TRAINING_KEYS = ("guidance_training", "mg_scale", "mg_high", "gft_beta_range", "p_uncond")
ENGINE_VERSION = 7  # part of every cell's signature: bump when the engine's numbers change (7: scored on 8-bit samples)


@dataclass(frozen=True)
class Job:
    """All remaining scales of one method for one seed: one batched pass."""

    method: str
    scales: tuple[float, ...]
    seed: int


def signature(config: SweepConfig, models: SweepModels, evaluation: Evaluation, bf16: bool, method: str) -> str:
    """Everything that makes two cells of `method` comparable; a cell with the same signature is not redone.

    The networks the method uses enter by content hash (not path or step: the classifier only for a method that
    takes its gradients, the guide only for autoguidance), with the extractor's weights, the reference data's
    fingerprint, every sampling setting, and only the guidance options its own rule reads (`rule.signature()`:
    changing APG's momentum does not resample a CFG cell). Settings that cannot change a sample or a metric
    (batch size, compile mode, grid size, progress) are left out.
    """
    rule = make_rule(method, config.guidance)
    sampling = {k: v for k, v in asdict(config.sampling).items() if k != "compile"}
    noisy = rule.uses_gradient and rule.gradient_at == "x_t"
    network = models.network_for(method)  # its own trained-in model (mg, gft), else the sweep's
    training = {k: network.hparams.get(k) for k in TRAINING_KEYS}
    spec = {"engine": ENGINE_VERSION, "diffusion": network.sha, "prediction": network.hparams.get("prediction", "eps"),
            "training": training,
            "classifier": models.classifier.sha if models.classifier and noisy else None,
            "guide": models.guide.sha if models.guide and rule.uses_guide else None,
            "clean": models.clean_classifier.sha if models.clean_classifier and rule.gradient_at == "x0" else None,
            "extractor": evaluation.extractor_id,
            "extras": sorted(e.extractor_id for e in evaluation.extras.values()) or None,
            "reference": evaluation.reference_id, "num_samples": config.num_samples, "bootstrap": config.bootstrap,
            "sampling": sampling, "rule": rule.signature(), "bf16": bf16}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def signatures(config: SweepConfig, models: SweepModels, evaluation: Evaluation, bf16: bool) -> dict[str, str]:
    """The signature of every swept method's cells."""
    return {m: signature(config, models, evaluation, bf16, m) for m in config.methods}


def _step_modes(rule: GuidanceRule, grid: list[float], schedule: NoiseSchedule, steps: int
                ) -> Iterator[tuple[float, StepMode]]:
    """(scale, what the step evaluates) of every scale of `grid` at every sampling step, as the sampler will ask."""
    ts = respaced_timesteps(schedule.timesteps, steps)
    rule.prepare(schedule, list(zip(ts, ts[1:] + [-1])))
    for s in grid:
        for t in ts:
            yield s, rule.step_mode(t, [s], guidance_weight(t, schedule, rule.options))


def check_null_label(config: SweepConfig, models: SweepModels) -> None:
    """OptionError if a method would evaluate the null label of a model trained without label dropout (its null
    embedding was never trained, so the "unconditional" branch is noise)."""
    for method, grid in config.grids.items():
        if models.network_for(method).hparams.get("p_uncond", 0.1) > 0:
            continue
        modes = _step_modes(make_rule(method, config.guidance), grid, models.schedule, config.sampling.steps)
        if any("uncond" in mode.branches for _, mode in modes):
            raise OptionError("sweep.methods", f"{method} evaluates the null label, but the diffusion model was "
                              "trained without label dropout (p_uncond = 0), so its null-label branch is untrained",
                              "sweep methods that need no null label on it (icg, cg_cond, autoguidance, pag, seg, "
                              "tsg, autoguidance_degraded), or train with --model.init_args.p_uncond 0.1")


def network_problem(rule: GuidanceRule, grid: list[float], schedule: NoiseSchedule, steps: int, hparams: dict
                    ) -> str | None:
    """Why the diffusion network these hyperparameters describe cannot run `rule` at these scales, or None.

    Read off the branches its steps evaluate: for an unconditional model (`conditional: False`, it ignores labels)
    any step that combines two of the label branches (conditional, null label, random class) combines one output
    with itself, so the method would not guide; a network without this framework's UNet modules
    (`perturbable: False`) cannot run a perturbed pass (its hooks look for them)."""
    for s, mode in _step_modes(rule, grid, schedule, steps):
        labelled = [LABEL_BRANCHES[b] for b in mode.branches if b in LABEL_BRANCHES]
        if not hparams.get("conditional", True) and len(labelled) > 1:
            return (f"at scale {s:g} it combines the {' and '.join(labelled)} predictions, but the diffusion model is "
                    "unconditional: they are one and the same output, so it would not guide")
        if "perturbed" in mode.branches and not hparams.get("perturbable", True):
            return (f"at scale {s:g} it runs the network under a perturbation whose hooks need this framework's UNet "
                    f"modules (time_embed, self-attention, ResBlocks), which a {hparams.get('network')} network has "
                    "not")
    return None


def check_trained_guidance(config: SweepConfig, models: SweepModels) -> None:
    """OptionError, before any sampling, for a trained-in method (`mg`, `gft`) whose network was not trained with
    its objective (it would sample the plain conditional model under their names), an MG grid other than the w its
    model was trained with (the scale is not a knob there), or a GFT scale beyond its trained β range (s = 1/β)."""
    for method, grid in config.grids.items():
        objective = make_rule(method, config.guidance).trained_with
        if objective is None:
            continue
        own = method in (config.trained_ckpts or {})
        option = f"sweep.trained_ckpts.{method}" if own else "sweep.methods"
        hp = models.network_for(method).hparams
        trained, whose = hp.get("guidance_training", "none"), "its" if own else "the sweep's"
        if trained != objective:
            raise OptionError(option, f"{method} samples a model trained with guidance_training {objective}, but "
                              f"{whose} diffusion model was trained with {trained}",
                              f"train one with --model.init_args.guidance_training {objective} (or fine-tune: "
                              f"--model.init_args.init_from CKPT) and pass it as --sweep.trained_ckpts.{method}, or "
                              "drop it from sweep.methods")
        if objective == "mg" and grid != [float(hp["mg_scale"])]:
            raise OptionError(f"sweep.scales.{method}", f"{grid} is not the w = {hp['mg_scale']:g} the MG model was "
                              "trained with (its guidance is fixed at training: every scale samples the same model)",
                              f"set --sweep.scales.{method} [{hp['mg_scale']:g}]")
        low = float(hp.get("gft_beta_range", (0.0, 1.0))[0])
        if objective == "gft" and low > 0 and max(grid) > 1 / low:
            raise OptionError(f"sweep.scales.{method}", f"{grid} goes past s = 1/β_min = {1 / low:g}: the GFT model "
                              f"was trained on β in [{low:g}, 1] (gft_beta_range), never at a smaller β",
                              f"keep the scales within [1, {1 / low:g}], or train with a lower gft_beta_range start")


def check_network(config: SweepConfig, models: SweepModels) -> None:
    """OptionError naming the first swept method the diffusion network cannot run (`network_problem`), with the
    methods it can run at their default scales."""
    steps = config.sampling.steps
    for method, grid in config.grids.items():
        hp = models.network_for(method).hparams
        problem = network_problem(make_rule(method, config.guidance), grid, models.schedule, steps, hp)
        if problem is None:
            continue
        runnable = [m for m in METHODS if network_problem(make_rule(m, config.guidance), list(DEFAULT_SCALES[m]),
                                                          models.schedule, steps, hp) is None]
        classic = "; cg_cond on an unconditional model is Dhariwal & Nichol's classifier guidance" \
            if not hp.get("conditional", True) else ""
        raise OptionError("sweep.methods", f"{method}: {problem}", f"sweep methods this model can run: {runnable}"
                          f"{classic}")


def shared_cells(config: SweepConfig) -> dict[tuple[str, float, int], tuple[str, float]]:
    """(method, scale, seed) → the earlier cell it equals: every plain conditional (or unconditional) cell of a
    seed draws the same samples on paired noise (cfg s = 1, cg_cond s = 0, autoguidance w = 1, ...), so only
    the first in grid order is sampled; the others are recorded as copies of it (`same_as`). A method sampling its
    own trained-in model (`trained_ckpts`) shares only among its own cells."""
    first: dict[tuple[str, str, int], tuple[str, float]] = {}
    shared = {}
    for seed in config.seeds:
        for method, grid in config.grids.items():
            rule = make_rule(method, config.guidance)
            network = method if method in (config.trained_ckpts or {}) else ""  # its own model: shares only with itself
            for scale in grid:
                kind = rule.plain(scale)
                if kind is None:
                    continue
                source = first.setdefault((kind, network, seed), (method, scale))
                if source != (method, scale):
                    shared[(method, scale, seed)] = source
    return shared


def plan_jobs(config: SweepConfig, store: SweepStore | None, sigs: dict[str, str],
              share_plain: bool = False) -> list[Job]:
    """Every (seed, method) with the scales not yet done in the store (without the shared cells)."""
    skip = shared_cells(config) if share_plain else {}
    jobs = []
    for seed in config.seeds:
        for method, grid in config.grids.items():
            todo = tuple(s for s in grid if (method, s, seed) not in skip
                         and (store is None or not store.done(sigs[method], method, s, seed, config.save_samples)))
            if todo:
                jobs.append(Job(method, todo, seed))
    return jobs


def selected(store: SweepStore, sigs: dict[str, str]) -> list[dict]:
    """Every row of the sweep: each method's cells of its own signature."""
    return [r for method, sig in sigs.items() for r in store.select(sig) if r["method"] == method]
