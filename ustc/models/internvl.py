"""InternVL (``InternVLForConditionalGeneration``: InternVL3, InternVL3.5).

Video path of the model: transformers gives InternVL no video input of its own; its processor
turns a video into frames passed as images (``pixel_values``, (B*F, C, H, W)) through
``get_image_features``.  InternViT runs on every frame (448 px / patch 14 = 32 x 32 patches plus
one CLS token); the hidden states of ``vision_feature_layer`` (-1) without the CLS row are
*pixel-shuffled* (``pixel_shuffle`` with ``downsample_ratio`` 0.5: each 2 x 2 block of patches
becomes one token whose channels are the four patches' channels side by side, 16 x 16 = 256
tokens per frame), then projected.  The LLM is Qwen2.5 (InternVL3) or Qwen3 (InternVL3.5) with
1-D RoPE.

Prompt: the processor writes one ``Frame{i}: <img>`` + 256 ``<IMG_CONTEXT>`` + ``</img>`` run per
frame, joined by newlines -- F runs with text between them; one run of F*256 ``<IMG_CONTEXT>``
works too.  The row's visual columns are collected wherever they lie
(``ustc.models.sequence.placeholder_columns``, as for Qwen3-VL's timestamps); the text between
the frames stays and is not question text for the merger.  Every prefill with ``pixel_values`` is
read as one video per row.

Eq. (1): InternViT has a CLS token, so the score is the CLS row of the head-averaged attention
(``ustc.scoring.cls_attention``) of the layer whose output is the selected feature layer, with q
and k recomputed from the layer's input by its own projections and q/k norms.  Alignment with the
shuffled tokens: the (g x g) score map goes through the model's own ``pixel_shuffle`` as a map of
one channel, which puts each token's s x s = 4 patch scores side by side in its 4 channels exactly
as it places their features; the token's score is their mean.  (The projector mixes the
channels, so no linear op carries a score through it; the mean over the group is the natural
score of a token made of those patches, as for Qwen's 2 x 2 merger.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ustc.models.attention import vit_queries_keys
from ustc.models.base import VideoCall, VideoLayout
from ustc.models.llava_onevision import LlavaOnevisionHandle
from ustc.models.sequence import placeholder_columns
from ustc.scoring import cls_attention


@dataclass
class FramesCall(VideoCall):
    """A ``get_image_features`` call on the frames of B videos: ``images`` = B*F.  ``batch`` is
    known once the prompt says F (``InternVLHandle.video_layout``)."""

    images: int = 0


class InternVLHandle(LlavaOnevisionHandle):
    """Adapter for ``InternVLForConditionalGeneration``.

    vision_layer: index of the InternViT layer whose CLS attention gives Eq. (1); by default the
    layer that produces ``config.vision_feature_layer`` (the last layer for -1).
    """

    video_method = "get_image_features"
    video_argument = "pixel_values"
    video_output = "image"

    square_grid = "InternVL pixel-shuffles"
    vision_attention = "attention"

    @staticmethod
    def _encoder_layers(model: nn.Module) -> nn.ModuleList:
        return model.model.vision_tower.encoder.layer

    def vision_scores(
        self, module: nn.Module, hidden: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Tensor:
        """The CLS row of this layer's attention, shuffled as the features are: (B*F, P)
        -- Eq. (1)."""
        q, k = vit_queries_keys(module, hidden)
        scores = cls_attention(q, k)  # (B*F, patches): the CLS column dropped as the features'
        return self._shuffle(scores)

    def _shuffle(self, scores: Tensor) -> Tensor:
        """(B*F, g*g) patch scores -> (B*F, P): the mean of each shuffled token's patch group."""
        grid = int(round(scores.shape[1] ** 0.5))
        if grid * grid != scores.shape[1]:
            raise ValueError(f"{scores.shape[1]} patch scores do not form a square patch grid")
        ratio = self.model.config.downsample_ratio
        grouped = self.base_model().pixel_shuffle(
            scores.reshape(-1, grid, grid, 1), scale_factor=ratio
        )  # (B*F, g*r, g*r, 1/r^2): each token's patch scores in its channels
        return grouped.mean(dim=-1).flatten(1)

    def video_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> VideoCall:
        pixels = args[0] if args else kwargs.get("pixel_values")
        if not isinstance(pixels, Tensor) or pixels.dim() != 4:
            raise ValueError(
                "InternVL takes a video's frames as pixel_values (B*F, C, H, W), got "
                f"{getattr(pixels, 'shape', type(pixels).__name__)}"
            )
        call = FramesCall(batch=0, images=pixels.shape[0])
        ids = kwargs.get("input_ids")
        if isinstance(ids, Tensor):  # a forward's arguments: F is known from the prompt
            self._count_videos(call, ids)
        return call

    def _tokens_per_frame(self) -> int:
        vision = self.model.config.vision_config
        size, patch = vision.image_size, vision.patch_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        return int(size // patch * self.model.config.downsample_ratio) ** 2

    def _count_videos(self, call: FramesCall, ids: Tensor) -> int:
        """Set ``call.batch`` from the prompt: B = images / F, F = image tokens per row / P."""
        frames = self._frames(ids)
        if call.images % frames:
            raise ValueError(
                f"{call.images} frames in pixel_values for prompts of {frames} frames each"
            )
        call.batch = call.images // frames
        return frames

    def _frames(self, ids: Tensor) -> int:
        """F from the prompt: every row holds F*P image placeholders (in one run or several)."""
        per_frame = self._tokens_per_frame()
        counts = (ids == self.model.config.image_token_id).sum(dim=1).tolist()
        frames = counts[0] // per_frame
        if frames < 1 or len(set(counts)) > 1 or counts[0] % per_frame:
            raise ValueError(
                f"image placeholders per prompt row {counts} are not F*P with P = {per_frame} "
                "tokens per frame (one video per prompt row, the videos of a batch of one size)"
            )
        return frames

    def video_layout(self, kwargs: dict[str, Any], video: VideoCall | None) -> VideoLayout:
        ids: Tensor = kwargs["input_ids"]
        columns, _ = placeholder_columns(ids, self.model.config.image_token_id)
        if isinstance(video, FramesCall):
            frames = self._count_videos(video, ids)
        else:  # features precomputed elsewhere
            frames = self._frames(ids)
        if video is not None and video.batch and ids.shape[0] % video.batch:
            raise ValueError(
                f"{video.batch} videos for {ids.shape[0]} prompts: one video per prompt row"
            )
        per_frame = self._tokens_per_frame()
        rows = ids.shape[0]
        return VideoLayout(
            columns[:, 0], [frames] * rows, [per_frame] * rows, trailing=0, columns=columns
        )
