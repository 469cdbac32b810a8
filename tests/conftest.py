"""Test-wide settings: W&B never needs an account or the network, results go to tmp dirs."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
