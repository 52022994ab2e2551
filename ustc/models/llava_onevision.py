"""LLaVA-OneVision and LLaVA-Video (``LlavaOnevisionForConditionalGeneration``).

Video path of the model: SigLIP on every frame (27 x 27 patches, no CLS), the hidden states of
``vision_feature_layer``, the projector, ``apply_pooling`` (bilinear 27 x 27 -> 14 x 14 = 196
tokens per frame for LLaVA-OneVision; checkpoints whose grid pools to 13 x 13 give LLaVA-Video's
169), then one ``image_newline`` after the whole video.  The prompt holds F*P + 1 video
placeholders; the LLM is Qwen2 with 1-D RoPE.

Eq. (1) scores come from the encoder layer whose output is the selected feature layer, reduced
frame by frame to the attention each patch receives, then pooled with the model's own
``apply_pooling``: pooling is linear per channel, so the score of a pooled token is the same
bilinear blend of its patches' scores as its features are of theirs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ustc.config import CompressionConfig
from ustc.models.attention import vision_received_attention, vit_queries_keys
from ustc.models.base import Handle, VideoCall, VideoLayout, vision_layer_index
from ustc.models.sequence import placeholder_runs


class LlavaOnevisionHandle(Handle):
    """Adapter for ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision, LLaVA-Video).

    vision_layer: index of the SigLIP encoder layer whose attention gives Eq. (1); by default the
    layer that produces ``config.vision_feature_layer`` (the last of the 26 kept layers for the
    llava-hf checkpoints).
    """

    #: what a subclass's projector does with the patch grid when it needs it square (the CLS row
    #: dropped: the 'default' select strategy), as "<family> <verb>"; None: any strategy
    square_grid: str | None = None
    #: the attention module of an encoder layer
    vision_attention = "self_attn"

    def __init__(
        self, model: nn.Module, config: CompressionConfig, vision_layer: int | None = None
    ) -> None:
        strategy = model.config.vision_feature_select_strategy
        if self.square_grid is not None and strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r}: {self.square_grid} a square "
                "patch grid, which only the 'default' strategy (CLS row dropped) gives"
            )
        self._feature_layer = model.config.vision_feature_layer
        self.vision_layer = self._resolve_vision_layer(model, vision_layer)
        super().__init__(model, config)

    @staticmethod
    def _encoder_layers(model: nn.Module) -> nn.ModuleList:
        tower = model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)
        return tower.encoder.layers

    def _resolve_vision_layer(self, model: nn.Module, vision_layer: int | None) -> int:
        count = len(self._encoder_layers(model))
        if vision_layer is None:
            if not isinstance(self._feature_layer, int):
                raise ValueError(
                    f"vision_feature_layer is a list ({self._feature_layer}); pass "
                    "vision_layer=<encoder layer index> to say which layer's attention gives "
                    "Eq. (1)"
                )
            # hidden_states[i] is the output of encoder layer i - 1 (hidden_states[0]: embeddings)
            index = self._feature_layer % (count + 1) - 1
            if index < 0:
                raise ValueError(
                    "vision_feature_layer selects the patch embeddings, which have no attention; "
                    "pass vision_layer=<encoder layer index>"
                )
            return index
        return vision_layer_index(vision_layer, count)

    def vision_hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        layer = self._encoder_layers(self.model)[self.vision_layer]
        return [self.score_hook(getattr(layer, self.vision_attention))]

    def vision_scores(
        self, module: nn.Module, hidden: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Tensor:
        """Reduce this layer's attention to one score per pooled token: (B*F, P) -- Eq. (1)."""
        q, k = vit_queries_keys(module, hidden)
        scores = vision_received_attention(q, k)  # (B*F, patches)
        if self.model.config.vision_feature_select_strategy == "default":
            scores = scores[:, 1:]  # the features drop the first token as well
        pooled = self.base_model().apply_pooling(scores.unsqueeze(-1).contiguous())
        return pooled.squeeze(-1)

    def video_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> VideoCall:
        # the first argument is named pixel_values_videos (>= 5.2x) or pixel_values (5.17)
        videos = args[0] if args else kwargs.get("pixel_values_videos", kwargs.get("pixel_values"))
        if kwargs.get("vision_feature_layer") not in (None, self._feature_layer):
            raise ValueError(
                "vision_feature_layer passed in the call differs from the model config the "
                "compressor was attached with; attach with vision_layer=... instead"
            )
        if not isinstance(videos, Tensor) or videos.dim() != 5:
            raise ValueError(
                "pixel_values_videos must be (B, F, C, H, W), got "
                f"{getattr(videos, 'shape', type(videos).__name__)}"
            )
        return VideoCall(batch=videos.shape[0], frames=videos.shape[1])

    def _video_runs(
        self, kwargs: dict[str, Any], video: VideoCall | None
    ) -> tuple[Tensor, Tensor, list[int]]:
        """input_ids, each row's first video placeholder and their count (one run per row)."""
        ids: Tensor = kwargs["input_ids"]
        starts, counts = placeholder_runs(ids, self.model.config.video_token_id)
        if video is not None and ids.shape[0] % video.batch:
            raise ValueError(
                f"{video.batch} videos for {ids.shape[0]} prompts: one video per prompt row"
            )
        return ids, starts, counts

    def video_layout(self, kwargs: dict[str, Any], video: VideoCall | None) -> VideoLayout:
        ids, starts, counts = self._video_runs(kwargs, video)
        if video is not None and video.frames is not None:
            frames = video.frames
        else:  # features precomputed elsewhere: P from the model's pooling of its patch grid
            grid = (
                self.model.config.vision_config.image_size
                // self.model.config.vision_config.patch_size
            )
            frames = (counts[0] - 1) // math.ceil(grid / 2) ** 2
        if frames < 1 or len(set(counts)) > 1 or (counts[0] - 1) % frames:
            raise ValueError(
                f"video placeholders per prompt row {counts} do not make F*P + 1 with F = "
                f"{frames} frames (one video per prompt row, the videos of a batch of one size)"
            )
        rows = ids.shape[0]
        return VideoLayout(starts, [frames] * rows, [(counts[0] - 1) // frames] * rows, trailing=1)
