"""Test-wide settings: no W&B traffic, deterministic hypothesis runs."""

import os

from hypothesis import settings

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

settings.register_profile("ustc", derandomize=True, print_blob=True)
settings.load_profile("ustc")
