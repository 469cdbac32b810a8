"""Lightning callbacks: run directory and config saving, the guidance sweep."""

from .config_saver import RunConfigSaver
from .run_dir import run_dir

__all__ = ["RunConfigSaver", "run_dir"]
