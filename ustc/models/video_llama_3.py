"""VideoLLaMA3 (``VideoLlama3ForConditionalGeneration``).

Video path of the model: a SigLIP-style NaViT encoder (2-D axial rotary embedding, no CLS token)
runs every frame on its own (``cu_seqlens`` cuts the video's patches into its frames; temporal
patch 1, so a "frame" of features is one input frame) on 14 x 14 patches given in the processor's
order, each ``merge x merge`` group contiguous; ``pixel_unshuffle`` puts the patches of a frame
back in raster order and pools them with a bilinear interpolation to (h / merge) x (w / merge)
(merge = ``video_merge_sizes``, 2 for videos: at this exact factor the interpolation is the mean
of each 2 x 2 group); the projector maps each pooled token to the LLM.  The LLM is Qwen2.5 with
1-D RoPE.

Prompt: the processor writes each frame as ``Time {t:.1f}s:`` (text) + its placeholders, frames
joined by ``,``: a video is F runs of ``video_token_id`` with text between them
(``VideoLayout.columns``, as Qwen3-VL); the text between frames stays and is not question text
for the merger.

What is supported, and what is refused:

* The processor's own *differential frame pruning* (``use_token_compression``, on by default in
  ``VideoLlama3VideoProcessor``): it drops the tokens of a frame whose patches barely differ from
  the previous frame's, writes only the kept ones as placeholders (a different number per frame)
  and passes ``video_compression_mask``.  ustc selects its own budget over a full F x P grid, so a
  mask that drops tokens is refused with a ValueError naming the switch
  (``videos_kwargs={"use_token_compression": False}``); a mask that keeps every token (what the
  switch gives, and what the processor gives a single-frame video) is accepted.
* Several videos in a batch, of different sizes: yes, one per prompt row.  Images (alone or with
  a video): not compressed, refused with the video (``Handle``).

Eq. (1) scores come from the last encoder layer (the one whose output is pooled): q and k
recomputed from its input with its own rotary embedding, the attention each patch receives inside
its frame, then the model's own ``pixel_unshuffle`` on the one-channel score map: the pooling is
linear per channel, so a pooled token's score is the same blend of its patches' scores as its
features are of theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ustc.config import CompressionConfig
from ustc.models.base import Handle, VideoCall, VideoLayout, vision_layer_index
from ustc.models.qwen2_5_vl import rotated_segment_scores
from ustc.models.sequence import placeholder_columns


@dataclass
class MergedGridCall(VideoCall):
    """A ``get_video_features`` call: ``grid`` (B, 3) patches and ``merge_sizes`` (B,)."""

    merge_sizes: Tensor | None = None


class VideoLlama3Handle(Handle):
    """Adapter for ``VideoLlama3ForConditionalGeneration``.

    vision_layer: index of the encoder layer whose attention gives Eq. (1); by default the last,
    whose output is pooled into the LLM's visual tokens.
    """

    def __init__(self, model: nn.Module, config: CompressionConfig, vision_layer: int = -1) -> None:
        layers = model.model.vision_model.encoder.layers
        self.vision_layer = vision_layer_index(vision_layer, len(layers))
        self._grid: tuple[Tensor, Tensor] | None = None
        super().__init__(model, config)

    # ------------------------------------------------------------------- Eq. (1) scores
    def vision_hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        tower = self.base_model().vision_model
        attention = tower.encoder.layers[self.vision_layer].self_attn
        return [self.tower_hook(tower), self.score_hook(attention)]

    def vision_tower_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Remember this call's grid and merge sizes (to pool the scores as the features)."""
        named = dict(zip(("pixel_values", "grid_thw", "merge_sizes"), args, strict=False))
        named.update(kwargs)
        self._grid = (named["grid_thw"], named["merge_sizes"])

    def vision_scores(
        self, attention: nn.Module, hidden: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Tensor:
        """Reduce this layer's attention to one score per pooled token: (B*F*P,) -- Eq. (1)."""
        shape = (hidden.shape[0], attention.num_heads, attention.head_dim)
        q, k = attention.q_proj(hidden).view(shape), attention.k_proj(hidden).view(shape)
        scores = rotated_segment_scores(attention, q, k, args, kwargs)  # (S,), one per frame
        assert self._grid is not None
        grid, merges = self._grid
        pooled = self.base_model().vision_model.pixel_unshuffle(scores[:, None], grid, merges)
        return pooled[:, 0]

    # ---------------------------------------------------------------------- the video
    def video_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> VideoCall:
        grid = args[1] if len(args) > 1 else kwargs.get("video_grid_thw")
        merges = args[2] if len(args) > 2 else kwargs.get("video_merge_sizes")
        if not isinstance(grid, Tensor) or grid.dim() != 2 or grid.shape[1] != 3:
            raise ValueError(
                "pixel_values_videos need video_grid_thw (one (t, h, w) row per video), got "
                f"{getattr(grid, 'shape', grid)}"
            )
        if not isinstance(merges, Tensor) or merges.shape != grid.shape[:1]:
            raise ValueError(
                "pixel_values_videos need video_merge_sizes (one merge size per video), got "
                f"{getattr(merges, 'shape', merges)} for {grid.shape[0]} videos"
            )
        return MergedGridCall(batch=grid.shape[0], grid=grid, merge_sizes=merges)

    def video_layout(self, kwargs: dict[str, Any], video: VideoCall | None) -> VideoLayout:
        ids: Tensor = kwargs["input_ids"]
        rows = ids.shape[0]
        mask = kwargs.get("video_compression_mask")
        if mask is not None and not bool(mask.all()):
            raise ValueError(
                f"video_compression_mask drops {int((~mask.bool()).sum())} of {mask.numel()} "
                "video tokens (VideoLLaMA3's own differential frame pruning): ustc selects its "
                "budget over the full F x P grid; build the inputs with the processor's pruning "
                'off: processor(..., videos_kwargs={"use_token_compression": False})'
            )
        grid = kwargs.get("video_grid_thw")
        merges = kwargs.get("video_merge_sizes")
        if isinstance(video, MergedGridCall):  # generate() passed them to the encoder only
            grid = video.grid if grid is None else grid
            merges = video.merge_sizes if merges is None else merges
        if grid is None or merges is None or grid.dim() != 2 or merges.shape != grid.shape[:1]:
            raise ValueError(
                "video_grid_thw (B, 3) and video_merge_sizes (B,) must come with the video, got "
                f"{None if grid is None else tuple(grid.shape)} and "
                f"{None if merges is None else tuple(merges.shape)}"
            )
        if 0 < grid.shape[0] < rows and rows % grid.shape[0] == 0:
            # generate(num_return_sequences=r) repeats the prompts
            grid = grid.repeat_interleave(rows // grid.shape[0], dim=0)
            merges = merges.repeat_interleave(rows // merges.shape[0], dim=0)
        if grid.shape[0] != rows:
            raise ValueError(
                f"{grid.shape[0]} videos for {rows} prompts: exactly one video per prompt row is "
                "supported"
            )
        columns, counts = placeholder_columns(ids, self.model.config.video_token_id)
        frames, per_frame = [], []
        for (t, h, w), m, count in zip(grid.tolist(), merges.tolist(), counts, strict=True):
            if count != t * (h // m) * (w // m):
                raise ValueError(
                    f"{count} video placeholders for a grid of {t} x {h // m} x {w // m} tokens "
                    "(the processor writes one run of h*w/m^2 placeholders per frame, after its "
                    "'Time t s:' label)"
                )
            frames.append(t)
            per_frame.append((h // m) * (w // m))
        return VideoLayout(columns[:, 0], frames, per_frame, trailing=0, columns=columns)
