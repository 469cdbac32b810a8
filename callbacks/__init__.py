"""Lightning callbacks: run directory and config saving, the guidance sweep."""

from .config_saver import RunConfigSaver
from .guidance_sweep import GuidanceSweep
from .run_dir import run_dir

__all__ = ["GuidanceSweep", "RunConfigSaver", "run_dir"]
