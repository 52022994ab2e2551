"""lmms-eval models of the backbones whose inputs come from their checkpoint's own processor.

==========================  ==============================================
``--model``                 transformers class
==========================  ==============================================
``qwen2_vl_ustc``           ``Qwen2VLForConditionalGeneration``
``qwen3_vl_ustc``           ``Qwen3VLForConditionalGeneration``
``qwen3_vl_moe_ustc``       ``Qwen3VLMoeForConditionalGeneration``
``qwen3_5_ustc``            ``Qwen3_5ForConditionalGeneration``
``qwen3_5_moe_ustc``        ``Qwen3_5MoeForConditionalGeneration``
``llava_next_video_ustc``   ``LlavaNextVideoForConditionalGeneration``
``internvl_ustc``           ``InternVLForConditionalGeneration``
``glm4v_ustc``              ``Glm4vForConditionalGeneration``
``glm4v_moe_ustc``          ``Glm4vMoeForConditionalGeneration``
``video_llama_3_ustc``      ``VideoLlama3ForConditionalGeneration``
==========================  ==============================================

Each is a declaration: the shared machinery of :mod:`ustc.lmms_eval.base` loads the model,
attaches the compressor and batches the requests.  Qwen2-VL's video processor is Qwen2.5-VL's, so
it also has the manual layout for machines without torchvision; the others need their
``AutoProcessor`` (torchvision installed) and say so when it cannot be built.
"""

from __future__ import annotations

from typing import Any

from ustc.lmms_eval.base import USTCModel, register
from ustc.lmms_eval.qwen2_5_vl import Qwen2_5_VLUSTC


@register
class Qwen2VLUSTC(Qwen2_5_VLUSTC):
    """Qwen2-VL whose video tokens are compressed by ustc (Qwen2.5-VL's inputs)."""

    name = "qwen2_vl_ustc"
    model_class = "Qwen2VLForConditionalGeneration"
    default_checkpoint = "Qwen/Qwen2-VL-7B-Instruct"


@register
class Qwen3VLUSTC(USTCModel):
    """Qwen3-VL (and Qwen3-VL-MoE checkpoints) whose video tokens are compressed by ustc."""

    name = "qwen3_vl_ustc"
    model_class = "Qwen3VLForConditionalGeneration"
    default_checkpoint = "Qwen/Qwen3-VL-8B-Instruct"


@register
class Qwen3VLMoeUSTC(Qwen3VLUSTC):
    """Qwen3-VL-MoE whose video tokens are compressed by ustc."""

    name = "qwen3_vl_moe_ustc"
    model_class = "Qwen3VLMoeForConditionalGeneration"
    default_checkpoint = "Qwen/Qwen3-VL-30B-A3B-Instruct"


@register
class Qwen3_5USTC(USTCModel):
    """Qwen3.5 whose video tokens are compressed by ustc (K at a full-attention layer)."""

    name = "qwen3_5_ustc"
    model_class = "Qwen3_5ForConditionalGeneration"
    default_checkpoint = "Qwen/Qwen3.5-9B"


@register
class Qwen3_5MoeUSTC(Qwen3_5USTC):
    """Qwen3.5-MoE whose video tokens are compressed by ustc."""

    name = "qwen3_5_moe_ustc"
    model_class = "Qwen3_5MoeForConditionalGeneration"
    default_checkpoint = "Qwen/Qwen3.5-35B-A3B"


@register
class LlavaNextVideoUSTC(USTCModel):
    """LLaVA-NeXT-Video whose video tokens are compressed by ustc."""

    name = "llava_next_video_ustc"
    model_class = "LlavaNextVideoForConditionalGeneration"
    default_checkpoint = "llava-hf/LLaVA-NeXT-Video-7B-hf"


@register
class InternVLUSTC(USTCModel):
    """InternVL3 / InternVL3.5 (``-hf`` checkpoints) whose video frames are compressed by ustc."""

    name = "internvl_ustc"
    model_class = "InternVLForConditionalGeneration"
    default_checkpoint = "OpenGVLab/InternVL3-8B-hf"
    default_frames = 16


def _set_video_processor(processor: Any, **settings: Any) -> None:
    """Set attributes of the processor's video processor, where it has one."""
    video = getattr(processor, "video_processor", None)
    if video is not None:
        for name, value in settings.items():
            setattr(video, name, value)


@register
class Glm4vUSTC(USTCModel):
    """GLM-4.1V whose video tokens are compressed by ustc.  The frames are sampled before the
    processor (``max_frames_num``), so its own sampling by fps is turned off."""

    name = "glm4v_ustc"
    model_class = "Glm4vForConditionalGeneration"
    default_checkpoint = "zai-org/GLM-4.1V-9B-Thinking"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _set_video_processor(self.processor, do_sample_frames=False)


@register
class Glm4vMoeUSTC(Glm4vUSTC):
    """GLM-4.5V (MoE LLM) whose video tokens are compressed by ustc."""

    name = "glm4v_moe_ustc"
    model_class = "Glm4vMoeForConditionalGeneration"
    default_checkpoint = "zai-org/GLM-4.5V"


@register
class VideoLlama3USTC(USTCModel):
    """VideoLLaMA3 whose video tokens are compressed by ustc.  Its processor's own differential
    frame pruning is turned off (``use_token_compression = False``): the adapter selects its
    budget over the full F x P grid and refuses pruned inputs."""

    name = "video_llama_3_ustc"
    model_class = "VideoLlama3ForConditionalGeneration"
    default_checkpoint = "lkhl/VideoLLaMA3-2B-Image-HF"
    default_frames = 32

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _set_video_processor(self.processor, use_token_compression=False)
