"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``).

Video path of the model: frames are cut into 14 x 14 patches in pairs of frames (temporal patch
2), so one "frame" of features is a pair of input frames; the vision tower runs on all patches of
the video in a *window-permuted* order (most blocks attend inside windows, the blocks in
``fullatt_block_indexes`` attend over a whole frame pair); the patch merger joins each 2 x 2 group
of patches into one token, and the output is put back into (t, h/2, w/2) order with
``argsort(window_index)``.  The LLM uses 3-D M-RoPE positions (temporal, height, width).

Eq. (1) scores come from the last vision block (a full-attention block in the released models):
q and k are recomputed from its input with its own rotary embedding, the attention each patch
receives is reduced inside each attention segment the block uses (``cu_seqlens``), averaged over
the 2 x 2 patches the merger joins, and un-permuted exactly as the model un-permutes its features.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from ustc.config import CompressionConfig
from ustc.models.attention import vision_received_attention
from ustc.models.base import Handle, Session, VideoCall, VideoLayout, vision_layer_index
from ustc.models.sequence import placeholder_columns, placeholder_runs


class Qwen2_5_VLHandle(Handle):
    """Adapter for ``Qwen2_5_VLForConditionalGeneration``.

    vision_layer: index of the vision block whose attention gives Eq. (1); by default the last
    block, whose output the patch merger turns into the LLM's visual tokens.
    """

    #: a video's placeholders lie in several runs (Qwen3-VL: one per frame pair, timestamps
    #: between); Qwen2/2.5-VL write one run per video, and anything else is refused
    video_in_runs = False
    #: what the placeholder-count error adds about the processor's layout
    placeholder_note = ""
    #: the config attribute holding the id of the video placeholder token (GLM-4V writes a
    #: video's frames with its image placeholder)
    placeholder_token = "video_token_id"

    def __init__(self, model: nn.Module, config: CompressionConfig, vision_layer: int = -1) -> None:
        self.vision_layer = vision_layer_index(vision_layer, len(model.model.visual.blocks))
        self._window_index: Tensor | None = None
        super().__init__(model, config)

    def vision_hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        visual = self.base_model().visual
        return [self.tower_hook(visual), self.score_hook(visual.blocks[self.vision_layer].attn)]

    def vision_tower_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Remember the window permutation of this call (to un-permute the scores)."""
        grid = args[1] if len(args) > 1 else kwargs["grid_thw"]
        visual = self.base_model().visual
        config = visual.config
        self._window_index = _window_index(
            visual, grid, config.spatial_merge_size, config.window_size, config.patch_size
        )

    def vision_scores(
        self, module: nn.Module, hidden: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Tensor:
        """Reduce this block's attention to one score per merged token: (B*F, P) -- Eq. (1)."""
        length = hidden.shape[0]
        qkv = module.qkv(hidden).reshape(length, 3, module.num_heads, -1).permute(1, 0, 2, 3)
        scores = rotated_segment_scores(module, qkv[0], qkv[1], args, kwargs)  # (S,)
        unit = self.base_model().visual.spatial_merge_size ** 2
        merged = scores.view(-1, unit).mean(dim=-1)  # one score per 2 x 2 merger group
        return self._token_order(merged)

    def _token_order(self, merged: Tensor) -> Tensor:
        """Merged-group scores in the order of the model's features: un-permuted exactly as the
        model un-permutes its merger output, with ``argsort(window_index)``."""
        assert self._window_index is not None
        return merged[torch.argsort(self._window_index.to(merged.device))]

    def video_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> VideoCall:
        grid = args[1] if len(args) > 1 else kwargs.get("video_grid_thw")
        if not isinstance(grid, Tensor) or grid.dim() != 2 or grid.shape[1] != 3:
            raise ValueError(
                "pixel_values_videos need video_grid_thw (one (t, h, w) row per video), got "
                f"{getattr(grid, 'shape', grid)}"
            )
        return VideoCall(batch=grid.shape[0], grid=grid)

    def video_layout(self, kwargs: dict[str, Any], video: VideoCall | None) -> VideoLayout:
        ids: Tensor = kwargs["input_ids"]
        grid = kwargs.get("video_grid_thw")
        rows = ids.shape[0]
        if grid is None and video is not None:  # generate() passed it to the encoder only
            grid = video.grid
        if grid is not None and grid.dim() == 2 and 0 < grid.shape[0] < rows:
            if rows % grid.shape[0] == 0:  # generate(num_return_sequences=r) repeats the prompts
                grid = grid.repeat_interleave(rows // grid.shape[0], dim=0)
        if grid is None or grid.dim() != 2 or grid.shape[0] != rows:
            raise ValueError(
                "video_grid_thw must be (B, 3) with one video per prompt row, got "
                f"{None if grid is None else tuple(grid.shape)} for {rows} prompts"
            )
        if kwargs.get("mm_token_type_ids") is None:
            raise ValueError(
                f"{type(self.model).__name__} needs mm_token_type_ids (returned by the processor) "
                "to build the M-RoPE positions of the video; without them transformers silently "
                "uses 1-D positions"
            )
        merge = self.model.config.vision_config.spatial_merge_size
        token = getattr(self.model.config, self.placeholder_token)
        if self.video_in_runs:
            columns, counts = placeholder_columns(ids, token)
            starts, last = columns[:, 0], columns.amax(dim=1)
        else:
            columns = None
            starts, counts = placeholder_runs(ids, token)
            last = starts + torch.tensor(counts, device=starts.device) - 1
        frames, per_frame = [], []
        for (t, h, w), count in zip(grid.tolist(), counts, strict=True):
            if count != t * (h // merge) * (w // merge):
                raise ValueError(
                    f"{count} video placeholders for a grid of {t} x {h // merge} x {w // merge} "
                    f"tokens{self.placeholder_note}"
                )
            frames.append(t)
            per_frame.append((h // merge) * (w // merge))
        return VideoLayout(starts, frames, per_frame, self.trailing(ids, last), columns=columns)

    def trailing(self, ids: Tensor, last: Tensor) -> int:
        """Structural tokens right after each row's last placeholder (``last``, (B,)) that are
        not question text for the merger (``VideoLayout.trailing``): Qwen's <|vision_end|>."""
        vision_end = getattr(self.model.config, "vision_end_token_id", None)
        after = ids.gather(1, (last + 1).clamp(max=ids.shape[1] - 1)[:, None])[:, 0]
        return int(bool((last + 1 < ids.shape[1]).all()) and bool((after == vision_end).all()))

    def decode_positions(
        self, session: Session, length: int, batch: int, device: torch.device
    ) -> Tensor:
        # the model's own rule: 1-D position at the original length + the video's M-RoPE delta
        positions = torch.arange(session.seen, session.seen + length, device=device)
        positions = positions.view(1, 1, -1).expand(3, batch, -1)
        deltas = self.base_model().rope_deltas
        if deltas is None:
            return positions
        return positions + deltas.to(device).repeat_interleave(batch // deltas.shape[0], dim=0)


def rotated_segment_scores(
    attention: nn.Module, q: Tensor, k: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Tensor:
    """Eq. (1) of one call of a vision attention that attends inside segments (``cu_seqlens``:
    windows, frame pairs or frames) with a vision RoPE: ``q``, ``k`` (S, H, d) projected from
    the call's input in the tower's token order, rotated with the call's
    ``position_embeddings`` by the attention module's own ``apply_rotary_pos_emb_vision``.
    Returns (S,) float32, in the same order."""
    cu_seqlens = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
    cos, sin = kwargs["position_embeddings"]
    rope = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
    q, k = rope(q, k, cos, sin)
    return _segment_received_attention(q, k, cu_seqlens)


def _segment_received_attention(q: Tensor, k: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Eq. (1) inside each attention segment [cu[i], cu[i+1]) of a vision block.

    q, k: (S, H, d).  Returns (S,) float32.
    """
    bounds = cu_seqlens.tolist()
    lengths = {b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)}
    if len(lengths) == 1:  # equal segments (full-attention blocks: one per frame pair)
        size = lengths.pop()
        qs = q.reshape(-1, size, *q.shape[1:]).transpose(1, 2)
        ks = k.reshape(-1, size, *k.shape[1:]).transpose(1, 2)
        return vision_received_attention(qs, ks).reshape(-1)
    parts = [
        vision_received_attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None])[0]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(parts)


def _window_index(
    visual: nn.Module, grid: Tensor, merge: int, window_size: int, patch_size: int
) -> Tensor:
    """The vision tower's window permutation of the merger groups, as the model computes it."""
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:  # transformers without vision_utils keep it as a method of the tower
        return visual.get_window_index(grid)[0]
    return get_vision_window_index(grid, merge, window_size, patch_size)[0]
