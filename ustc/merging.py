"""In-LLM merging at decoder layer K: text-aware (Eq. 5-10) and the last-token baseline.

The adapters call these on the visual hidden states entering layer K during prefill.  Inputs:

    visual:         (B, Nv, D) hidden states of the visual tokens
    text:           (B, Nq, D) hidden states of the text tokens after them (question + prompt)
    text_attention: (B, Nq, Nv) attention of the text rows to the visual columns at layer K,
                    softmax over the whole causal key set, averaged over heads (Eq. 1)
    text_mask:      (B, Nq) bool or None: False for the columns of a row whose text is shorter
                    than another row's (padded batches).  The text is right-aligned: column -1
                    is every row's last token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ustc.ops import group_mean, slot_map, sorted_indices, top_count_mask
from ustc.registry import MERGERS


@dataclass(frozen=True)
class MergeResult:
    """tokens: (B, Nk, D) merged visual states in original order; indices: (B, Nk) ascending
    positions (within the visual tokens) of the kept tokens; assignment: (B, Nv) long, the slot
    every visual token was merged into (a kept token's own slot for itself)."""

    tokens: Tensor
    indices: Tensor
    assignment: Tensor


def max_text_attention(text_attention: Tensor, text_mask: Tensor | None = None) -> Tensor:
    """A_qv = A[N'_v:, :N'_v];  A_m = max_{i=1..N_q} A_qv(i, :)   -- Eq. (5)-(6)

    text_attention: (B, Nq, Nv), i.e. A_qv already sliced; text_mask: (B, Nq) rows that count.
    Returns (B, Nv) float32.
    """
    attention = text_attention.float()
    if text_mask is not None:
        attention = attention.masked_fill(~text_mask[:, :, None], float("-inf"))
    return attention.amax(dim=1)


def min_max_normalize(x: Tensor) -> Tensor:
    """x_norm = (x - min x) / (max x - min x) over each row   -- Eq. (7)

    x: (B, Nv).  A constant row carries no ranking information and maps to zeros.
    """
    x = x.float()
    lo = x.amin(dim=-1, keepdim=True)
    span = x.amax(dim=-1, keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / span.clamp(min=torch.finfo(x.dtype).tiny), 0.0)


def max_text_similarity(visual: Tensor, text: Tensor, text_mask: Tensor | None = None) -> Tensor:
    """S_m(v_i) = max_{t in T} (v_i . t) / (||v_i|| ||t||)   -- Eq. (8)

    visual: (B, Nv, D); text: (B, Nq, D); text_mask: (B, Nq) tokens that count.
    Returns (B, Nv) float32.
    """
    v = torch.nn.functional.normalize(visual.float(), dim=-1)
    t = torch.nn.functional.normalize(text.float(), dim=-1)
    similarity = torch.bmm(v, t.transpose(1, 2))
    if text_mask is not None:
        similarity = similarity.masked_fill(~text_mask[:, None, :], float("-inf"))
    return similarity.amax(dim=-1)


def decision_score(attention_norm: Tensor, similarity_norm: Tensor, lam: float) -> Tensor:
    """I(v_i) = (1 - lambda) * A_m^norm(v_i) + lambda * S_m^norm(v_i)   -- Eq. (9)"""
    return (1.0 - lam) * attention_norm + lam * similarity_norm


def merge_into_kept(visual: Tensor, keep: Tensor, count: int) -> MergeResult:
    """r(j) = argmax_{v_k in V_retaining} (v_j . v_k) / (||v_j|| ||v_k||);  v~_k = mean(v_k, {v_j : r(j) = k})   -- Eq. (10)

    Each pruned token is averaged into its most similar kept token (ties: lower index); a kept
    token that absorbs several pruned tokens becomes the mean of all of them and itself.

    visual: (B, Nv, D); keep: (B, Nv) bool with ``count`` True per row.
    """
    indices = sorted_indices(keep, count)  # (B, Nk)
    b, _, d = visual.shape
    unit = torch.nn.functional.normalize(visual.float(), dim=-1)
    kept_unit = unit.gather(1, indices.unsqueeze(-1).expand(b, count, d))
    nearest_slot = torch.bmm(unit, kept_unit.transpose(1, 2)).argmax(dim=-1)  # (B, Nv)
    return kept_result(visual, keep, indices, nearest_slot)


def kept_result(visual: Tensor, keep: Tensor, indices: Tensor, pruned: Tensor | int) -> MergeResult:
    """The ``MergeResult`` of keeping ``keep`` (B, Nv) bool, at ``indices`` (B, Nk) ascending: a
    kept token goes to its own slot, a pruned one to ``pruned`` ((B, Nv) slots, or -1: dropped),
    and each slot is the mean of its tokens (Eq. 10's v~_k)."""
    assignment = torch.where(keep, slot_map(indices, visual.shape[1]), pruned)
    return MergeResult(group_mean(visual, assignment, indices), indices, assignment)


def select_and_merge(visual: Tensor, scores: Tensor, count: int) -> MergeResult:
    """Keep the top-``count`` tokens by ``scores`` (ties: lower index), merge the rest (Eq. 10)."""
    return merge_into_kept(visual, top_count_mask(scores, count), count)


class Merger:
    """Base class: ``scores`` ranks the visual tokens at layer K (higher = kept).

    ``text_mask`` (B, Nq) marks the text columns that count in each row (None: all); the text is
    right-aligned, so a merger that reads the last token takes column -1.
    """

    #: whether ``scores`` needs the text-to-visual attention of layer K
    uses_attention: ClassVar[bool] = True

    def scores(
        self,
        visual: Tensor,
        text: Tensor,
        text_attention: Tensor | None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def merge(
        self,
        visual: Tensor,
        text: Tensor,
        text_attention: Tensor | None,
        count: int,
        text_mask: Tensor | None = None,
    ) -> MergeResult:
        """Keep ``count`` visual tokens (Eq. 9 ranking), merge the others into them (Eq. 10)."""
        _check_merge_inputs(visual, text, text_attention, count, text_mask)
        return self.select(visual, self.scores(visual, text, text_attention, text_mask), count)

    def select(self, visual: Tensor, scores: Tensor, count: int) -> MergeResult:
        """Keep the top-``count`` visual tokens (B, Nv, D) by ``scores`` (B, Nv) and merge the
        others into them (Eq. 10); a baseline that drops them instead overrides this."""
        return select_and_merge(visual, scores, count)


def _check_merge_inputs(
    visual: Tensor,
    text: Tensor,
    text_attention: Tensor | None,
    count: int,
    text_mask: Tensor | None = None,
) -> None:
    if visual.dim() != 3 or text.dim() != 3 or visual.shape[0] != text.shape[0]:
        raise ValueError(
            f"visual and text must be (B, Nv, D) and (B, Nq, D), got {tuple(visual.shape)} and "
            f"{tuple(text.shape)}"
        )
    if text.shape[1] < 1:
        raise ValueError("in-LLM merging needs at least one text token after the visual tokens")
    if not 1 <= count <= visual.shape[1]:
        raise ValueError(f"tokens to keep must be in [1, {visual.shape[1]}], got {count}")
    if text_attention is not None and text_attention.shape != (
        visual.shape[0],
        text.shape[1],
        visual.shape[1],
    ):
        raise ValueError(
            f"text_attention must be (B, Nq, Nv) = {(visual.shape[0], text.shape[1], visual.shape[1])}, "
            f"got {tuple(text_attention.shape)}"
        )
    if text_mask is not None:
        if text_mask.shape != text.shape[:2] or text_mask.dtype != torch.bool:
            raise ValueError(
                f"text_mask must be a (B, Nq) = {tuple(text.shape[:2])} bool tensor, got "
                f"{tuple(text_mask.shape)} {text_mask.dtype}"
            )
        if not bool(text_mask[:, -1].all()):
            raise ValueError("text is right-aligned: text_mask[:, -1] must be True in every row")


def _need_attention(text_attention: Tensor | None, name: str) -> Tensor:
    if text_attention is None:
        raise ValueError(f"merger {name!r} needs the text-to-visual attention of layer K, got None")
    return text_attention


@MERGERS.register("none")
class NoMerger(Merger):
    """No in-LLM merging: every visual token goes through all layers."""

    uses_attention = False

    def scores(
        self,
        visual: Tensor,
        text: Tensor,
        text_attention: Tensor | None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        return torch.zeros(visual.shape[:2], device=visual.device)


@MERGERS.register("last-token")
class LastTokenMerger(Merger):
    """FastV / HoliTom criterion: the last token's attention to each visual token at layer K."""

    def scores(
        self,
        visual: Tensor,
        text: Tensor,
        text_attention: Tensor | None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        return _need_attention(text_attention, self.registered_name)[:, -1].float()


@MERGERS.register("text-aware")
class TextAwareMerger(Merger):
    """Text-aware merging (Eq. 5-10) with weight ``lam`` (lambda; the paper: 0.5)."""

    def __init__(self, lam: float = 0.5) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam (lambda) must be in [0, 1], got {lam}")
        self.lam = lam

    def scores(
        self,
        visual: Tensor,
        text: Tensor,
        text_attention: Tensor | None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        attention = min_max_normalize(
            max_text_attention(_need_attention(text_attention, "text-aware"), text_mask)
        )
        similarity = min_max_normalize(max_text_similarity(visual, text, text_mask))
        return decision_score(attention, similarity, self.lam)
