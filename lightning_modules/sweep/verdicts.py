"""Which method wins, and at which scale: paired differences between a sweep's methods, from the draws every
cell persists (`draws/<cell>.json`, see Evaluation.score_with_draws).

Every cell of a sweep starts from the same noise and labels per sample index and is scored on the same random
halves, so the difference of two cells is taken draw by draw (`evaluation.paired`), pooled over seeds, which
cancels the sampling noise the cells share. Per method:
- **best scale, held out**: the scale is chosen on one half of each draw and its metric read on the disjoint
  other half, so a method with a longer grid gains nothing from picking its luckiest cell; the selection
  effect (in-sample best − held-out best) is reported.
- **matched strength**: FID and recall where target-class accuracy first reaches the matched level along γ,
  interpolated per draw as the point estimate is.
Each method is compared with the best method and with CFG, for ΔFID and Δrecall, at both places. The intervals
and verdicts hold jointly at 95% over all the comparisons shown (Bonferroni), and are repeated in every extra
feature space the sweep scored (sweep.extra_extractors): a verdict says whether it holds in each.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lightning_modules.diffusion import RULES
from lightning_modules.diffusion.methods import BAD_VERSION
from lightning_modules.evaluation.paired import (
    BestScale,
    CellDraws,
    Difference,
    bonferroni_z,
    held_out_best,
    held_out_difference,
    matched_draws,
    paired_difference,
    pooled,
    rank_groups,
    samples_to_separate,
    verdict,
)
from lightning_modules.evaluation.registry import LOWER_IS_BETTER

from .tables import MATCHED_ACCURACY, matched_level

COMPARED = ("fid", "recall")  # the metrics every verdict reports
IDENTITY = ("n", "draws", "labels_sha", "halves_sha", "extractor", "reference")  # what makes draws pairable


class PairingError(ValueError):
    """Two cells whose draws are not the same draws (seeds, sample counts, labels, halves or rulers differ)."""


@dataclass
class MethodDraws:
    """One method's cells in one feature space, pooled over seeds: metric → scale → CellDraws."""

    method: str
    scales: list[float]
    gammas: list[float]
    seeds: tuple[int, ...]
    pooled: dict[str, dict[float, CellDraws]]
    identity: dict

    def best(self) -> BestScale:
        return held_out_best(self.pooled["fid"], lower_is_better=True)

    def at_best(self, metric: str, best: BestScale) -> torch.Tensor:
        """The metric on each draw's held-out half at the scale that draw chose by FID."""
        rest = torch.stack([self.pooled[metric][s].rest for s in self.scales])  # (scales, D)
        return rest[best.chosen, torch.arange(rest.shape[1])]

    def matched(self, metric: str, level: float) -> CellDraws:
        return matched_draws(self.gammas, [self.pooled["accuracy"][s] for s in self.scales],
                             [self.pooled[metric][s] for s in self.scales], level)


def method_draws(rows: list[dict], read: Callable[[dict], dict], space: str) -> dict[str, MethodDraws]:
    """Every method's pooled draws in feature space `space` (an extractor id); raises PairingError when a method's
    cells disagree on what their draws are."""
    cells: dict[str, dict[float, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    gamma: dict[tuple[str, float], float] = {}
    for r in rows:
        record = read(r)["spaces"].get(space)
        if record is None:
            raise PairingError(f"cell {r['method']} s={r['scale']:g} seed {r['seed']} was not scored in {space}")
        cells[r["method"]][r["scale"]][r["seed"]] = record
        gamma[(r["method"], r["scale"])] = r["gamma"]
    out = {}
    for method, by_scale in cells.items():
        scales = sorted(by_scale, key=lambda s: (gamma[(method, s)], s))
        seeds = {tuple(sorted(by_seed)) for by_seed in by_scale.values()}
        if len(seeds) != 1:
            raise PairingError(f"{method}: its scales were run on different seeds {sorted(seeds)}")
        identity = _identity(method, [rec for by_seed in by_scale.values() for rec in by_seed.values()])
        order = sorted(next(iter(seeds)))
        metrics = next(iter(next(iter(by_scale.values())).values()))["half"].keys()
        pooled_draws = {m: {s: pooled([_cell(by_scale[s][seed], m) for seed in order]) for s in scales}
                        for m in metrics}
        out[method] = MethodDraws(method, scales, [gamma[(method, s)] for s in scales], tuple(order), pooled_draws,
                                  {**identity, "seeds": tuple(order)})
    return out


def _cell(record: dict, metric: str) -> CellDraws:
    return CellDraws(record["full"][metric], torch.tensor(record["half"][metric], dtype=torch.float64),
                     torch.tensor(record["rest"][metric], dtype=torch.float64))


def _identity(what: str, records: list[dict]) -> dict:
    values = {k: {rec[k] for rec in records} for k in IDENTITY}
    mixed = {k: sorted(map(str, v)) for k, v in values.items() if len(v) > 1}
    if mixed:
        raise PairingError(f"{what}: its cells' draws differ in {mixed}")
    if next(iter(values["draws"])) < 2:
        raise PairingError(f"{what}: fewer than 2 half-sample draws (sweep.bootstrap): nothing to pair")
    return {k: next(iter(v)) for k, v in values.items()}


def check_pairable(a: MethodDraws, b: MethodDraws) -> None:
    """Refuse to compare methods whose draws are not the same draws, naming what differs."""
    bad = {k: (a.identity[k], b.identity[k]) for k in (*IDENTITY, "seeds") if a.identity[k] != b.identity[k]}
    if bad:
        raise PairingError(f"{a.method} and {b.method} cannot be paired: they differ in " +
                           ", ".join(f"{k} ({x} vs {y})" for k, (x, y) in bad.items()))


@dataclass
class Comparison:
    method: str
    reference: str
    at: str  # "best scale" or "matched strength"
    metric: str
    difference: Difference


def comparisons(methods: dict[str, MethodDraws], references: list[str], level: float,
                only: dict[str, set[str]] | None = None) -> list[Comparison]:
    """Every method (or, for a reference in `only`, the methods it names) against each reference method, ΔFID
    and Δrecall at the held-out best scale and at matched strength (NaN where a method never reaches the
    matched level)."""
    best = {m: d.best() for m, d in methods.items()}
    out, pairs = [], set()
    for ref in references:
        for method, d in methods.items():
            if method == ref or frozenset((method, ref)) in pairs:  # each pair once (the best against CFG)
                continue
            if only and ref in only and method not in only[ref]:
                continue
            pairs.add(frozenset((method, ref)))
            check_pairable(d, methods[ref])
            for metric in COMPARED:
                if metric == "fid":
                    diff = held_out_difference(best[method], best[ref])
                else:
                    draws = d.at_best(metric, best[method]) - methods[ref].at_best(metric, best[ref])
                    diff = Difference(float(draws.mean()), float(draws.std()), draws)
                out.append(Comparison(method, ref, "best scale", metric, diff))
            if not math.isnan(level):
                for metric in COMPARED:
                    diff = paired_difference([d.matched(metric, level)], [methods[ref].matched(metric, level)])
                    out.append(Comparison(method, ref, "matched strength", metric, diff))
    return out


def _defined(d: Difference) -> bool:
    # A matched-strength difference is undefined where a draw never reaches the matched level (NaN draws).
    return math.isfinite(d.estimate) and math.isfinite(d.se)


def _word(d: Difference, z: float, lower_is_better: bool) -> str:
    return verdict(d, z, lower_is_better) if _defined(d) else "—"


def verdicts(rows: list[dict], read: Callable[[dict], dict]) -> dict:
    """The verdict tables of one signature's rows (JSON-ready): comparisons, ranking and selection effects in
    the main feature space, each comparison's verdict in every extra space."""
    main = rows[0]["extractor"]
    spaces = [main, *sorted(set(read(rows[0])["spaces"]) - {main})]
    per_space = {s: method_draws(rows, read, s) for s in spaces}
    methods = per_space[main]
    for space in spaces[1:]:
        # A ruler without a classifier head (DINOv2) measures no accuracy of its own: its matched strength is read
        # off the main space's accuracy, which is of the same samples on the same halves.
        for method, d in per_space[space].items():
            if all(math.isnan(c.full) for c in d.pooled["accuracy"].values()):
                d.pooled["accuracy"] = methods[method].pooled["accuracy"]
    best = {m: d.best() for m, d in methods.items()}
    ordered = sorted(methods, key=lambda m: float(best[m].held_out.mean()))
    references = list(dict.fromkeys([ordered[0], *(["cfg"] if "cfg" in methods else [])]))
    # "A bad version of itself" (the rules' `family`): its members also against the trained-guide autoguidance.
    family = {m for m in methods if m in RULES and RULES[m].family == BAD_VERSION}
    only = {}
    if "autoguidance" in family and len(family) > 1 and "autoguidance" not in references:
        references.append("autoguidance")
        only["autoguidance"] = family
    level = matched_level(rows, target=MATCHED_ACCURACY)
    shown = {s: comparisons(per_space[s], references, level, only) for s in spaces}
    z = bonferroni_z(max(1, sum(_defined(c.difference) for c in shown[main])))
    n = methods[ordered[0]].identity["n"]
    table = []
    for i, c in enumerate(shown[main]):
        lower = LOWER_IS_BETTER[c.metric]
        lo, hi = c.difference.interval(z)
        elsewhere = {s: _word(shown[s][i].difference, z, lower) for s in spaces[1:]}
        word = _word(c.difference, z, lower)
        table.append({"method": c.method, "vs": c.reference, "at": c.at, "metric": c.metric,
                      "delta": c.difference.estimate, "lo": lo, "hi": hi, "verdict": word,
                      "samples_to_separate": samples_to_separate(c.difference, n, z) if word == "tie" else None,
                      "spaces": elsewhere, "holds_in_every_space": all(v == word for v in elsewhere.values())})
    groups = rank_groups(ordered, lambda a, b: held_out_difference(best[a], best[b]).decided(z))
    selection = [{"method": m, "held_out_scale": best[m].scale, "held_out_fid": float(best[m].held_out.mean()),
                  "in_sample_fid": float(best[m].in_sample.mean()), "selection_effect": best[m].selection_effect}
                 for m in ordered]
    return {"comparisons": table, "ranking": groups, "selection": selection, "z": z, "joint_level": 0.95,
            "adjustment": "Bonferroni", "comparisons_shown": sum(c["verdict"] != "—" for c in table), "spaces": spaces,
            "samples_per_cell": n, "seeds": list(methods[ordered[0]].seeds), "matched_accuracy": level}


def _interval(value: float, lo: float, hi: float) -> str:
    return "—" if math.isnan(value) else f"{value:+.3g} [{lo:+.3g}, {hi:+.3g}]"


def _short(space: str) -> str:
    return "-".join(space.split("-")[:3])  # evaluator-mlp-s1-<data>-<hash>… → evaluator-mlp-s1


def verdict_table(v: dict) -> list[dict]:
    """One line per (method, reference, place): ΔFID and Δrecall with their joint intervals and verdicts, the
    samples per cell a tie would need, and the verdicts in the other feature spaces."""
    lines: dict[tuple, dict] = {}
    for c in v["comparisons"]:
        line = lines.setdefault((c["method"], c["vs"], c["at"]), {"method": c["method"], "vs": c["vs"],
                                                                  "at": c["at"]})
        line[f"Δ{c['metric']} [lo, hi]"] = _interval(c["delta"], c["lo"], c["hi"]) if c["verdict"] != "—" else (
            "—" if math.isnan(c["delta"]) else f"{c['delta']:+.3g} [level not reached on every draw]")
        line[c["metric"]] = c["verdict"]
        if c["metric"] == "fid":
            line["n to separate"] = "—" if c["samples_to_separate"] is None else str(c["samples_to_separate"])
        for space, word in c["spaces"].items():
            line[f"{c['metric']} in {_short(space)}"] = word
    order = ["method", "vs", "at", "Δfid [lo, hi]", "fid", "Δrecall [lo, hi]", "recall", "n to separate"]
    return [{k: line[k] for k in [*order, *sorted(set(line) - set(order))] if k in line}
            for line in lines.values()]


def verdict_summary(v: dict) -> list[str]:
    """The ranking, the selection effects and what the intervals mean, as text lines."""
    groups = " > ".join("{" + ", ".join(g) + "}" if len(g) > 1 else g[0] for g in v["ranking"])
    effects = ", ".join(f"{s['method']} {s['selection_effect']:+.3g} (scale {s['held_out_scale']:g})"
                        for s in v["selection"])
    return [f"ranking by held-out best FID (methods in braces are not separated): {groups}",
            f"selection effect (in-sample best FID − held-out best FID, each on half the samples): {effects}",
            f"intervals and verdicts hold jointly at {v['joint_level']:.0%} over the {v['comparisons_shown']} "
            f"comparisons shown ({v['adjustment']}, z = {v['z']:.2f}); paired over {len(v['seeds'])} seed(s) × "
            f"{v['samples_per_cell']} samples; 'n to separate' = samples per cell and seed (same seeds) at which "
            "the observed Δfid would be decided, assuming the interval shrinks as 1/√n"]


def verdict_text(v: dict) -> str:
    """The console block: the verdict table, then the ranking, selection effects and what the intervals mean."""
    from .tables import format_table

    table = verdict_table(v)
    columns = list(dict.fromkeys(k for line in table for k in line))
    return "\n".join([format_table(table, columns), *verdict_summary(v)])
