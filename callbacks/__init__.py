"""Lightning callbacks: run directory and config saving, resumable checkpoints, the guidance sweep."""

from .checkpointing import ExactResume, LastCheckpoint
from .config_saver import RunConfigSaver
from .guidance_sweep import GuidanceSweep
from .run_dir import run_dir

__all__ = ["ExactResume", "GuidanceSweep", "LastCheckpoint", "RunConfigSaver", "run_dir"]
