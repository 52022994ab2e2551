"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
Models", CVPR 2025), applied frame by frame to a video.

Per frame of P tokens with a per-frame budget q = budget / F:

1. dominant tokens: the q_d = q - q_c tokens with the highest attention (for encoders without CLS
   the mean attention each token receives, Eq. 1 of the ustc paper);
2. contextual tokens: of the P - q_d remaining tokens, q_c targets are taken uniformly
   (every ``step``-th remaining token, step = max(1, (P - q_d) // q_c)), and every other remaining
   token is merged into the target it is most similar to (cosine); a contextual token is the mean
   of its target and the tokens merged into it.

q_c = round(contextual_ratio * q); VisionZip's published splits are 54 + 10, 108 + 20 and
162 + 30 dominant + contextual tokens (contextual share 10/64 = 0.15625).

    CompressionConfig(method="visionzip", merger="none")
"""

from __future__ import annotations

import torch
from torch import Tensor

from ustc.baselines._common import (
    TopAttentionPerFrame,
    nearest_kept,
    result_from_owner,
    unit_vectors,
)
from ustc.ops import round_half_up
from ustc.registry import METHODS
from ustc.results import CompressionResult

#: VisionZip's published split: 10 contextual tokens of 64 (also 20 of 128, 30 of 192)
CONTEXTUAL_SHARE = 10 / 64


def contextual_targets(remaining: Tensor, count: int) -> Tensor:
    """Uniform targets among the remaining tokens: ranks 0, s, 2s, ... (first ``count``), s =
    max(1, L // count), as VisionZip's code picks them.

    remaining: (G, P) bool, L = the same number of True per row.  Returns (G, P) bool with
    ``count`` True per row (no targets when count = 0).
    """
    g, p = remaining.shape
    if count == 0:
        return torch.zeros_like(remaining)
    length = int(remaining[0].sum())
    step = max(1, length // count)
    rank = torch.cumsum(remaining.long(), dim=1) - 1  # rank of each remaining token, in order
    return remaining & (rank % step == 0) & (rank < step * count)


@METHODS.register("visionzip")
class VisionZip(TopAttentionPerFrame):
    """VisionZip per frame: dominant tokens by attention + contextual tokens merged by similarity.

    contextual_ratio: share of each frame's budget spent on contextual tokens (published 10/64).
    """

    def __init__(self, contextual_ratio: float = CONTEXTUAL_SHARE) -> None:
        if not isinstance(contextual_ratio, (int, float)) or not 0.0 <= contextual_ratio <= 1.0:
            raise ValueError(f"contextual_ratio must be in [0, 1], got {contextual_ratio!r}")
        self.contextual_ratio = float(contextual_ratio)

    def split(self, per_frame: int) -> tuple[int, int]:
        """(dominant q_d, contextual q_c) tokens of a frame with ``per_frame`` = q output tokens."""
        contextual = min(per_frame, round_half_up(self.contextual_ratio * per_frame))
        return per_frame - contextual, contextual

    def add_contextual(
        self, features: Tensor, dominant_mask: Tensor, contextual: int, budget: int
    ) -> CompressionResult:
        b, f, p, d = features.shape
        g = b * f
        device = features.device
        frames = features.reshape(g, p, d)
        targets = contextual_targets(~dominant_mask, contextual)
        keep = dominant_mask | targets
        if contextual > 0:
            merged = ~keep
            owner = nearest_kept(unit_vectors(frames), targets, merged)
        else:  # no contextual token: the remaining tokens are dropped
            owner = torch.full((g, p), -1, dtype=torch.long, device=device)
        offset = (torch.arange(g, device=device) % f * p).unsqueeze(1)
        owner = torch.where(owner >= 0, owner + offset, -1)
        return result_from_owner(
            features.reshape(b, f * p, d), keep.reshape(b, f * p), owner.reshape(b, f * p), budget
        )
