"""``qwen2_5_vl_ustc``: Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``).

Inputs come from the checkpoint's ``AutoProcessor`` (needs torchvision); where it cannot be built
:class:`Qwen2_5_VLManualProcessor` lays them out as the Qwen2-VL video processor does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ustc.lmms_eval.base import ManualProcessor, USTCModel, register

#: OpenAI CLIP normalisation, used by the Qwen2-VL / Qwen2.5-VL processors
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@register
class Qwen2_5_VLUSTC(USTCModel):
    """Qwen2.5-VL whose video tokens are compressed by ustc."""

    name = "qwen2_5_vl_ustc"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    default_checkpoint = "Qwen/Qwen2.5-VL-7B-Instruct"
    default_frames = 32

    def manual_processor(self, tokenizer: Any, config: Any, pretrained: str | None) -> Any:
        return Qwen2_5_VLManualProcessor(tokenizer, config, _video_size(pretrained))


def _video_size(pretrained: str | None) -> dict[str, int]:
    """``size`` (shortest_edge = min pixels, longest_edge = max pixels) of the checkpoint's video
    processor config if the folder has one, else the Qwen2-VL video processor's defaults."""
    size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = Path(pretrained or "") / name
        if pretrained and path.is_file():
            saved = json.loads(path.read_text())
            size.update(saved.get("size") or {})
            if "min_pixels" in saved:
                size["shortest_edge"] = int(saved["min_pixels"])
            if "max_pixels" in saved:
                size["longest_edge"] = int(saved["max_pixels"])
            break
    return size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    """(h, w) multiples of ``factor`` closest to (height, width) with h * w in
    [min_pixels, max_pixels], as Qwen2-VL's processors compute it."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class Qwen2_5_VLManualProcessor(ManualProcessor):
    """The inputs Qwen2.5-VL's processor builds, without torchvision.

    Prompt: ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><video><|vision_end|>{text}<|im_end|>\\n<|im_start|>assistant\\n``; the
    ``<video>`` placeholder expands to t * h * w / m^2 ids of ``video_token_id``.  Frames (an even
    number: the last one is repeated) are resized to multiples of p * m (bicubic, ``smart_resize``),
    CLIP-normalised and cut into patches in the processor's order: ``pixel_values_videos``
    (t * h * w, 3 * T_p * p * p), ``video_grid_thw`` (1, 3) = (t, h, w) in patches,
    ``mm_token_type_ids`` (2 at the video tokens).  p patch, m spatial merge, T_p temporal patch.
    """

    marker_end = ""
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"

    def __init__(self, tokenizer: Any, config: Any, size: dict[str, int]) -> None:
        self.tokenizer = tokenizer
        self.video_token_id = int(config.video_token_id)
        self.vision_start = int(config.vision_start_token_id)
        self.vision_end = int(config.vision_end_token_id)
        vision = config.vision_config
        self.patch = int(vision.patch_size)
        self.merge = int(vision.spatial_merge_size)
        self.temporal = int(vision.temporal_patch_size)
        self.min_pixels = int(size["shortest_edge"])
        self.max_pixels = int(size["longest_edge"])

    def __call__(
        self, text: str, videos: Sequence[np.ndarray] | None = None, return_tensors: str = "pt"
    ) -> dict[str, torch.Tensor]:
        pieces = self._pieces(text, videos)
        ids: list[int] = self._ids(pieces[0])
        patches, grids = [], []
        for video, piece in zip(videos or [], pieces[1:], strict=True):
            pixels, grid = self.patches(video)
            patches.append(pixels)
            grids.append(grid)
            t, h, w = grid
            ids += [self.vision_start] + [self.video_token_id] * (t * h * w // self.merge**2)
            ids += [self.vision_end] + self._ids(piece)
        input_ids = torch.tensor([ids])
        out = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == self.video_token_id).long() * 2,
        }
        if videos:
            out["pixel_values_videos"] = torch.cat(patches)
            out["video_grid_thw"] = torch.tensor(grids)
        return out

    def patches(self, frames: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(F, H, W, 3) uint8 -> (t * h * w, 3 * T_p * p * p) patches and the grid (t, h, w)."""
        x = torch.as_tensor(np.asarray(frames), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
        if len(x) % self.temporal:
            x = torch.cat([x, x[-1:].expand(self.temporal - len(x) % self.temporal, -1, -1, -1)])
        factor = self.patch * self.merge
        height, width = smart_resize(
            x.shape[2], x.shape[3], factor, self.min_pixels, self.max_pixels
        )
        x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
        p, m, tp = self.patch, self.merge, self.temporal
        t, h, w = len(x) // tp, height // p, width // p
        x = x.reshape(t, tp, 3, h // m, m, p, w // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(t * h * w, 3 * tp * p * p), (t, h, w)
