"""``llava_onevision_ustc``: LLaVA-OneVision and LLaVA-Video (``LlavaOnevisionForConditionalGeneration``).

Inputs come from the checkpoint's ``AutoProcessor`` (needs torchvision); where it cannot be built
:class:`LlavaOnevisionManualProcessor` lays them out as the processor does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ustc.lmms_eval.base import ManualProcessor, USTCModel, register


@register
class LlavaOneVisionUSTC(USTCModel):
    """LLaVA-OneVision / LLaVA-Video whose video tokens are compressed by ustc."""

    name = "llava_onevision_ustc"
    aliases = ("ustc",)
    model_class = "LlavaOnevisionForConditionalGeneration"
    default_checkpoint = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    default_frames = 32

    def manual_processor(self, tokenizer: Any, config: Any, pretrained: str | None) -> Any:
        return LlavaOnevisionManualProcessor(tokenizer, config)


class LlavaOnevisionManualProcessor(ManualProcessor):
    """The inputs LLaVA-OneVision's processor builds, without torchvision.

    Prompt: Qwen2's chat template ``<|im_start|>user\\n<video>\\n{text}<|im_end|>\\n
    <|im_start|>assistant\\n``; the ``<video>`` placeholder expands to F * P + 1 ids of
    ``video_token_id`` (P = ceil(S / 2)^2 after LLaVA-OV's 2x pooling of the S x S patch grid,
    plus one ``image_newline``).  Frames are resized to the vision tower's size (bilinear) and
    normalised with SigLIP's mean = std = 0.5: ``pixel_values_videos`` (1, F, 3, size, size).
    """

    marker_end = "\n"

    def __init__(self, tokenizer: Any, config: Any) -> None:
        self.tokenizer = tokenizer
        self.video_token_id = int(config.video_token_id)
        vision = config.vision_config
        self.size = int(vision.image_size)
        side = -(-self.size // int(vision.patch_size))
        self.tokens_per_frame = (-(-side // 2)) ** 2

    def __call__(
        self, text: str, videos: Sequence[np.ndarray] | None = None, return_tensors: str = "pt"
    ) -> dict[str, torch.Tensor]:
        pieces = self._pieces(text, videos)
        ids: list[int] = self._ids(pieces[0])
        for video, piece in zip(videos or [], pieces[1:], strict=True):
            ids += [self.video_token_id] * (len(video) * self.tokens_per_frame + 1)
            ids += self._ids(piece)
        input_ids = torch.tensor([ids])
        out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if videos:
            out["pixel_values_videos"] = torch.stack([self.pixels(v) for v in videos])
        return out

    def pixels(self, frames: np.ndarray) -> torch.Tensor:
        """(F, H, W, 3) uint8 -> (F, 3, size, size) float, SigLIP-normalised."""
        x = torch.as_tensor(np.asarray(frames), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
        x = F.interpolate(
            x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
        )
        return (x - 0.5) / 0.5
