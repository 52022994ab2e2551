"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``).

Video path of the model: CLIP ViT on every frame (336 px / patch 14 = 24 x 24 patches plus one
CLS token), the hidden states of ``vision_feature_layer`` (-2 in the released checkpoints)
without the CLS row (``vision_feature_select_strategy="default"``), the ``vision_resampler``
(``spatial_pool_mode="average"``: ``AvgPool2d(stride, stride)`` with stride 2 over the patch grid,
24 x 24 -> 12 x 12 = 144 tokens per frame), then the projector.  The prompt holds exactly F*P video
placeholders (no newline token for videos); the LLM is Llama/Vicuna/Mistral with 1-D RoPE.

Eq. (1) for an encoder with a CLS token is the CLS row of the head-averaged attention
(``ustc.scoring.cls_attention``), taken from the encoder layer whose output is the selected
feature layer and recomputed from its own q/k projections (works under sdpa).  The CLS column
is dropped as the features drop the CLS row, and the (grid x grid) score map goes through the
model's own pooling op: the resampler's ``AvgPool2d`` is linear, so a pooled token's score is the
mean of its stride x stride patches' scores, exactly as its features are their mean.  Checkpoints
with ``spatial_pool_mode="max"`` or ``"conv"`` (not linear per channel, or mixing channels) get
the mean over the same stride x stride window.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ustc.models.attention import vit_queries_keys
from ustc.models.base import VideoCall, VideoLayout
from ustc.models.llava_onevision import LlavaOnevisionHandle
from ustc.scoring import cls_attention


class LlavaNextVideoHandle(LlavaOnevisionHandle):
    """Adapter for ``LlavaNextVideoForConditionalGeneration``.

    vision_layer: index of the CLIP encoder layer whose CLS attention gives Eq. (1); by default the
    layer that produces ``config.vision_feature_layer`` (layer 22 of 24 for the released
    checkpoints, whose features are ``hidden_states[-2]``).  Frames, placeholders and 1-D
    positions are read as for LLaVA-OneVision (``LlavaOnevisionHandle``).
    """

    square_grid = "LLaVA-NeXT-Video pools"

    def vision_scores(
        self, module: nn.Module, hidden: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Tensor:
        """The CLS row of this layer's attention, pooled as the features are: (B*F, P) -- Eq. (1)."""
        q, k = vit_queries_keys(module, hidden)
        scores = cls_attention(q, k)  # (B*F, patches): the CLS column is dropped as the features'
        return self._pool(scores)

    def _pool(self, scores: Tensor) -> Tensor:
        """(B*F, g*g) patch scores -> (B*F, P) scores of the resampler's pooled tokens."""
        grid = int(round(scores.shape[1] ** 0.5))
        if grid * grid != scores.shape[1]:
            raise ValueError(f"{scores.shape[1]} patch scores do not form a square patch grid")
        spatial = scores.view(-1, 1, grid, grid)
        pool = self.base_model().vision_resampler.pool
        if isinstance(pool, nn.AvgPool2d):
            pooled = pool(spatial)  # the model's own op
        else:  # max / conv: the mean over the window each pooled token is built from
            stride = self.model.config.spatial_pool_stride
            pooled = F.avg_pool2d(spatial, kernel_size=stride, stride=stride)
        return pooled.flatten(1)

    def video_layout(self, kwargs: dict[str, Any], video: VideoCall | None) -> VideoLayout:
        ids, starts, counts = self._video_runs(kwargs, video)
        vision = self.model.config.vision_config
        per_frame = (
            vision.image_size // vision.patch_size // self.model.config.spatial_pool_stride
        ) ** 2
        frames = video.frames if video is not None and video.frames is not None else None
        if frames is None:  # features precomputed elsewhere: F from the model's pooled grid
            frames = counts[0] // per_frame
        if frames < 1 or len(set(counts)) > 1 or counts[0] != frames * per_frame:
            raise ValueError(
                f"video placeholders per prompt row {counts} do not make F*P with F = {frames} "
                f"frames of P = {per_frame} pooled tokens (one video per prompt row, the videos "
                "of a batch of one size)"
            )
        rows = ids.shape[0]
        return VideoLayout(starts, [frames] * rows, [per_frame] * rows, trailing=0)
