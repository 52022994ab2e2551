"""Tiny randomly initialised Video-LLMs built from configs of the real transformers classes.

No weights are downloaded: every model here is ``XForConditionalGeneration(config)`` with a few
layers and a hidden size of 32-64, and the inputs (``input_ids`` with the video placeholders,
``pixel_values_videos``) are built by hand, the way the real processors lay them out.  Shared with
other engineers' tests; keep the builders fast (well under a second each).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vMoeConfig,
    Glm4vMoeForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    VideoLlama3Config,
    VideoLlama3ForConditionalGeneration,
)

from ustc.lmms_eval.quickstart import TINY_LLM as QUICKSTART_LLM
from ustc.lmms_eval.quickstart import TINY_VIT, tiny_config

VOCAB = 96
IMAGE_TOKEN = 90
VIDEO_TOKEN = 91
#: token ids for prompts: anything below the special ids
TEXT_IDS = (5, 80)
#: the LLM of every tiny model: hidden 64, 4 heads, 2 KV heads (plus its depth and extras)
TINY_LLM = {"vocab_size": VOCAB, **QUICKSTART_LLM}
#: M-RoPE of the tiny Qwen LLMs: sections (2, 3, 3) of the 8 rotary pairs of head_dim 16
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}
#: the special tokens of the tiny Qwen models' prompts
QWEN_TOKENS = {
    "image_token_id": IMAGE_TOKEN,
    "video_token_id": VIDEO_TOKEN,
    "vision_start_token_id": 92,
    "vision_end_token_id": 93,
}
#: the Qwen2.5-VL / Qwen3-VL / Qwen3.5 vision tower in small: patch 4, 2 x 2 merger, pairs
QWEN_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": 4,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


@dataclass
class VideoInputs:
    """What a processor would return for one prompt per batch row: the kwargs of ``generate``."""

    kwargs: dict[str, torch.Tensor]
    frames: int  # F: frames of features (Qwen2.5-VL: temporal patch pairs)
    tokens_per_frame: int  # P: visual tokens per frame entering the LLM when nothing is pruned
    video_start: int  # position of the first video placeholder in input_ids
    #: (F*P,) column of each visual token when the video is several runs (Qwen3-VL: one per
    #: frame, timestamps between); None: F*P columns from video_start
    columns: torch.Tensor | None = None
    newline: bool = False  # one image_newline placeholder follows the F*P tokens (LLaVA-OV)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.kwargs["input_ids"]

    def video_columns(self) -> torch.Tensor:
        """(F*P,) column of each visual token in input_ids (the same in every row)."""
        if self.columns is not None:
            return self.columns
        return self.video_start + torch.arange(self.frames * self.tokens_per_frame)


def _built(cls, config, attn: str, dtype: torch.dtype):
    """``cls(config)`` with ``attn`` in every sub-config, in ``dtype``, eval mode, and the
    generation config the tests rely on: random configs differ from the hub ones, so greedy, no
    eos stop, pad = 0."""
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = attn
    model = cls(config).to(dtype).eval()
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def tiny_llava_onevision(
    attn: str = "sdpa",
    layers: int = 3,
    image_size: int = 28,
    patch_size: int = 4,
    vision_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LlavaOnevisionForConditionalGeneration:
    """LLaVA-OneVision (also the class of LLaVA-Video): SigLIP 2 layers + Qwen2 ``layers`` layers.

    image 28 / patch 4 -> 7 x 7 patches -> bilinear pooling to 4 x 4 = 16 tokens per frame (the real
    model: 27 x 27 -> 14 x 14 = 196, also for LLaVA-Video weights).  image 52 / patch 2 -> 26 x 26
    -> 13 x 13 = 169, the per-frame count the paper gives LLaVA-Video.
    """
    torch.manual_seed(seed)
    config = tiny_config(
        layers, image_size, patch_size, vision_layers, VOCAB, IMAGE_TOKEN, VIDEO_TOKEN
    )
    return _built(LlavaOnevisionForConditionalGeneration, config, attn, dtype)


def llava_video_inputs(
    model: LlavaOnevisionForConditionalGeneration,
    frames: int = 4,
    batch: int = 1,
    prefix: int = 5,
    suffix: int = 7,
    seed: int = 1,
) -> VideoInputs:
    """``input_ids`` = prefix text, F*P + 1 video placeholders (one image_newline per video),
    suffix text.  LLaVA-NeXT-Video (a ``vision_resampler`` pooling by ``spatial_pool_stride``):
    F*P placeholders, no newline."""
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    newline = not hasattr(model.model, "vision_resampler")
    if newline:
        per_frame = math.ceil(grid / 2) ** 2
    else:
        per_frame = (grid // model.config.spatial_pool_stride) ** 2
    placeholders = frames * per_frame + int(newline)
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat(
        [
            torch.randint(*TEXT_IDS, (batch, prefix), generator=g),
            torch.full((batch, placeholders), VIDEO_TOKEN),
            torch.randint(*TEXT_IDS, (batch, suffix), generator=g),
        ],
        dim=1,
    )
    pixels = torch.randn(batch, frames, 3, vision.image_size, vision.image_size, generator=g)
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": pixels.to(model.dtype),
    }
    return VideoInputs(kwargs, frames, per_frame, prefix, newline=newline)


def tiny_llava_next_video(
    attn: str = "sdpa",
    layers: int = 3,
    image_size: int = 32,
    patch_size: int = 4,
    vision_layers: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LlavaNextVideoForConditionalGeneration:
    """LLaVA-NeXT-Video: CLIP (CLS token) ``vision_layers`` layers, features of layer -2 without
    the CLS row, average pooling stride 2 (8 x 8 patches -> 4 x 4 = 16 tokens per frame; the real
    model: 24 x 24 -> 12 x 12 = 144), Llama LLM.  Inputs from ``llava_video_inputs``."""
    torch.manual_seed(seed)
    config = LlavaNextVideoConfig(
        vision_config={
            "model_type": "clip_vision_model",
            **TINY_VIT,
            "num_hidden_layers": vision_layers,
            "image_size": image_size,
            "patch_size": patch_size,
            "projection_dim": 32,
        },
        text_config={
            "model_type": "llama",
            **TINY_LLM,
            "num_hidden_layers": layers,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        spatial_pool_mode="average",
        spatial_pool_stride=2,
    )
    return _built(LlavaNextVideoForConditionalGeneration, config, attn, dtype)


def tiny_qwen2_5_vl(
    attn: str = "sdpa",
    layers: int = 3,
    vision_depth: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL: a 2-block vision tower (block 0 windowed, block 1 full attention, as the real
    model's last block), patch 4, window 16 px (2 x 2 merged tokens per window), Qwen2 LLM."""
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": vision_depth,
            **QWEN_VISION,
            "window_size": 16,
            "fullatt_block_indexes": [vision_depth - 1],
            "in_channels": 3,
        },
        text_config={
            **TINY_LLM,
            "num_hidden_layers": layers,
            "rope_parameters": MROPE,
        },
        **QWEN_TOKENS,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _built(Qwen2_5_VLForConditionalGeneration, config, attn, dtype)


def tiny_qwen2_vl(
    attn: str = "sdpa",
    layers: int = 3,
    vision_depth: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Qwen2VLForConditionalGeneration:
    """Qwen2-VL: a 2-block vision tower (every block attends over a whole frame pair), patch 4,
    2 x 2 merger, Qwen2 LLM with M-RoPE; inputs from ``qwen_video_inputs``."""
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        vision_config={
            "depth": vision_depth,
            "embed_dim": 32,
            "hidden_size": 64,
            "mlp_ratio": 2,
            "num_heads": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        text_config={
            **TINY_LLM,
            "num_hidden_layers": layers,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "rope_parameters": MROPE,
        },
        **QWEN_TOKENS,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _built(Qwen2VLForConditionalGeneration, config, attn, dtype)


def patch_grid(model, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(t, h, w, P) of a video laid out by the Qwen2-VL video processor (also GLM-4V's): the
    grid (frames / T_p, height / p, width / p) of patches and the h*w/merge^2 tokens per frame
    pair the merger makes of them."""
    vision = model.config.vision_config
    p, merge = vision.patch_size, vision.spatial_merge_size
    t, h, w = frames // vision.temporal_patch_size, height // p, width // p
    return t, h, w, h * w // merge**2


def patch_grid_kwargs(
    model, ids: torch.Tensor, grid: tuple[int, int, int], placeholder: int, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """The kwargs of ``generate`` for prompts ``ids`` (B, n) of a Qwen-style video of ``grid``
    (t, h, w) per row: random patches (B*t*h*w, C * T_p * p * p) drawn from ``g``, the grid,
    and ``mm_token_type_ids`` 2 on the ``placeholder`` tokens."""
    vision = model.config.vision_config
    p, batch = vision.patch_size, ids.shape[0]
    t, h, w = grid
    pixels = torch.randn(batch * t * h * w, 3 * vision.temporal_patch_size * p * p, generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": pixels.to(model.dtype),
        "video_grid_thw": torch.tensor([[t, h, w]] * batch),
        "mm_token_type_ids": (ids == placeholder).int() * 2,
    }


def qwen_video_inputs(
    model: Qwen2_5_VLForConditionalGeneration,
    frames: int = 4,
    height: int = 32,
    width: int = 32,
    batch: int = 1,
    prefix: int = 5,
    suffix: int = 7,
    seed: int = 1,
    timestamps: bool = False,
) -> VideoInputs:
    """Patches laid out as the Qwen2-VL video processor does: (t*h*w, C * T_p * p * p) with
    grid (t, h, w) = (frames / 2, height / p, width / p); F*P = t*h*w/4 placeholders between
    <|vision_start|> and <|vision_end|>; ``mm_token_type_ids`` marks them with 2.  With
    ``timestamps``, Qwen3-VL's layout (``qwen3_video_inputs``)."""
    t, h, w, per_frame = patch_grid(model, frames, height, width)
    g = torch.Generator().manual_seed(seed)
    # (placeholders, timestamp tokens before them) of each run
    runs = (
        [(per_frame, 2 if i < 2 else 3) for i in range(t)] if timestamps else [(t * per_frame, 0)]
    )
    parts = [torch.randint(*TEXT_IDS, (batch, prefix), generator=g)]
    for count, stamp in runs:
        if stamp:
            parts.append(torch.randint(*TEXT_IDS, (batch, stamp), generator=g))
        parts += [
            torch.full((batch, 1), model.config.vision_start_token_id),
            torch.full((batch, count), VIDEO_TOKEN),
            torch.full((batch, 1), model.config.vision_end_token_id),
        ]
    parts.append(torch.randint(*TEXT_IDS, (batch, suffix), generator=g))
    ids = torch.cat(parts, dim=1)
    kwargs = patch_grid_kwargs(model, ids, (t, h, w), VIDEO_TOKEN, g)
    if not timestamps:
        return VideoInputs(kwargs, t, per_frame, prefix + 1)
    columns = (ids[0] == VIDEO_TOKEN).nonzero()[:, 0]
    return VideoInputs(kwargs, t, per_frame, int(columns[0]), columns)


def tiny_qwen3_vl(
    attn: str = "sdpa",
    layers: int = 3,
    vision_depth: int = 3,
    deepstack: tuple[int, ...] = (0, 1),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    moe: bool = False,
) -> Qwen3VLForConditionalGeneration | Qwen3VLMoeForConditionalGeneration:
    """Qwen3-VL (``moe=True``: Qwen3-VL-MoE, 4 experts, 2 per token): a ``vision_depth``-block
    vision tower (patch 4, 2 x 2 merger, no windows) whose blocks ``deepstack`` feed DeepStack
    levels 0, 1, ... (added after decoder layers 0, 1, ...), a Qwen3 LLM (q/k head norms,
    interleaved M-RoPE)."""
    torch.manual_seed(seed)
    text = {
        **TINY_LLM,
        "num_hidden_layers": layers,
        "head_dim": 16,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
            "rope_theta": 1e6,
        },
    }
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    config = (Qwen3VLMoeConfig if moe else Qwen3VLConfig)(
        vision_config={
            "depth": vision_depth,
            **QWEN_VISION,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": list(deepstack),
            "in_channels": 3,
        },
        text_config=text,
        **QWEN_TOKENS,
    )
    cls = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    return _built(cls, config, attn, dtype)


def tiny_internvl(
    attn: str = "sdpa",
    layers: int = 3,
    image_size: int = 32,
    patch_size: int = 4,
    vision_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    text: str = "qwen2",
) -> InternVLForConditionalGeneration:
    """InternVL: InternViT (CLS token) ``vision_layers`` layers, pixel shuffle 0.5 (8 x 8 patches
    -> 4 x 4 = 16 tokens per frame; the real model: 32 x 32 -> 256), a Qwen2 LLM (InternVL3) or,
    with ``text="qwen3"``, a Qwen3 LLM with per-head q/k norms (InternVL3.5).
    Inputs from ``internvl_video_inputs``."""
    torch.manual_seed(seed)
    config = InternVLConfig(
        vision_config={
            **TINY_VIT,
            "num_hidden_layers": vision_layers,
            "image_size": [image_size, image_size],
            "patch_size": [patch_size, patch_size],
        },
        text_config={
            "model_type": text,
            **TINY_LLM,
            "num_hidden_layers": layers,
            "head_dim": 16,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        image_token_id=IMAGE_TOKEN,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return _built(InternVLForConditionalGeneration, config, attn, dtype)


def tiny_qwen3_5(
    attn: str = "sdpa",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    moe: bool = False,
) -> Qwen3_5ForConditionalGeneration | Qwen3_5MoeForConditionalGeneration:
    """Qwen3.5 (``moe=True``: Qwen3.5-MoE): the Qwen3-VL vision tower without DeepStack (2
    blocks), a hybrid LLM of 4 layers: Gated DeltaNet (linear attention, recurrent state) at 0
    and 2, full attention (KV cache) at 1 and 3, as the released 3:1 pattern in small."""
    torch.manual_seed(seed)
    text = {
        **TINY_LLM,
        "num_hidden_layers": 4,
        "head_dim": 16,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "layer_types": ["linear_attention", "full_attention"] * 2,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
            "rope_theta": 1e6,
            "partial_rotary_factor": 1.0,
        },
    }
    if moe:
        text.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        )
    config = (Qwen3_5MoeConfig if moe else Qwen3_5Config)(
        vision_config={
            "depth": 2,
            **QWEN_VISION,
            "num_position_embeddings": 16,
            "in_channels": 3,
        },
        text_config=text,
        **QWEN_TOKENS,
    )
    cls = Qwen3_5MoeForConditionalGeneration if moe else Qwen3_5ForConditionalGeneration
    return _built(cls, config, attn, dtype)


def qwen3_video_inputs(model: Qwen3VLForConditionalGeneration, **kwargs: Any) -> VideoInputs:
    """Laid out as the Qwen3-VL processor does: per frame pair a timestamp (text; 2 tokens,
    3 from the third pair on, as "<0.5 seconds>" and "<10.5 seconds>" differ), then
    <|vision_start|>, h*w/4 placeholders, <|vision_end|>; ``mm_token_type_ids`` marks the
    placeholders with 2.  Patches and arguments as in ``qwen_video_inputs``."""
    return qwen_video_inputs(model, timestamps=True, **kwargs)


#: InternVL's <img> and </img> around the video's <IMG_CONTEXT> tokens
IMG_START, IMG_END = 92, 93


def internvl_video_inputs(
    model: InternVLForConditionalGeneration,
    frames: int = 4,
    batch: int = 1,
    prefix: int = 5,
    suffix: int = 7,
    seed: int = 1,
    per_frame_runs: bool = False,
) -> VideoInputs:
    """``input_ids`` = prefix text, <img>, F*P <IMG_CONTEXT> (the frames' tokens as one run),
    </img>, suffix text; with ``per_frame_runs`` the processor's layout instead: per frame a
    'Frame{i}:' label (2 text tokens), <img>, P <IMG_CONTEXT>, </img>.  ``pixel_values``
    (B*F, C, H, W): the frames as images."""
    vision = model.config.vision_config
    size, patch = vision.image_size[0], vision.patch_size[0]
    per_frame = int(size // patch * model.config.downsample_ratio) ** 2
    g = torch.Generator().manual_seed(seed)
    runs = [(frames * per_frame, [])] if not per_frame_runs else [(per_frame, [2])] * frames
    parts = [torch.randint(*TEXT_IDS, (batch, prefix), generator=g)]
    for count, label in runs:
        parts += [torch.randint(*TEXT_IDS, (batch, n), generator=g) for n in label]
        parts += [
            torch.full((batch, 1), IMG_START),
            torch.full((batch, count), IMAGE_TOKEN),
            torch.full((batch, 1), IMG_END),
        ]
    parts.append(torch.randint(*TEXT_IDS, (batch, suffix), generator=g))
    ids = torch.cat(parts, dim=1)
    pixels = torch.randn(batch * frames, 3, size, size, generator=g)
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels.to(model.dtype),
    }
    columns = (ids[0] == IMAGE_TOKEN).nonzero()[:, 0]
    return VideoInputs(
        kwargs, frames, per_frame, int(columns[0]), columns if per_frame_runs else None
    )


# ------------------------------------------------------------------------------ GLM-4.1V / 4.5V
#: GLM-4V's special tokens at the tiny model's ids (the image token is the video placeholder)
SPECIALS_GLM4V = {
    "<|image|>": IMAGE_TOKEN,
    "<|video|>": 91,
    "<|begin_of_image|>": 92,
    "<|end_of_image|>": 93,
    "<|begin_of_video|>": 94,
    "<|end_of_video|>": 95,
}
IMAGE_START, IMAGE_END, VIDEO_START, VIDEO_END = 92, 93, 94, 95


def tiny_glm4v(attn="sdpa", layers=3, seed=0, dtype=torch.float32, moe=False):
    """GLM-4.1V (``moe=True``: GLM-4.5V, 4 experts, 2 per token, layer 0 dense): a 2-block
    vision tower (patch 4, 2 x 2 downsampling + merger), a GLM-4 LLM with partial (0.5),
    interleaved M-RoPE."""
    torch.manual_seed(seed)
    text = {
        **TINY_LLM,
        "num_hidden_layers": layers,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [2, 1, 1],
            "rope_theta": 1e4,
            "partial_rotary_factor": 0.5,
        },
    }
    if moe:
        text.update(
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            head_dim=16,
        )
    config = (Glm4vMoeConfig if moe else Glm4vConfig)(
        vision_config={"depth": 2, **QWEN_VISION, "image_size": 16, "in_channels": 3},
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        video_token_id=91,
        image_start_token_id=IMAGE_START,
        image_end_token_id=IMAGE_END,
        video_start_token_id=VIDEO_START,
        video_end_token_id=VIDEO_END,
    )
    cls = Glm4vMoeForConditionalGeneration if moe else Glm4vForConditionalGeneration
    return _built(cls, config, attn, dtype)


def glm4v_layout(kwargs, merge):
    t, h, w = kwargs["video_grid_thw"][0].tolist()
    columns = (kwargs["input_ids"][0] == IMAGE_TOKEN).nonzero()[:, 0]
    return VideoInputs(kwargs, t, h * w // merge**2, int(columns[0]), columns)


def glm4v_inputs(model, frames=4, height=32, width=32, batch=1, prefix=5, suffix=7, seed=1):
    """Laid out as ``Glm4vProcessor`` does: prefix text, <|begin_of_video|>, per frame pair
    <|begin_of_image|> + h*w/4 image placeholders + <|end_of_image|> + its timestamp (one digit
    token: pairs at 0, 1, 2 ... s), <|end_of_video|>, suffix text; ``mm_token_type_ids`` 2 on the
    video's placeholders; patches as ``qwen_video_inputs``."""
    t, h, w, per_frame = patch_grid(model, frames, height, width)
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(*TEXT_IDS, (batch, prefix), generator=g), torch.full((batch, 1), 94)]
    for i in range(t):
        parts += [
            torch.full((batch, 1), IMAGE_START),
            torch.full((batch, per_frame), IMAGE_TOKEN),
            torch.full((batch, 1), IMAGE_END),
            torch.full((batch, 1), 1 + i),  # the tokenizer's digit i
        ]
    parts += [
        torch.full((batch, 1), VIDEO_END),
        torch.randint(*TEXT_IDS, (batch, suffix), generator=g),
    ]
    ids = torch.cat(parts, dim=1)
    kwargs = patch_grid_kwargs(model, ids, (t, h, w), IMAGE_TOKEN, g)
    return glm4v_layout(kwargs, model.config.vision_config.spatial_merge_size)


# ------------------------------------------------------------------------------ VideoLLaMA3
#: the tiny tokenizer's ids of "Time", "s:", "," and "." (processor_helpers.WORDS), digit d: 1 + d
TIME, SECONDS, COMMA, DOT = 11, 12, 13, 14


def tiny_video_llama_3(attn="sdpa", layers=3, seed=0, dtype=torch.float32):
    """VideoLLaMA3: a 2-layer NaViT vision encoder (patch 4, axial 2-D RoPE), 2 x 2 bilinear
    pooling for videos, a Qwen2 LLM with 1-D RoPE."""
    torch.manual_seed(seed)
    config = VideoLlama3Config(
        vision_config={**TINY_VIT, "num_hidden_layers": 2, "patch_size": 4},
        text_config={"model_type": "qwen2", **TINY_LLM, "num_hidden_layers": layers},
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
    )
    return _built(VideoLlama3ForConditionalGeneration, config, attn, dtype)


def vl3_layout(kwargs):
    t, h, w = kwargs["video_grid_thw"][0].tolist()
    m = int(kwargs["video_merge_sizes"][0])
    columns = (kwargs["input_ids"][0] == VIDEO_TOKEN).nonzero()[:, 0]
    return VideoInputs(kwargs, t, (h // m) * (w // m), int(columns[0]), columns)


def vl3_inputs(model, frames=4, height=32, width=32, batch=1, prefix=5, suffix=7, seed=1):
    """Laid out as ``VideoLlama3Processor`` does with its pruning off: prefix text, then per
    frame i 'Time i.0s:' (5 tokens: Time, i, ., 0, s:) + (h/2)*(w/2) placeholders, frames joined
    by ',', suffix text; patches (F*h*w, 3*p*p) in the processor's order (each 2 x 2 group
    contiguous), merge size 2, a compression mask keeping every token."""
    p = model.config.vision_config.patch_size
    h, w = height // p, width // p
    per_frame = h * w // 4
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(*TEXT_IDS, (batch, prefix), generator=g)]
    for i in range(frames):
        label = [TIME, 1 + i, DOT, 1, SECONDS] if i < 10 else None
        parts += [
            torch.tensor(label).expand(batch, -1),
            torch.full((batch, per_frame), VIDEO_TOKEN),
        ]
        if i < frames - 1:
            parts.append(torch.full((batch, 1), COMMA))
    parts.append(torch.randint(*TEXT_IDS, (batch, suffix), generator=g))
    ids = torch.cat(parts, dim=1)
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": torch.randn(batch * frames * h * w, 3 * p * p, generator=g).to(
            model.dtype
        ),
        "video_grid_thw": torch.tensor([[frames, h, w]] * batch),
        "video_merge_sizes": torch.full((batch,), 2),
        "video_compression_mask": torch.ones(batch * frames * per_frame, dtype=torch.bool),
    }
    return vl3_layout(kwargs)


def pad_batch(rows: list[VideoInputs], side: str) -> dict[str, torch.Tensor]:
    """One batch of single-prompt inputs, padded to the longest prompt with id 0 on ``side``."""
    n = max(r.input_ids.shape[1] for r in rows)

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        fill = torch.full((x.shape[0], n - x.shape[1]), value, dtype=x.dtype)
        return torch.cat([fill, x] if side == "left" else [x, fill], dim=1)

    batch = {
        "input_ids": torch.cat([pad(r.input_ids, 0) for r in rows]),
        "attention_mask": torch.cat([pad(r.kwargs["attention_mask"], 0) for r in rows]),
    }
    # per video (concatenated): InternVL's frames as images, VideoLLaMA3's merge sizes and mask
    for key in (
        "pixel_values_videos",
        "pixel_values",
        "video_grid_thw",
        "video_merge_sizes",
        "video_compression_mask",
    ):
        if key in rows[0].kwargs:
            batch[key] = torch.cat([r.kwargs[key] for r in rows])
    if "mm_token_type_ids" in rows[0].kwargs:
        batch["mm_token_type_ids"] = torch.cat(
            [pad(r.kwargs["mm_token_type_ids"], 0) for r in rows]
        )
    return batch


# ------------------------------------------------------------------------ slow references
def video_features(model, inputs: VideoInputs) -> torch.Tensor:
    """(B, F, P, D) video tokens after projector/pooling (merger), from the model's own
    ``get_video_features``, without the trailing image_newline."""
    b = inputs.input_ids.shape[0]
    f, p = inputs.frames, inputs.tokens_per_frame
    kw = inputs.kwargs
    with torch.no_grad():
        if "pixel_values" in kw:  # InternVL: the frames as images, (B*F, P, D)
            feats = model.model.get_image_features(kw["pixel_values"]).pooler_output
        elif "video_grid_thw" in kw:
            extra = [kw["video_merge_sizes"]] if "video_merge_sizes" in kw else []  # VideoLLaMA3
            out = model.model.get_video_features(
                kw["pixel_values_videos"], kw["video_grid_thw"], *extra
            )
            feats = torch.cat(list(out.pooler_output), dim=0)
        else:
            feats = model.model.get_video_features(kw["pixel_values_videos"]).pooler_output
            if isinstance(feats, (tuple, list)):  # one (F, P, D) per video (some releases)
                feats = torch.stack(list(feats))
    return feats.reshape(b, -1, feats.shape[-1])[:, : f * p].reshape(b, f, p, -1)


def original_positions(model, inputs: VideoInputs, total: int) -> torch.Tensor:
    """Positions of the uncompressed prompt followed by ``total - n`` generated tokens:
    (B, total) 1-D for LLaVA-OV and VideoLLaMA3, (3, B, total) M-RoPE for Qwen2.5-VL (the model's get_rope_index,
    then +1 per generated token)."""
    ids = inputs.input_ids
    b, n = ids.shape
    if not hasattr(model.model, "get_rope_index"):  # 1-D (VideoLLaMA3 too, despite its grid)
        return torch.arange(total).expand(b, total)
    prompt, _ = model.model.get_rope_index(
        ids,
        mm_token_type_ids=inputs.kwargs["mm_token_type_ids"],
        video_grid_thw=inputs.kwargs["video_grid_thw"],
    )
    after = prompt[..., -1:] + torch.arange(1, total - n + 1)
    return torch.cat([prompt, after], dim=-1)


def reference_group_mean(x: torch.Tensor, assignment: torch.Tensor, count: int) -> torch.Tensor:
    """Slot s = mean of the rows of x (B, N, D) with assignment == s, one slot at a time."""
    out = torch.zeros(x.shape[0], count, x.shape[-1], dtype=x.dtype)
    for b in range(x.shape[0]):
        for s in range(count):
            out[b, s] = x[b][assignment[b] == s].float().mean(dim=0).to(x.dtype)
    return out


def reference_logits(model, inputs: VideoInputs, sequences, last, config, deepstack=None):
    """Logits of every generation step, recomputed WITHOUT a KV cache and without any hook.

    The LLM is run layer by layer on the compressed sequence (prompt + generated tokens) with an
    explicit causal mask and the original positions of every kept token; at layer K the visual
    hidden states are replaced by the means of the groups the attached merger chose.  ``last`` is
    the handle's ``LastRun``; its compression tokens are used as the LLM input.  ``deepstack``
    (Qwen3-VL): per level l, (B, M, D) features added to the visual hidden states after layer l,
    merged at layer K with the merger's groups like the hidden states.  Returns (B, T, V) for the
    T generated tokens (step t predicts token t).
    """
    lm = model.model.language_model
    ids = inputs.input_ids
    b, n = ids.shape
    t = sequences.shape[1] - n
    video = inputs.video_columns()
    fed = sequences[:, : n + t - 1]  # the last token is generated but never fed back
    chosen = video[last.compression.indices]  # (B, M) columns of the kept visual tokens
    levels = list(deepstack or [])
    with torch.no_grad():
        embeds = lm.embed_tokens(fed)
        if inputs.newline:  # LLaVA-OV: image_newline after the video
            embeds[:, video[-1] + 1] = model.model.image_newline.to(embeds.dtype)
        other = torch.ones(n + t - 1, dtype=torch.bool)
        other[video] = False
        columns = torch.stack(
            [torch.cat([other.nonzero()[:, 0], chosen[i]]).sort().values for i in range(b)]
        )
        for i in range(b):
            embeds[i, chosen[i]] = last.compression.tokens[i].to(embeds.dtype)
        x = torch.stack([embeds[i, columns[i]] for i in range(b)])
        # visual[i]: positions of row i's visual tokens in the sequence x
        visual = torch.stack([torch.isin(columns[i], chosen[i]).nonzero()[:, 0] for i in range(b)])
        positions = original_positions(model, inputs, n + t - 1)
        positions = torch.stack([positions[..., i, :][..., columns[i]] for i in range(b)], dim=-2)
        merging = config.merger != "none" and config.layer < len(lm.layers)
        for j, layer in enumerate(lm.layers):
            if merging and j == config.layer:
                count = last.merge.indices.shape[1]
                states = torch.stack([x[i, visual[i]] for i in range(b)])
                merged = reference_group_mean(states, last.merge.assignment, count)
                kept = visual.gather(1, last.merge.indices)
                others = torch.ones(b, x.shape[1], dtype=torch.bool)
                others[torch.arange(b)[:, None], visual] = False
                keep = torch.stack(
                    [
                        torch.cat([others[i].nonzero()[:, 0], kept[i]]).sort().values
                        for i in range(b)
                    ]
                )
                x = x.clone()
                for i in range(b):
                    x[i, kept[i]] = merged[i]
                x = torch.stack([x[i, keep[i]] for i in range(b)])
                positions = torch.stack(
                    [positions[..., i, :][..., keep[i]] for i in range(b)], dim=-2
                )
                visual = torch.stack(
                    [torch.isin(keep[i], kept[i]).nonzero()[:, 0] for i in range(b)]
                )
                levels = levels[:j] + [
                    reference_group_mean(level, last.merge.assignment, count)
                    for level in levels[j:]
                ]
            length = x.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            mask = torch.zeros(1, 1, length, length, dtype=x.dtype).masked_fill(
                ~causal, torch.finfo(x.dtype).min
            )
            cos, sin = lm.rotary_emb(x, positions)
            # a recurrent (linear-attention) layer takes a 2-D padding mask or none
            recurrent = getattr(lm.config, "layer_types", [None] * (j + 1))[j] == "linear_attention"
            x = layer(
                x,
                attention_mask=None if recurrent else mask,
                position_embeddings=(cos, sin),
                position_ids=None,
            )
            if j < len(levels):
                x = x.clone()
                for i in range(b):
                    x[i, visual[i]] = x[i, visual[i]] + levels[j][i].to(x.dtype)
        logits = model.lm_head(lm.norm(x))
    return logits[:, -t:]


def deepstack_levels(model, inputs: VideoInputs) -> list[torch.Tensor]:
    """The model's own DeepStack features of the video, per level (B, F*P, D)."""
    kw = inputs.kwargs
    with torch.no_grad():
        out = model.model.get_video_features(kw["pixel_values_videos"], kw["video_grid_thw"])
    b = inputs.input_ids.shape[0]
    levels = [  # split per video (newer transformers) or one tensor (older)
        torch.cat(list(level)) if isinstance(level, (list, tuple)) else level
        for level in out.deepstack_features
    ]
    return [level.reshape(b, -1, level.shape[-1]) for level in levels]


def compressed_levels(model, inputs: VideoInputs, last) -> list[torch.Tensor]:
    """Each DeepStack level with the selection and cluster means of the compression."""
    m = last.compression.indices.shape[1]
    return [
        reference_group_mean(level, last.compression.assignment, m)
        for level in deepstack_levels(model, inputs)
    ]


def eager_vision_block(model, inputs: VideoInputs, block_index: int, through_model: bool = False):
    """Eq. (1) per patch from transformers' eager attention of one block of a Qwen-style vision
    tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): the mean attention each patch receives
    inside its attention segment (``cu_seqlens``: a window or a frame pair), from the block's own
    q/k/v and RoPE.  Checks that these maps reproduce the block's output.  ``through_model``:
    the tower runs inside the model's ``get_video_features`` (GLM-4V's takes a grid per frame
    pair from there).  Returns (received (S,) float64 in the tower's token order, the tower's
    (or get_video_features') output, the number of segments)."""
    visual = model.model.visual
    block = visual.blocks[block_index]
    captured = {}
    probes = [
        block.attn.register_forward_pre_hook(
            lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True
        ),
        block.attn.register_forward_hook(lambda m, a, o: captured.update(out=o)),
    ]
    kw = inputs.kwargs
    with torch.no_grad():
        if through_model:
            out = model.model.get_video_features(kw["pixel_values_videos"], kw["video_grid_thw"])
        else:
            out = visual(kw["pixel_values_videos"], grid_thw=kw["video_grid_thw"])
    for probe in probes:
        probe.remove()
    module = sys.modules[type(block.attn).__module__]
    hidden = captured["args"][0] if captured["args"] else captured["kwargs"]["hidden_states"]
    cu = captured["kwargs"]["cu_seqlens"].tolist()
    cos, sin = captured["kwargs"]["position_embeddings"]
    s = hidden.shape[0]
    with torch.no_grad():
        qkv = block.attn.qkv(hidden).reshape(s, 3, block.attn.num_heads, -1).permute(1, 0, 2, 3)
        q, k = module.apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)
        v = qkv[2]
        received = torch.zeros(s, dtype=torch.float64)
        outputs = []
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            seg = [x[a:b].transpose(0, 1)[None] for x in (q, k, v)]
            o, w = module.eager_attention_forward(
                block.attn, *seg, None, scaling=block.attn.scaling
            )
            outputs.append(o)
            avg = w[0].double().mean(dim=0)
            received[a:b] = (avg.sum(dim=0) - avg.diagonal()) / (b - a - 1)
        # these maps are the ones the block used: they reproduce its output
        torch.testing.assert_close(
            block.attn.proj(torch.cat(outputs, dim=1).reshape(s, -1)), captured["out"]
        )
    return received, out, len(cu) - 1


def qwen_vision_reference(model, inputs: VideoInputs, block_index: int) -> torch.Tensor:
    """Eq. (1) of a Qwen-style vision tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) from
    ``eager_vision_block``: the patch scores averaged over the merger's 2 x 2 groups, in the
    order of the model's features.  Qwen2.5-VL permutes its tokens into windows inside the tower:
    the order is recovered by matching the model's own merged outputs; the others keep the
    processor's order (checked: the tower's output is the merger of its hidden states, and there
    is one attention segment per frame pair)."""
    visual = model.model.visual
    received, out, segments = eager_vision_block(model, inputs, block_index)
    groups = received.view(-1, visual.spatial_merge_size**2).mean(dim=-1)
    with torch.no_grad():
        merged = visual.merger(out.last_hidden_state)
    if getattr(visual.config, "fullatt_block_indexes", None) is not None:  # windows
        match = (out.pooler_output[:, None] == merged[None]).all(dim=-1)
        assert bool(match.sum(dim=1).eq(1).all())
        return groups[match.float().argmax(dim=1)]
    assert torch.equal(out.pooler_output, merged)
    assert segments == int(inputs.kwargs["video_grid_thw"][:, 0].sum())
    return groups


def glm4v_vision_reference(model, inputs: VideoInputs, block_index: int) -> torch.Tensor:
    """Eq. (1) of GLM-4V's vision tower from ``eager_vision_block`` (one attention segment per
    frame pair): the patch scores averaged over the 2 x 2 groups the downsampling joins."""
    received, _, _ = eager_vision_block(model, inputs, block_index, through_model=True)
    return received.view(-1, model.model.visual.spatial_merge_size**2).mean(dim=-1)


def generate(model, inputs, steps: int = 5, **extra: Any) -> Any:
    """``model.generate`` on ``inputs`` (VideoInputs or keyword arguments), greedy, returning the
    sequences, the logits of every step and the cache."""
    kwargs = inputs.kwargs if isinstance(inputs, VideoInputs) else inputs
    with torch.no_grad():
        return model.generate(
            **kwargs,
            max_new_tokens=steps,
            return_dict_in_generate=True,
            output_logits=True,
            **extra,
        )


def check_processor_inputs_decode_as_the_reference(
    model, inputs: VideoInputs, config, budget: int
) -> None:
    """The battery's core on a real processor's output: compression off is bit-identical, and
    with ``config`` the video enters the LLM as ``budget`` tokens (fewer than it has) and every
    decode step equals ``reference_logits``."""
    from ustc import CompressionConfig
    from ustc.models import attach

    plain = generate(model, inputs, steps=3)
    handle = attach(model, CompressionConfig(retention=1.0, merger="none"))
    off = generate(model, inputs, steps=3)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, off.logits, strict=True))
    handle = attach(model, config)
    out = generate(model, inputs, steps=4)
    handle.remove()
    assert handle.stats.tokens_in == budget < inputs.frames * inputs.tokens_per_frame
    expected = reference_logits(model, inputs, out.sequences, handle.last, config)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=2e-5, rtol=1e-5)
