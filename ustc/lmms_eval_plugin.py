"""The lmms-eval plugin under its first module name; it now lives in :mod:`ustc.lmms_eval`.

Kept so that code importing ``ustc.lmms_eval_plugin`` and entry points installed from an older
``pyproject.toml`` (``ustc.lmms_eval_plugin:manifest``) keep working.
"""

from __future__ import annotations

from ustc.lmms_eval import (
    BACKBONES,
    LlavaOneVisionUSTC,
    Qwen2_5_VLUSTC,
    config_from_model_args,
    config_to_model_args,
    manifests,
)
from ustc.lmms_eval.llava_onevision import LlavaOnevisionManualProcessor

#: the entry point of older installs: every backbone
manifest = manifests

__all__ = [
    "BACKBONES",
    "LlavaOneVisionUSTC",
    "LlavaOnevisionManualProcessor",
    "Qwen2_5_VLUSTC",
    "config_from_model_args",
    "config_to_model_args",
    "manifest",
]
