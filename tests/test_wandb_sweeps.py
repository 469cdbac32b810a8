"""The W&B sweep YAMLs produce command lines that the real LightningCLI accepts, with the swept values.

No W&B server: the command is built the way `wandb agent` builds it (its own `${args}` expansion when
importable), then (1) parsed in-process by the project's CLI parser without instantiating anything, and
(2) run as a process exactly as the agent would, with `--print_config` appended so nothing trains.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import experiments.train as train_cli

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = {"train": ROOT / "experiments/wandb_sweep_train.yaml", "eval": ROOT / "experiments/wandb_sweep_eval.yaml"}


def first_value(spec: dict):
    """One value a sweep controller could pick: first of `values`, the minimum of a range."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][0]
    low = spec["min"]
    # `log_uniform` (unlike `log_uniform_values`) takes its bounds as natural-log exponents
    return math.exp(low) if spec.get("distribution") == "log_uniform" else low


def render_args(params: dict) -> list[str]:
    """`${args}` as the agent renders it: `--name=str(value)` (lists become `[0, 600]`)."""
    command = {"args": {name: {"value": value} for name, value in params.items()}}
    try:
        from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    except ImportError:  # internal module moved: fall back to the documented `--key=value` form
        return [f"--{k}={v['value']}" for k, v in command["args"].items()]
    return create_sweep_command_args(command)["args"]


def agent_command(sweep: dict, params: dict) -> list[str]:
    """The argv `wandb agent` would execute (interpreter = this Python, so the same environment)."""
    macros = {"${env}": [], "${interpreter}": [sys.executable], "${program}": [sweep["program"]],
              "${args}": render_args(params)}
    argv: list[str] = []
    for part in sweep["command"]:
        argv += macros.get(part, [str(part)])
    return argv


def cli_args(argv: list[str]) -> list[str]:
    """What follows the module (`-m experiments.train`) or script: the LightningCLI's own arguments."""
    if "-m" in argv:
        i = argv.index("-m")
        assert argv[i + 1] == "experiments.train"
        return argv[i + 2:]
    return argv[next(i for i, a in enumerate(argv) if a.endswith("train.py")) + 1:]


class ParseOnlyCLI(train_cli.GuideCLI):
    """The project's CLI (same parser, links and config files) that stops after parsing: no model, data,
    trainer or checkpoint is built or read."""

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parse(args: list[str], monkeypatch: pytest.MonkeyPatch):
    """`experiments.train.main(args)` as the process would call it, with the parse-only CLI swapped in."""
    monkeypatch.setattr(train_cli, "GuideCLI", ParseOnlyCLI)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # pytest's own argv would only trigger a warning
    return train_cli.main(args=args).config


@pytest.fixture(scope="module")
def sweeps() -> dict[str, dict]:
    return {name: yaml.safe_load(path.read_text()) for name, path in SWEEPS.items()}


def sampled(sweep: dict) -> dict:
    return {name: first_value(spec) for name, spec in sweep["parameters"].items()}


def test_yaml_shape(sweeps):
    for name, sweep in sweeps.items():
        assert sweep["method"] in ("grid", "random", "bayes"), name
        assert sweep["metric"]["goal"] in ("minimize", "maximize"), name
        assert "${args}" in sweep["command"] and sweep["command"][:2] == ["${env}", "${interpreter}"], name
        assert (ROOT / sweep["program"]).is_file(), name
        for config in [a for i, a in enumerate(sweep["command"]) if sweep["command"][i - 1] == "--config"]:
            assert (ROOT / config).is_file(), config
    assert sweeps["train"]["metric"]["name"] == "val/loss"
    assert set(sweeps["train"]["parameters"]) == {"model.init_args.p_uncond", "model.init_args.lr"}
    expected = {"sweep.sampling.steps", "sweep.sampling.sampler", "sweep.guidance.interval"}
    assert expected <= set(sweeps["eval"]["parameters"])


def test_train_sweep_parses(sweeps, monkeypatch):
    sweep = sweeps["train"]
    values = sampled(sweep)
    argv = agent_command(sweep, values)
    assert "--model.init_args.p_uncond=0.05" in argv
    cfg = parse(cli_args(argv), monkeypatch)
    assert cfg.subcommand == "fit"
    model = cfg.fit.model.init_args
    assert model.p_uncond == 0.05 and isinstance(model.p_uncond, float)
    assert model.lr == pytest.approx(values["model.init_args.lr"]) and isinstance(model.lr, float)
    # Bayes proposals below 1e-4 render in exponent form (str(1e-05) == '1e-05'): still a float.
    small = parse(cli_args(agent_command(sweep, {**values, "model.init_args.lr": 1e-05})), monkeypatch)
    assert small.fit.model.init_args.lr == pytest.approx(1e-05)


def test_eval_sweep_parses(sweeps, monkeypatch):
    sweep = sweeps["eval"]
    for interval in sweep["parameters"]["sweep.guidance.interval"]["values"]:
        values = {**sampled(sweep), "sweep.guidance.interval": interval, "sweep.sampling.sampler": "ddpm"}
        argv = agent_command(sweep, values)
        assert f"--sweep.guidance.interval=[{interval[0]}, {interval[1]}]" in argv  # W&B's rendering of a list
        # ckpt_path is a placeholder that does not exist: parsing must not need it (nothing is loaded).
        cfg = parse(cli_args(argv), monkeypatch)
        assert cfg.subcommand == "validate"
        sub = cfg.validate
        assert tuple(sub.sweep.guidance.interval) == tuple(interval)
        assert sub.sweep.sampling.steps == values["sweep.sampling.steps"] and sub.sweep.sampling.sampler == "ddpm"
        assert sub.sweep.methods == ["cfg", "cg_cond", "cg_uncond", "autoguidance", "cg_clean"]  # the recipe
        assert sub.ckpt_path.endswith("last.ckpt") and sub.sweep.classifier_ckpt.endswith("last.ckpt")
        assert sub.trainer.limit_val_batches == 1


@pytest.mark.slow  # two fresh Python processes importing Lightning: ~7 s each on an idle 2-core machine
def test_agent_command_runs_as_a_process(sweeps):
    """The exact argv (+ --print_config, so nothing is built) from the repository root, both sweeps at once."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    procs = {name: subprocess.Popen(agent_command(sweep, sampled(sweep)) + ["--print_config"], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, sweep in sweeps.items()}
    printed = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name}: {err[-2000:]}"
        printed[name] = yaml.safe_load(out)
    assert printed["train"]["model"]["init_args"]["p_uncond"] == 0.05
    assert printed["eval"]["sweep"]["guidance"]["interval"] == [0, 999]
    assert printed["eval"]["sweep"]["sampling"] == {"sampler": "ddim", "steps": 10, "eta": 0.0, "clip_x0": True,
                                                     "threshold": None, "compile": None}
