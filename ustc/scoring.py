"""Token scores for the retention pool: Eq. (1) attention, similarity, and their combination.

A scorer turns the visual tokens of a batch of videos into a *priority*: the order in which
candidates are offered to the retention pool (Eq. 2).  It also says whether the pool applies the
redundancy filter of Eq. (2): that filter is the "Sim" column of Table 5, so it belongs to the
scorer's name (``attn`` = attention only, ``attn+sim`` = attention order, redundancy filtered).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from ustc.registry import SCORERS

#: queries per chunk when reducing attention maps: H x chunk x N floats live at once
ATTENTION_CHUNK = 1024


def attention_probs(q: Tensor, k: Tensor) -> Tensor:
    """A_h = Softmax(Q_h K_h^T / sqrt(d))   -- Eq. (1)

    q: (..., H, Nq, d), k: (..., H, Nk, d).  Returns (..., H, Nq, Nk) in float32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)  # no second copy
    return logits.softmax(dim=-1)


def mean_received_attention(q: Tensor, k: Tensor, chunk: int = ATTENTION_CHUNK) -> Tensor:
    """s_j = 1/(N-1) * sum_{i != j} A_avg[i, j],  A_avg = mean_h A_h   -- Eq. (1), encoders without CLS

    The paper's "equivalent CLS attention" for SigLIP: the mean attention each token receives from
    all other tokens of its frame, averaged over heads.  Computed over query chunks, so only
    (B, H, chunk, N) attention weights exist at once.  The softmax is not normalised element by
    element: with E = exp(logits - row max) and z its row sums, sum_h sum_i A_h[i, j] / H is
    sum_h sum_i (1 / (H z_hi)) E_hij, one vector-matrix product per head over E, which reads the
    (N x N) weights once instead of the three passes of normalising, averaging and summing them.

    q, k: (B, H, N, d) queries and keys of one encoder layer.  Returns (B, N) float32.
    """
    _check_qk(q, k)
    b, h, n, d = q.shape
    scaled = q.float() * (1.0 / math.sqrt(d))  # the scale on (N x d), not on (N x N)
    keys = k.float().transpose(-1, -2)
    received = torch.zeros(b, h, 1, n, dtype=torch.float32, device=q.device)
    for start in range(0, n, chunk):
        weights = torch.matmul(scaled[:, :, start : start + chunk], keys)  # (B, H, c, N) logits
        weights = weights.sub_(weights.amax(-1, keepdim=True)).exp_()
        # 1 / (H z_hi): the softmax's normaliser and the mean over heads, one factor per row
        factor = weights.sum(-1, keepdim=True).mul_(h).reciprocal_()
        rows = torch.arange(start, start + weights.shape[2], device=q.device)
        # the diagonal is a token attending to itself: not "received from others"
        weights[:, :, rows - start, rows] = 0.0
        received += torch.matmul(factor.transpose(-1, -2), weights)
    return received.sum(1)[:, 0] / max(n - 1, 1)


def cls_attention(q: Tensor, k: Tensor, cls_index: int = 0) -> Tensor:
    """s_j = A_avg[cls, j],  A_avg = mean_h A_h   -- Eq. (1), encoders with a CLS token

    q, k: (B, H, N, d).  Returns (B, N - 1) float32: the CLS row without the CLS column itself.
    """
    _check_qk(q, k)
    n = q.shape[2]
    if not -n <= cls_index < n:
        raise ValueError(f"cls_index must be in [{-n}, {n}), got {cls_index}")
    cls_index %= n
    row = attention_probs(q[:, :, cls_index : cls_index + 1], k).mean(dim=1)[:, 0]  # (B, N)
    keep = torch.arange(n, device=q.device) != cls_index
    return row[:, keep]


def _check_qk(q: Tensor, k: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be (B, H, N, d), got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}"
        )


#: entries of a (B, rows, D) block of ``redundancy``'s products
_PRODUCT_ROWS = 1 << 22


def redundancy(features: Tensor) -> Tensor:
    """u_i = cos(v_i, mean_j v_j / ||v_j||) = (1/N) sum_j cos(v_i, v_j) up to a positive factor

    How much a token repeats the rest of its video: its mean cosine similarity to all tokens,
    computed in O(N D) through the mean of the unit vectors (no N x N matrix).

    features: (B, N, D).  Returns (B, N) float32.  The products go row block by row block
    (the same values): one N x D temporary besides the unit vectors is 0.7 GiB at 256 x 196
    tokens of width 3584.
    """
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    mean = unit.mean(dim=1, keepdim=True)
    out = torch.empty(unit.shape[:2], device=unit.device)
    step = max(1, _PRODUCT_ROWS // max(1, unit.shape[0] * unit.shape[2]))
    for start in range(0, unit.shape[1], step):
        rows = slice(start, start + step)
        out[:, rows] = (unit[:, rows] * mean).sum(dim=-1)
    return out


class Scorer:
    """Base class: ``score`` returns the candidate priority (higher = offered to the pool first)."""

    #: whether ``score`` needs per-token vision attention scores
    uses_attention: ClassVar[bool] = False
    #: whether the retention pool applies the tau redundancy filter of Eq. (2)
    filters_redundancy: ClassVar[bool] = False

    def score(self, features: Tensor, attention: Tensor | None) -> Tensor:
        """features: (B, N, D); attention: (B, N) or None.  Returns (B, N) priorities."""
        raise NotImplementedError


@SCORERS.register("attn")
class AttentionScorer(Scorer):
    """Attention only (Table 5, row "Attn"): the top tokens by Eq. (1), no redundancy filter."""

    uses_attention = True

    def score(self, features: Tensor, attention: Tensor | None) -> Tensor:
        if attention is None:
            raise ValueError(
                f"scorer {self.registered_name!r} needs per-token attention scores (Eq. 1), got None"
            )
        return attention.float()


@SCORERS.register("sim")
class SimilarityScorer(Scorer):
    """Redundancy only (Table 5, row "Sim"): no attention at all.

    Candidates are offered least-redundant first (lowest mean cosine similarity to the video,
    ``redundancy``) and admitted through the tau filter of Eq. (2).  Without attention some order
    is needed; this one is the same criterion as the filter, and has no positional bias.
    """

    filters_redundancy = True

    def score(self, features: Tensor, attention: Tensor | None) -> Tensor:
        return -redundancy(features)


@SCORERS.register("attn+sim")
class CombinedScorer(AttentionScorer):
    """The paper's criterion: candidates in Eq. (1) attention order, filtered by Eq. (2)."""

    filters_redundancy = True
