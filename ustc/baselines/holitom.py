"""HoliTom-style staged compression (Shao et al., "HoliTom: Holistic Token Merging for Fast Video
Large Language Models", NeurIPS 2025): temporal segmentation, temporal merging, then spatial
pruning within each segment.  HoliTom's inner-LLM stage (last-token attention at layer K, pruned
tokens merged into their most similar kept token) is ustc's ``last-token`` merger.

For one video of F frames x P tokens:

1. Temporal similarity.  s_t(p) = cos(v_{t,p}, v_{t+1,p}) for every position p of adjacent frames;
   position p is *static* over frames [a, e] when s_t(p) > tau_t for every t in [a, e - 1].
2. Segmentation (dynamic programming, as HoliTom's ``select_static_windows``).  A segment [a, e]
   saves g(a, e) = |{p static over [a, e]}| * (e - a) tokens; the partition of the frames into
   segments of at most ``max_window`` frames maximising sum g is found exactly:
       dp(i) = max( dp(i - 1),  max_{2 <= i - a + 1 <= max_window} dp(a - 1) + g(a, i) ).
3. Temporal merging.  In each segment, every static position becomes one token, the mean over the
   segment's frames, placed at the segment's first frame; the other (dynamic) tokens stay.
4. Spatial pruning within segments.  The budget is shared over the groups (each segment's static
   tokens, each frame's dynamic tokens) in proportion to their sizes -- HoliTom rescales its
   retention ratio by the tokens the temporal merge removed, which is the same allocation up to
   rounding.  Dynamic tokens of a frame: the top by attention are kept, the rest dropped
   (HoliTom's default D = 0: no contextual tokens).  Static tokens of a segment: DPC-KNN
   (``density_k`` neighbours, distances / sqrt(D) as HoliTom) picks the centres, every static
   token is merged into its nearest centre.

    CompressionConfig(method="holitom", merger="last-token", keep_ratio=0.5)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ustc.baselines._common import (
    check_method_inputs,
    proportional_quota,
    result_from_owner,
    unit_vectors,
)
from ustc.ops import descending_order
from ustc.recycle import dpc_knn
from ustc.registry import METHODS
from ustc.results import CompressionResult


def adjacent_similarity(features: Tensor) -> Tensor:
    """s_t(p) = cos(v_{t,p}, v_{t+1,p})   -- per position, adjacent frames

    features: (F, P, D).  Returns (F - 1, P) float32.
    """
    unit = unit_vectors(features)
    return (unit[:-1] * unit[1:]).sum(dim=-1)


def window_gains(static: Tensor) -> list[list[int]]:
    """g(a, e) = |{p : static[t, p] for all t in [a, e - 1]}| * (e - a), for all a <= e.

    static: (F - 1, P) bool, static[t, p] = s_t(p) > tau.  Returns an F x F list (0 for a >= e).
    """
    f = static.shape[0] + 1
    gains = [[0] * f for _ in range(f)]
    for a in range(f - 1):
        still = torch.cumprod(static[a:].long(), dim=0).sum(dim=1).tolist()  # ends a+1 .. f-1
        for offset, count in enumerate(still):
            e = a + 1 + offset
            gains[a][e] = int(count) * (e - a)
    return gains


def segment_frames(static: Tensor, max_window: int) -> list[tuple[int, int]]:
    """The partition of the F frames into segments [a, e] maximising sum g(a, e) (step 2).

    Ties keep the earlier choice (the single frame, then shorter windows), as HoliTom's loop.
    static: (F - 1, P) bool.  Returns [(a, e), ...] covering 0..F-1 in order.
    """
    f = static.shape[0] + 1
    gains = window_gains(static)
    best = [0] * f
    start = [0] * f
    for i in range(f):
        value, first = (best[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            a = i - size + 1
            candidate = (best[a - 1] if a > 0 else 0) + gains[a][i]
            if candidate > value:
                value, first = candidate, a
        best[i], start[i] = value, first
    segments = []
    i = f - 1
    while i >= 0:
        segments.append((start[i], i))
        i = start[i] - 1
    return segments[::-1]


@METHODS.register("holitom")
class HoliTom:
    """HoliTom-style: DP temporal segmentation, temporal merging of static tokens, spatial
    pruning within segments (attention for dynamic tokens, DPC-KNN for static ones).

    temporal_tau: tau, cosine similarity above which a token is static between adjacent frames
                  (HoliTom: 0.8).
    max_window:   longest segment in frames (HoliTom: 1024, i.e. unbounded).
    density_k:    neighbours of the DPC-KNN density for static tokens (HoliTom: K = 7).
    """

    #: the in-LLM stage as published (HoliTom's inner-LLM stage: last-token attention at layer K, R = 50 %);
    #: applied by ``run.py --method`` unless --merger is given (ustc.registry.method_in_llm)
    in_llm = {"merger": "last-token", "keep_ratio": 0.5}

    uses_attention = True

    def __init__(
        self, temporal_tau: float = 0.8, max_window: int = 1024, density_k: int = 7
    ) -> None:
        if not isinstance(temporal_tau, (int, float)) or not -1.0 <= temporal_tau <= 1.0:
            raise ValueError(f"temporal_tau must be in [-1, 1], got {temporal_tau!r}")
        for name, value in (("max_window", max_window), ("density_k", density_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.temporal_tau = float(temporal_tau)
        self.max_window = max_window
        self.density_k = density_k

    def segments(self, video: Tensor) -> tuple[list[tuple[int, int]], Tensor]:
        """Segments of one video (F, P, D) and the (F - 1, P) static mask they come from."""
        static = adjacent_similarity(video) > self.temporal_tau
        return segment_frames(static, self.max_window), static

    def compress(
        self, features: Tensor, attention: Tensor | None, budget: int
    ) -> CompressionResult:
        """features: (B, F, P, D); attention: (B, F, P).  Returns ``budget`` tokens per video."""
        b, f, p, d = check_method_inputs("holitom", features, attention, budget, True)
        assert attention is not None
        keep = torch.zeros(b, f * p, dtype=torch.bool, device=features.device)
        owner = torch.full((b, f * p), -1, dtype=torch.long, device=features.device)
        # the segmentation differs per video, so videos are handled one at a time
        for i in range(b):
            keep[i], owner[i] = self._video(features[i], attention[i], budget)
        return result_from_owner(features.reshape(b, f * p, d), keep, owner, budget)

    def _video(self, video: Tensor, attention: Tensor, budget: int) -> tuple[Tensor, Tensor]:
        """keep (N,) and owner (N,) of one video (F, P, D) with attention (F, P)."""
        f, p, d = video.shape
        device = video.device
        segments, static = self.segments(video)
        static_masks = [
            static[a:e].all(dim=0) if e > a else torch.zeros(p, dtype=torch.bool, device=device)
            for a, e in segments
        ]
        counts = [int(m.sum()) for m in static_masks]
        candidates = sum(
            c + (e - a + 1) * (p - c) for c, (a, e) in zip(counts, segments, strict=True)
        )
        if candidates < budget:
            # the temporal merge alone left fewer tokens than the budget (a near-static video at
            # a high retention): skip it, so that exactly ``budget`` tokens still come out
            segments = [(t, t) for t in range(f)]
            static_masks = [torch.zeros(p, dtype=torch.bool, device=device)] * f
            counts = [0] * f
        sizes: list[int] = []
        for count, (a, e) in zip(counts, segments, strict=True):
            sizes.append(count)
            sizes.extend([p - count] * (e - a + 1))
        quotas = iter(proportional_quota(sizes, budget))
        keep = torch.zeros(f, p, dtype=torch.bool, device=device)
        owner = torch.full((f, p), -1, dtype=torch.long, device=device)
        positions = torch.arange(f * p, device=device).view(f, p)
        for mask, (a, e) in zip(static_masks, segments, strict=True):
            n_static = next(quotas)
            if n_static > 0:
                means = video[a : e + 1, mask].float().mean(dim=0)  # (S, D) temporal merge
                columns = mask.nonzero().squeeze(1)
                centre = self._static_clusters(means, n_static)  # (S,) index of the centre
                keep[a, columns[centre.unique()]] = True
                owner[a : e + 1, columns] = positions[a, columns[centre]]
            # static tokens of a segment that received no slot are dropped (owner stays -1)
            for t in range(a, e + 1):
                n_dynamic = next(quotas)
                score = attention[t].float().masked_fill(mask, float("-inf"))
                chosen = descending_order(score)[:n_dynamic]
                keep[t, chosen] = True
                owner[t, chosen] = positions[t, chosen]
        return keep.reshape(-1), owner.reshape(-1)

    def _static_clusters(self, means: Tensor, count: int) -> Tensor:
        """DPC-KNN over the static tokens (S, D): for each, the index of its centre (S,) long."""
        s, d = means.shape
        if count >= s:
            return torch.arange(s, device=means.device)
        scaled = (means / math.sqrt(d)).unsqueeze(0)  # HoliTom's distances are divided by sqrt(D)
        mask = torch.ones(1, s, dtype=torch.bool, device=means.device)
        n = torch.tensor([count], device=means.device)
        return dpc_knn(scaled, mask, n, self.density_k).owner[0]
