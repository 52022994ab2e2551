"""Model adapters: attach the compressor to a Hugging Face Video-LLM instance.

    handle = ustc.attach(model, ustc.CompressionConfig(retention=0.02, merger="text-aware"))
    out = model.generate(**inputs, max_new_tokens=64)   # compressed
    handle.stats                                        # tokens in, tokens after layer K, time
    handle.remove()                                     # the model is exactly as before

One adapter per backbone family, chosen from the model's class:

=====================================================  ==========================================
model class                                            adapter
=====================================================  ==========================================
``LlavaOnevisionForConditionalGeneration``             ``LlavaOnevisionHandle`` (LLaVA-OneVision,
                                                       LLaVA-Video)
``Qwen2_5_VLForConditionalGeneration``                 ``Qwen2_5_VLHandle``
``Qwen3VLForConditionalGeneration``,                   ``Qwen3VLHandle`` (DeepStack levels follow
``Qwen3VLMoeForConditionalGeneration``                 the compression and the merge)
``Qwen3_5ForConditionalGeneration``,                   ``Qwen3_5Handle`` (hybrid LLM: K must be
``Qwen3_5MoeForConditionalGeneration``                 a full-attention layer)
``Qwen2VLForConditionalGeneration``                    ``Qwen2VLHandle``
``LlavaNextVideoForConditionalGeneration``             ``LlavaNextVideoHandle``
``InternVLForConditionalGeneration``                   ``InternVLHandle``
``Glm4vForConditionalGeneration``,                     ``Glm4vHandle`` (GLM-4.1V, GLM-4.5V: one
``Glm4vMoeForConditionalGeneration``                   run per frame pair, timestamps between)
``VideoLlama3ForConditionalGeneration``                ``VideoLlama3Handle`` (the processor's own
                                                       frame pruning must be off)
=====================================================  ==========================================
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ustc.config import CompressionConfig
from ustc.models.base import CompressionStats, Handle, LastRun
from ustc.models.glm4v import Glm4vHandle
from ustc.models.internvl import InternVLHandle
from ustc.models.llava_next_video import LlavaNextVideoHandle
from ustc.models.llava_onevision import LlavaOnevisionHandle
from ustc.models.qwen2_5_vl import Qwen2_5_VLHandle
from ustc.models.qwen2_vl import Qwen2VLHandle
from ustc.models.qwen3_vl import Qwen3_5Handle, Qwen3VLHandle
from ustc.models.video_llama_3 import VideoLlama3Handle

#: model class name -> adapter; subclasses of these classes are accepted too
ADAPTERS: dict[str, type[Handle]] = {
    "LlavaOnevisionForConditionalGeneration": LlavaOnevisionHandle,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLHandle,
    "Qwen3VLForConditionalGeneration": Qwen3VLHandle,
    "Qwen3VLMoeForConditionalGeneration": Qwen3VLHandle,
    "Qwen3_5ForConditionalGeneration": Qwen3_5Handle,
    "Qwen3_5MoeForConditionalGeneration": Qwen3_5Handle,
    "Qwen2VLForConditionalGeneration": Qwen2VLHandle,
    "LlavaNextVideoForConditionalGeneration": LlavaNextVideoHandle,
    "InternVLForConditionalGeneration": InternVLHandle,
    "Glm4vForConditionalGeneration": Glm4vHandle,
    "Glm4vMoeForConditionalGeneration": Glm4vHandle,
    "VideoLlama3ForConditionalGeneration": VideoLlama3Handle,
}

__all__ = [
    "ADAPTERS",
    "CompressionStats",
    "Glm4vHandle",
    "Handle",
    "InternVLHandle",
    "LastRun",
    "LlavaNextVideoHandle",
    "LlavaOnevisionHandle",
    "Qwen2_5_VLHandle",
    "Qwen3VLHandle",
    "Qwen3_5Handle",
    "Qwen2VLHandle",
    "VideoLlama3Handle",
    "adapter_for",
    "attach",
]


def adapter_for(model: nn.Module) -> type[Handle]:
    """The adapter class for ``model``'s class (or the nearest supported base class)."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__]
    raise ValueError(
        f"no ustc adapter for {type(model).__name__}; supported model classes: "
        f"{', '.join(sorted(ADAPTERS))} (load the model with that class, not the bare "
        "backbone or a text-only class)"
    )


def attach(model: nn.Module, config: CompressionConfig | None = None, **options: Any) -> Handle:
    """Attach token compression to a model instance; returns the ``Handle`` (stats, remove()).

    Raises ``ValueError`` if the model class is unsupported, if a compressor is already attached,
    or if the config does not fit the model (e.g. K beyond the last decoder layer).  ``options``
    go to the adapter (e.g. ``vision_layer=`` for LLaVA-OneVision).
    """
    return adapter_for(model)(
        model, config if config is not None else CompressionConfig(), **options
    )
