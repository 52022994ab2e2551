"""FlashVID-style compression (Fan et al., "FlashVID: Efficient Video Large Language Models via
Training-free Tree-based Spatiotemporal Token Merging", ICLR 2026; code:
github.com/Fanziyang-v/FlashVID, ``flashvid/utils.py`` and ``flashvid/token_selection.py``).

For one video of F frames x P tokens and a per-frame budget q = budget / F, of which
q_a = ceil(alpha * q) tokens go to ADTS and q_s = q - q_a to the merged (TSTM) tokens:

1. DySeg, as FastVID (``ustc.baselines.fastvid.dyseg``): cut after the ``segments - 1`` lowest
   transition similarities of the frames' mean tokens and after every one below ``segment_tau``.
2. ADTS, attention and diversity based token selection, per frame: with the attention-calibrated
   cosine distance  d~(i, j) = (1 - cos(v_i, v_j)) * a_j  (a_j the token's Eq. 1 score), q_a
   tokens are chosen greedily, max-min:
       first:  j* = argmax_j min_{i != j} d~(i, j)
       then:   j* = argmax_{j not in S} min_{i in S} d~(i, j).
3. TSTM, tree-based spatiotemporal merging, per segment, over the tokens ADTS left (free):
   a free token of frame t > first is linked to its most similar (cosine) free token of frame
   t - 1 when that similarity exceeds ``temporal_tau``; the links form trees whose roots lie in
   the earliest frame of each chain.  At most L * (P - q) links are made (the most similar
   first), so that at least L * q_s roots remain (FlashVID's lower bound).  A tree becomes one
   token, the mean of its members, at its root.
4. Spatial merging of the roots: the segment's L * q_s slots are shared over its frames, one
   for every frame with a root and the rest in proportion to the roots (``frame_slots``); in
   each frame DPC-KNN (TCFormer's reading, the one FlashVID uses: distances / sqrt(D), k =
   ``density_k``) picks the centres among the tree tokens and every root joins its nearest
   centre.  An output token is the mean of its trees' means.

Where this differs from FlashVID's code (exact budget, no 1.25x expansion and in-LLM pruning,
k = 7 for every frame, ties by index): docs/baselines.md.

    CompressionConfig(method="flashvid", merger="none")
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import Tensor

from ustc.baselines._common import (
    check_counts,
    check_method_inputs,
    check_unit_range,
    per_frame_budget,
    proportional_quota,
    result_from_owner,
    unit_vectors,
)
from ustc.baselines.fastvid import dyseg
from ustc.ops import descending_order
from ustc.recycle import dpc_knn
from ustc.registry import METHODS
from ustc.results import CompressionResult


def adts(unit: Tensor, attention: Tensor, count: int) -> Tensor:
    """Greedy max-min selection on d~(i, j) = (1 - cos(v_i, v_j)) * a_j   -- FlashVID's ADTS

    first j* = argmax_j min_{i != j} d~(i, j), then j* = argmax_{j not in S} min_{i in S} d~(i, j);
    ties go to the lower index.  unit: (G, P, D) unit vectors; attention: (G, P); count in
    [0, P].  Returns (G, P) bool with ``count`` True per row.  Memory (G, P, P).
    """
    g, p, _ = unit.shape
    chosen = torch.zeros(g, p, dtype=torch.bool, device=unit.device)
    if count == 0:
        return chosen
    dist = (1.0 - torch.bmm(unit, unit.transpose(1, 2))) * attention.float().unsqueeze(1)
    eye = torch.eye(p, dtype=torch.bool, device=unit.device)
    rows = torch.arange(g, device=unit.device)
    pick = dist.masked_fill(eye, float("inf")).amin(dim=1).argmax(dim=1)  # first maximum
    chosen[rows, pick] = True
    closest = dist[rows, pick]  # (G, P): min over the chosen i of d~(i, j)
    for _ in range(count - 1):
        pick = closest.masked_fill(chosen, float("-inf")).argmax(dim=1)
        chosen[rows, pick] = True
        closest = torch.minimum(closest, dist[rows, pick])
    return chosen


def temporal_links(unit: Tensor, free: Tensor) -> tuple[Tensor, Tensor]:
    """For every free token of frames 1..L-1, its most similar free token of the previous frame.

    unit: (L, P, D) unit vectors of one segment; free: (L, P) bool.  Returns ``similarity``
    (L, P) float32, -inf in frame 0, for tokens that are not free and where the previous frame
    has no free token, and ``parent`` (L, P) long, the column of that token in frame t - 1
    (ties: lower column).  Memory (L, P, P).
    """
    length, p, _ = unit.shape
    similarity = torch.full((length, p), float("-inf"), device=unit.device)
    parent = torch.zeros(length, p, dtype=torch.long, device=unit.device)
    if length > 1:
        sims = torch.bmm(unit[1:], unit[:-1].transpose(1, 2))  # (L-1, P, P): [t, n, m]
        sims = sims.masked_fill(~free[:-1].unsqueeze(1), float("-inf"))
        parent[1:] = sims.argmax(dim=-1)
        best = sims.gather(-1, parent[1:].unsqueeze(-1)).squeeze(-1)
        similarity[1:] = best.masked_fill(~free[1:], float("-inf"))
    return similarity, parent


def frame_slots(roots: list[int], slots: int) -> list[int]:
    """Each frame's share of a segment's ``slots`` merged tokens, from its ``roots`` counts.

    FlashVID gives frame t ceil(roots_t * slots / sum roots), at least one token for every frame
    with a root, and may exceed ``slots``.  Here every frame with a root gets one first (when the
    slots allow; there are L * q_s >= L of them whenever merging runs), and the rest is shared in
    proportion to the remaining roots (largest remainder), so the shares sum to
    ``min(slots, sum roots)`` exactly.
    """
    first = [min(count, 1) for count in roots]
    if sum(first) > slots:
        return proportional_quota(roots, slots)
    rest = proportional_quota(
        [c - f for c, f in zip(roots, first, strict=True)], slots - sum(first)
    )
    return [f + r for f, r in zip(first, rest, strict=True)]


def tree_roots(similarity: Tensor, parent: Tensor, tau: float, max_links: int) -> Tensor:
    """The root of every token's tree in one segment (L, P): its position t * P + n.

    A token is linked to its parent when its similarity exceeds ``tau`` and it is among the
    ``max_links`` most similar such tokens (ties: lower position); a token that is not linked is
    its own root.  Returns (L, P) long positions within the segment.
    """
    length, p = similarity.shape
    flat = similarity.reshape(-1)
    linked = torch.zeros(length * p, dtype=torch.bool, device=similarity.device)
    linked[descending_order(flat.unsqueeze(0))[0, :max_links]] = True
    linked = (linked & (flat > tau)).view(length, p)
    roots = torch.arange(length * p, device=similarity.device).view(length, p)
    for t in range(1, length):  # a chain reaches back through every earlier frame
        roots[t] = torch.where(linked[t], roots[t - 1, parent[t]], roots[t])
    return roots


@METHODS.register("flashvid")
class FlashVID:
    """FlashVID-style: DySeg segments, ADTS selection per frame, tree-based spatiotemporal merging
    of the rest with DPC-KNN spatial merging of the trees.

    segments:        minimum number of segments (FlashVID: ``min_segment_num`` 8).
    segment_tau:     transition similarity below which a segment always ends (FlashVID: 0.9).
    selection_ratio: alpha, share of each frame's budget chosen by ADTS (FlashVID: 0.7).
    temporal_tau:    cosine similarity above which a token joins its parent's tree (FlashVID: 0.8).
    density_k:       neighbours of the DPC-KNN density (FlashVID: at most 7, see ``_spatial``).
    """

    #: vision-side only at the given budget (see docs/baselines.md for FlashVID's in-LLM stage)
    in_llm: ClassVar[dict[str, str]] = {"merger": "none"}

    uses_attention = True

    def __init__(
        self,
        segments: int = 8,
        segment_tau: float = 0.9,
        selection_ratio: float = 0.7,
        temporal_tau: float = 0.8,
        density_k: int = 7,
    ) -> None:
        check_counts(segments=segments, density_k=density_k)
        check_unit_range(
            ("segment_tau", segment_tau, -1.0),
            ("selection_ratio", selection_ratio, 0.0),
            ("temporal_tau", temporal_tau, -1.0),
        )
        self.segments = segments
        self.segment_tau = float(segment_tau)
        self.selection_ratio = float(selection_ratio)
        self.temporal_tau = float(temporal_tau)
        self.density_k = density_k

    def split(self, per_frame: int) -> tuple[int, int]:
        """(ADTS q_a, merged q_s) tokens per frame, q_a = ceil(alpha * q) as FlashVID."""
        selected = min(per_frame, math.ceil(round(self.selection_ratio * per_frame, 9)))
        return selected, per_frame - selected

    def compress(
        self, features: Tensor, attention: Tensor | None, budget: int
    ) -> CompressionResult:
        """features: (B, F, P, D); attention: (B, F, P).  Returns ``budget`` tokens per video."""
        b, f, p, d = check_method_inputs("flashvid", features, attention, budget, True)
        assert attention is not None
        selected, merged = self.split(per_frame_budget("flashvid", budget, f))
        unit = unit_vectors(features).reshape(b * f, p, d)
        chosen = adts(unit, attention.reshape(b * f, p), selected).view(b, f, p)
        keep = chosen.clone()
        owner = torch.full((b, f, p), -1, dtype=torch.long, device=features.device)
        weight = torch.ones(b, f, p, device=features.device)
        if merged > 0:
            unit = unit.view(b, f, p, d)
            for i in range(b):  # segments differ per video
                self._merge_video(
                    features[i],
                    unit[i],
                    ~chosen[i],
                    selected + merged,
                    keep[i],
                    owner[i],
                    weight[i],
                )
        x = features.reshape(b, f * p, d)
        result = result_from_owner(x, keep.view(b, f * p), owner.view(b, f * p), budget)
        return tree_weighted(x, result, weight.view(b, f * p))

    def _merge_video(
        self,
        video: Tensor,
        unit: Tensor,
        free: Tensor,
        per_frame: int,
        keep: Tensor,
        owner: Tensor,
        weight: Tensor,
    ) -> None:
        """TSTM and spatial merging of one video (F, P, D) with unit vectors ``unit`` and the
        tokens ADTS left ``free`` (F, P), q = ``per_frame``; fills ``keep``, ``owner`` and
        ``weight`` (F, P) in place (``weight``: 1 / size of the token's tree)."""
        f, p, d = video.shape
        n = f * p
        merged = per_frame - (p - int(free[0].sum()))  # q_s: ADTS chose the same count per frame
        roots = torch.arange(n, device=video.device).view(f, p)
        quotas: list[int] = []
        for a, e in dyseg(video.float().mean(dim=1), self.segments, self.segment_tau):
            similarity, parent = temporal_links(unit[a : e + 1], free[a : e + 1])
            links = (e - a + 1) * (p - per_frame)
            local = tree_roots(similarity, parent, self.temporal_tau, links)  # (L, P)
            roots[a : e + 1] = a * p + local
            own = local.view(-1) == torch.arange(local.numel(), device=video.device)
            counts = (own.view_as(local) & free[a : e + 1]).sum(dim=1).tolist()
            quotas += frame_slots(counts, (e - a + 1) * merged)
        # the trees of the whole video at once: their sizes and means at their roots' positions
        roots, members = roots.view(-1), free.view(-1)
        sizes = torch.zeros(n, device=video.device).index_add_(
            0, roots[members], torch.ones(int(members.sum()), device=video.device)
        )
        is_root = (roots == torch.arange(n, device=video.device)) & members
        trees = torch.zeros(n, d, device=video.device)
        trees.index_add_(0, roots[members], video.reshape(n, d)[members].float())
        trees = trees / sizes.clamp(min=1).unsqueeze(-1)
        centre = self._spatial(trees.view(f, p, d), is_root.view(f, p), quotas)  # (F, P)
        # a token's output: the centre its tree's root joined (-1: the root was dropped)
        target = centre.view(-1)[roots]
        position = torch.where(target >= 0, (roots // p) * p + target, -1)
        owner.copy_(torch.where(free, position.view(f, p), owner))
        keep |= centre == torch.arange(p, device=video.device)
        weight.copy_(torch.where(free, 1.0 / sizes[roots].clamp(min=1).view(f, p), 1.0))

    def _spatial(self, trees: Tensor, roots: Tensor, quotas: list[int]) -> Tensor:
        """DPC-KNN of each frame's roots: for every root the column of its centre in the same
        frame, -1 elsewhere (and for roots of a frame that received no slot, see ``frame_slots``).

        trees: (F, P, D) tree means at the roots' positions; roots: (F, P) bool; quotas: output
        tokens per frame.  All frames in one call, with k = ``density_k`` (FlashVID's code takes
        k = min(clusters, 7): with one cluster its density is constant and its random tie-break
        noise picks the centre; docs/baselines.md).  Returns (F, P) long.
        """
        n = torch.tensor(quotas, device=trees.device)
        return dpc_knn(trees, roots, n, self.density_k, convention="tcformer").owner


def tree_weighted(x: Tensor, result: CompressionResult, weight: Tensor) -> CompressionResult:
    """Output tokens as weighted means sum_i w_i x_i / sum_i w_i over their members.

    With w_i = 1 / |tree of i| a token is the plain mean of its trees' means (FlashVID's spatial
    merge averages the trees it joins, whatever their sizes).  x: (B, N, D); weight: (B, N).
    """
    b, m = result.indices.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    slot = result.assignment.clamp(min=0)
    w = torch.where(result.assignment >= 0, weight.to(dtype), 0.0)
    sums = torch.zeros(b, m, x.shape[-1], dtype=dtype, device=x.device)
    sums.scatter_add_(1, slot.unsqueeze(-1).expand_as(x), w.unsqueeze(-1) * x.to(dtype))
    total = torch.zeros(b, m, dtype=dtype, device=x.device).scatter_add_(1, slot, w)
    return dataclasses.replace(result, tokens=(sums / total.unsqueeze(-1)).to(x.dtype))
