"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024) as an in-LLM merger.

FastV does no external compression: every visual token enters the LLM, and at decoder layer K the
visual tokens are ranked by the attention the last token pays them; the top share R is kept and
the rest are DROPPED from every later layer (no merging).  Published setting: K = 2, R = 50 %;
the ustc paper's Tables 1-2 use K = 2 with keep shares 10/5/2/1 %.

    CompressionConfig(retention=1.0, merger="fastv", layer=2, keep_ratio=0.05)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ustc.merging import Merger, MergeResult, _check_merge_inputs
from ustc.ops import descending_order, first_n_mask, group_mean, slot_map, sorted_indices
from ustc.registry import MERGERS


def fastv_prune(visual: Tensor, last_token_attention: Tensor, count: int) -> MergeResult:
    """keep = top-count_i a_L(v_i),  a_L = A[last, visual]  (ties: lower index); the rest dropped.

    visual: (B, Nv, D) hidden states at layer K; last_token_attention: (B, Nv) head-averaged
    attention of the last prompt token to each visual token.  Returns the kept states unchanged
    (B, count, D), their positions ascending, and an assignment with -1 for dropped tokens.
    """
    b, nv, _ = visual.shape
    counts = torch.full((b,), count, dtype=torch.long, device=visual.device)
    keep = first_n_mask(descending_order(last_token_attention.float()), counts)
    indices = sorted_indices(keep, count)
    assignment = torch.where(keep, slot_map(indices, nv), -1)
    return MergeResult(group_mean(visual, assignment, indices), indices, assignment)


@MERGERS.register("fastv")
class FastVMerger(Merger):
    """FastV: keep the top ``keep_ratio`` of the visual tokens by the last token's attention at
    layer K, drop the others (they leave the sequence; nothing is merged into the kept ones)."""

    uses_attention = True

    def scores(
        self,
        visual: Tensor,
        text: Tensor,
        text_attention: Tensor | None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        if text_attention is None:
            raise ValueError(
                "merger 'fastv' needs the text-to-visual attention of layer K, got None"
            )
        return text_attention[:, -1].float()

    def merge(
        self,
        visual: Tensor,
        text: Tensor,
        text_attention: Tensor | None,
        count: int,
        text_mask: Tensor | None = None,
    ) -> MergeResult:
        """visual (B, Nv, D), text (B, Nq, D), text_attention (B, Nq, Nv): keep ``count``."""
        _check_merge_inputs(visual, text, text_attention, count, text_mask)
        return fastv_prune(visual, self.scores(visual, text, text_attention, text_mask), count)
