"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024) as an in-LLM merger.

FastV does no external compression: every visual token enters the LLM, and at decoder layer K the
visual tokens are ranked by the attention the last token pays them; the top share R is kept and
the rest are DROPPED from every later layer (no merging).  Published setting: K = 2, R = 50 %;
the ustc paper's Tables 1-2 use K = 2 with keep shares 10/5/2/1 %.

    CompressionConfig(retention=1.0, merger="fastv", layer=2, keep_ratio=0.05)
"""

from __future__ import annotations

from torch import Tensor

from ustc.merging import LastTokenMerger, MergeResult, kept_result
from ustc.ops import sorted_indices, top_count_mask
from ustc.registry import MERGERS


def fastv_prune(visual: Tensor, last_token_attention: Tensor, count: int) -> MergeResult:
    """keep = top-count_i a_L(v_i),  a_L = A[last, visual]  (ties: lower index); the rest dropped.

    visual: (B, Nv, D) hidden states at layer K; last_token_attention: (B, Nv) head-averaged
    attention of the last prompt token to each visual token.  Returns the kept states unchanged
    (B, count, D), their positions ascending, and an assignment with -1 for dropped tokens.
    """
    keep = top_count_mask(last_token_attention.float(), count)
    return kept_result(visual, keep, sorted_indices(keep, count), -1)


@MERGERS.register("fastv")
class FastVMerger(LastTokenMerger):
    """FastV: keep the top ``keep_ratio`` of the visual tokens by the last token's attention at
    layer K (the last-token merger's ranking), drop the others (they leave the sequence; nothing
    is merged into the kept ones)."""

    def select(self, visual: Tensor, scores: Tensor, count: int) -> MergeResult:
        return fastv_prune(visual, scores, count)
