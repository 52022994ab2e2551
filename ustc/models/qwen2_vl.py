"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): Qwen2.5-VL without window attention.

Video path of the model: as Qwen2.5-VL (``ustc.models.qwen2_5_vl``): 14 x 14 patches in pairs of
frames (temporal patch 2, so one "frame" of features is a pair of input frames), a patch merger
that joins each 2 x 2 group of patches into one token, 3-D M-RoPE positions in the LLM.  What
differs: every vision block attends over a whole frame pair (``cu_seqlens`` cuts the patches of
the video into its frame pairs), and the patches stay in their natural (t, h, w) order -- there
is no window permutation to undo.

Eq. (1) scores come from the last vision block (the one whose output the merger turns into the
LLM's visual tokens): q and k recomputed from its input with its own rotary embedding, the
attention each patch receives inside its frame pair, averaged over the 2 x 2 patches the merger
joins, already in the order of the model's features.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ustc.models.qwen2_5_vl import Qwen2_5_VLHandle


class Qwen2VLHandle(Qwen2_5_VLHandle):
    """Adapter for ``Qwen2VLForConditionalGeneration``.

    vision_layer: index of the vision block whose attention gives Eq. (1); by default the last.
    Everything but the vision-token order is Qwen2.5-VL's (``Qwen2_5_VLHandle``).
    """

    def vision_hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        attention = self.base_model().visual.blocks[self.vision_layer].attn
        return [self.score_hook(attention)]

    def _token_order(self, merged: Tensor) -> Tensor:
        return merged  # no windows: the vision tower keeps the (t, h, w) order of the features
