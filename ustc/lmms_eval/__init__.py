"""lmms-eval models: each supported backbone with ustc's compression, one shared implementation.

==========================  ==============================================  =====================
``--model``                 transformers class                              declared in
==========================  ==============================================  =====================
``llava_onevision_ustc``    ``LlavaOnevisionForConditionalGeneration``      ``llava_onevision.py``
                            (LLaVA-OneVision, LLaVA-Video)
``qwen2_5_vl_ustc``         ``Qwen2_5_VLForConditionalGeneration``          ``qwen2_5_vl.py``
``qwen2_vl_ustc``           ``Qwen2VLForConditionalGeneration``             ``more_backbones.py``
``qwen3_vl_ustc``           ``Qwen3VLForConditionalGeneration``             ``more_backbones.py``
``qwen3_vl_moe_ustc``       ``Qwen3VLMoeForConditionalGeneration``          ``more_backbones.py``
``qwen3_5_ustc``            ``Qwen3_5ForConditionalGeneration``             ``more_backbones.py``
``qwen3_5_moe_ustc``        ``Qwen3_5MoeForConditionalGeneration``          ``more_backbones.py``
``llava_next_video_ustc``   ``LlavaNextVideoForConditionalGeneration``      ``more_backbones.py``
``internvl_ustc``           ``InternVLForConditionalGeneration``            ``more_backbones.py``
``glm4v_ustc``              ``Glm4vForConditionalGeneration``               ``more_backbones.py``
``glm4v_moe_ustc``          ``Glm4vMoeForConditionalGeneration``            ``more_backbones.py``
``video_llama_3_ustc``      ``VideoLlama3ForConditionalGeneration``         ``more_backbones.py``
==========================  ==============================================  =====================

Registered through lmms-eval's plugin mechanism, the entry point group ``lmms_eval.models``
(``pyproject.toml``: ``ustc = "ustc.lmms_eval:manifests"``), so the released lmms-eval finds
every backbone once ustc is installed, with no fork and no environment variable:

    lmms-eval --model llava_onevision_ustc \\
        --model_args pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf,retention=0.02 \\
        --tasks mvbench --batch_size 4

A new backbone is one module with one decorated class (``@register``) that declares its name,
model class, default checkpoint and manual input layout, plus its import below; the shared
machinery (:mod:`ustc.lmms_eval.base`) does the rest.  See docs/lmms-eval.md.
"""

from __future__ import annotations

from typing import Any

from ustc.lmms_eval.base import (
    BACKBONES,
    USTCModel,
    config_from_model_args,
    config_to_model_args,
    default_device,
    left_pad,
    register,
)
from ustc.lmms_eval.llava_onevision import LlavaOneVisionUSTC
from ustc.lmms_eval.more_backbones import (
    Glm4vMoeUSTC,
    Glm4vUSTC,
    InternVLUSTC,
    LlavaNextVideoUSTC,
    Qwen2VLUSTC,
    Qwen3_5MoeUSTC,
    Qwen3_5USTC,
    Qwen3VLMoeUSTC,
    Qwen3VLUSTC,
    VideoLlama3USTC,
)
from ustc.lmms_eval.qwen2_5_vl import Qwen2_5_VLUSTC


def manifests() -> list[Any]:
    """Entry point payload: lmms-eval registers one ``ModelManifest`` per backbone."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=name,
            simple_class_path=f"{cls.__module__}.{cls.__name__}",
            aliases=cls.aliases,
        )
        for name, cls in BACKBONES.items()
    ]


__all__ = [
    "BACKBONES",
    "Glm4vMoeUSTC",
    "Glm4vUSTC",
    "InternVLUSTC",
    "LlavaNextVideoUSTC",
    "LlavaOneVisionUSTC",
    "Qwen2VLUSTC",
    "Qwen3VLMoeUSTC",
    "Qwen3VLUSTC",
    "Qwen3_5MoeUSTC",
    "Qwen3_5USTC",
    "Qwen2_5_VLUSTC",
    "USTCModel",
    "VideoLlama3USTC",
    "config_from_model_args",
    "config_to_model_args",
    "default_device",
    "left_pad",
    "manifests",
    "register",
]
