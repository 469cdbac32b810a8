"""Lightning callbacks: run directory and config saving, resumable checkpoints and their W&B artifacts, the guidance
sweep, training sample grids."""

from .artifacts import CheckpointArtifacts
from .checkpoint_io import SafeCheckpointIO
from .checkpointing import ExactResume, GuideSnapshots, LastCheckpoint
from .config_saver import RunConfigSaver
from .guidance_sweep import GuidanceSweep
from .run_dir import run_dir
from .sample_grids import SampleGrids

__all__ = ["CheckpointArtifacts", "ExactResume", "GuideSnapshots", "GuidanceSweep", "LastCheckpoint", "RunConfigSaver",
           "SafeCheckpointIO", "SampleGrids", "run_dir"]
