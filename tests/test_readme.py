"""The README's commands parse as written: every `python -m experiments.train|sweep` line of its bash blocks
resolves to a full configuration (`--print_config`, so nothing trains), placeholders filled in; its
`python -m experiments.evaluate` lines run for real on the embedded digits (seconds). The main command itself
runs end to end in tests/test_compare.py (shortened)."""

import os
import re
import subprocess
import sys

import pytest

from .helpers import ROOT

pytestmark = pytest.mark.slow


def readme_commands(prefixes: tuple[str, ...] = ("python -m experiments.train", "python -m experiments.sweep")
                    ) -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith(prefixes):
                commands.append(line)
    return commands


def test_readme_evaluate_commands_run_on_digits(tmp_path):
    """In order (each may read what the one before wrote), in a scratch directory, as a user types them."""
    import shlex

    commands = readme_commands(("python -m experiments.evaluate",))
    assert commands and not any("<" in c for c in commands)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    for command in commands:
        result = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
        assert "fid " in result.stdout


def test_the_readme_lists_both_clis():
    commands = readme_commands()
    assert any("experiments.sweep" in c for c in commands) and sum("experiments.train" in c for c in commands) >= 5


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_resolves_its_configuration(command, tmp_path):
    filled = re.sub(r"<[^>]+>", "placeholder", command)
    argv = filled.split()[2:]  # after `python -m`
    import shlex

    argv = shlex.split(" ".join(argv))
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", *argv, "--print_config"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
    assert "sweep:" in result.stdout
