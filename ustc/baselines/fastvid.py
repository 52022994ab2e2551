"""FastVID-style density pruning (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video
Large Language Models", NeurIPS 2025).

For one video of F frames x P tokens and a per-frame budget q = budget / F:

1. DySeg, dynamic temporal segmentation.  g_t = mean of frame t's tokens; transition similarity
   c_t = cos(g_t, g_{t+1}).  The video is cut after the ``segments - 1`` frames of lowest c_t
   and after every frame with c_t < tau_seg, so there are at least ``segments`` segments (when
   F allows) and no segment spans a scene change.
2. STPrune, per frame: the q_s = floor(d * q) tokens of highest attention are salient and kept
   (ATS; d = ``salient_ratio``).
3. DTM, density-based token merging, per segment of L frames: the L * (q - q_s) contextual slots
   go to anchor frames (every ``anchor_stride``-th frame of the segment, the first included),
   shared evenly.  In an anchor frame the anchors are the non-salient tokens of highest DPC-KNN
   score gamma = rho * delta (Eq. 3-4, ``density_k`` neighbours within the frame, distances /
   sqrt(D) as FastVID).  Every non-salient token of the segment is merged into its most similar
   anchor (cosine), and the contextual token is
       c = alpha * v_anchor + (1 - alpha) * mean(members),  alpha = max(1 / (n + 1), alpha_0)
   with n the members (the anchor included) and alpha_0 = ``anchor_alpha``.

    CompressionConfig(method="fastvid", merger="none")
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ustc.baselines._common import (
    TopAttentionPerFrame,
    check_counts,
    check_unit_range,
    proportional_quota,
    result_from_owner,
    unit_vectors,
)
from ustc.ops import descending_order, group_sizes
from ustc.recycle import knn_log_density, peak_distance
from ustc.registry import METHODS
from ustc.results import CompressionResult

#: log gamma of a token with delta = 0 (a duplicate of a denser token): below every real value
_LOG_ZERO = torch.finfo(torch.float32).min / 2


def dyseg(global_features: Tensor, segments: int, tau: float) -> list[tuple[int, int]]:
    """Cut after the (segments - 1) lowest transitions and after every c_t < tau   -- DySeg

    global_features: (F, D), one vector per frame.  Ties among the lowest transitions: the
    earlier frame.  Returns [(first, last), ...] covering 0..F-1 in order.
    """
    f = global_features.shape[0]
    if f == 1:
        return [(0, 0)]
    unit = unit_vectors(global_features)
    transition = (unit[:-1] * unit[1:]).sum(dim=-1)  # (F - 1,)
    lowest = torch.sort(transition, stable=True).indices[: max(0, min(segments - 1, f - 1))]
    cuts = sorted(set(lowest.tolist()) | set((transition < tau).nonzero().flatten().tolist()))
    bounds = [-1, *cuts, f - 1]
    return [(bounds[i] + 1, bounds[i + 1]) for i in range(len(bounds) - 1)]


def density_scores(frames: Tensor, mask: Tensor, k: int) -> Tensor:
    """log gamma = log rho + log delta of DPC-KNN (Eq. 3-4) within each frame, over ``mask``.

    frames: (G, P, D), distances divided by sqrt(D) as FastVID's ``calc_density_score``; mask:
    (G, P) bool.  Returns (G, P) float32, -inf outside the mask.
    """
    scaled = frames.float() / math.sqrt(frames.shape[-1])
    log_rho = knn_log_density(scaled, mask, k)
    delta = peak_distance(scaled, mask, log_rho)
    log_gamma = torch.where(delta > 0, log_rho + delta.clamp(min=1e-30).log(), _LOG_ZERO)
    return log_gamma.masked_fill(~mask, float("-inf"))


@METHODS.register("fastvid")
class FastVID(TopAttentionPerFrame):
    """FastVID-style: DySeg segments, salient tokens by attention, density-based anchor merging.

    segments:      c, minimum number of segments (FastVID: 8).
    segment_tau:   tau, transition similarity below which a segment always ends (FastVID: 0.9).
    salient_ratio: d, share of each frame's budget kept by attention (FastVID: 0.4).
    anchor_stride: p, every p-th frame of a segment is an anchor frame (FastVID: 4).
    anchor_alpha:  alpha, minimum weight of the anchor in its contextual token (FastVID: 0.6).
    density_k:     neighbours of the DPC-KNN density (FastVID: 4).
    """

    def __init__(
        self,
        segments: int = 8,
        segment_tau: float = 0.9,
        salient_ratio: float = 0.4,
        anchor_stride: int = 4,
        anchor_alpha: float = 0.6,
        density_k: int = 4,
    ) -> None:
        check_counts(segments=segments, anchor_stride=anchor_stride, density_k=density_k)
        check_unit_range(
            ("segment_tau", segment_tau, -1.0),
            ("salient_ratio", salient_ratio, 0.0),
            ("anchor_alpha", anchor_alpha, 0.0),
        )
        self.segments = segments
        self.segment_tau = float(segment_tau)
        self.salient_ratio = float(salient_ratio)
        self.anchor_stride = anchor_stride
        self.anchor_alpha = float(anchor_alpha)
        self.density_k = density_k

    def split(self, per_frame: int) -> tuple[int, int]:
        """(salient q_s, contextual q - q_s) tokens per frame, q_s = floor(d * q) as FastVID."""
        salient = min(per_frame, math.floor(round(self.salient_ratio * per_frame, 9)))
        return salient, per_frame - salient

    def add_contextual(
        self, features: Tensor, salient: Tensor, contextual: int, budget: int
    ) -> CompressionResult:
        b, f, p, d = features.shape
        device = features.device
        frames = features.reshape(b * f, p, d)
        keep = salient.clone().view(b, f, p)
        owner = torch.full((b, f, p), -1, dtype=torch.long, device=device)
        if contextual > 0:
            gamma = density_scores(frames, ~salient, self.density_k).view(b, f, p)
            for i in range(b):  # segments and anchors differ per video
                self._merge_video(
                    features[i], gamma[i], salient.view(b, f, p)[i], contextual, keep[i], owner[i]
                )
        x = features.reshape(b, f * p, d)
        result = result_from_owner(x, keep.view(b, f * p), owner.view(b, f * p), budget)
        return self._weight_anchors(x, result, salient.view(b, f * p))

    def _merge_video(
        self,
        video: Tensor,
        gamma: Tensor,
        salient: Tensor,
        contextual: int,
        keep: Tensor,
        owner: Tensor,
    ) -> None:
        """DySeg + DTM of one video (F, P, D); fills ``keep`` and ``owner`` (F, P) in place."""
        f, p, d = video.shape
        positions = torch.arange(f * p, device=video.device).view(f, p)
        free = p - int(salient[0].sum())  # non-salient tokens per frame
        for a, e in dyseg(video.float().mean(dim=1), self.segments, self.segment_tau):
            length = e - a + 1
            stride = self.anchor_stride
            # fewer anchor frames than FastVID's stride gives only if they cannot hold the slots
            while stride > 1 and -(-length // stride) * free < length * contextual:
                stride -= 1
            anchor_frames = list(range(a, e + 1, stride))
            quotas = proportional_quota([free] * len(anchor_frames), length * contextual)
            anchors = torch.zeros(f, p, dtype=torch.bool, device=video.device)
            for t, count in zip(anchor_frames, quotas, strict=True):
                anchors[t, descending_order(gamma[t])[:count]] = True
            keep |= anchors
            members = ~salient[a : e + 1]  # (L, P)
            unit = unit_vectors(video[a : e + 1]).reshape(length * p, d)
            anchor_flat = anchors[a : e + 1].reshape(-1)
            sims = unit @ unit[anchor_flat].T  # (L*P, A)
            nearest = positions[a : e + 1].reshape(-1)[anchor_flat][sims.argmax(dim=1)]
            owner[a : e + 1] = torch.where(members, nearest.view(length, p), owner[a : e + 1])

    def _weight_anchors(
        self, x: Tensor, result: CompressionResult, salient: Tensor
    ) -> CompressionResult:
        """c = alpha * v_anchor + (1 - alpha) * mean(members), alpha = max(1/(n+1), alpha_0)."""
        b, m = result.indices.shape
        sizes = group_sizes(result.assignment, m).unsqueeze(-1).float()  # (B, M, 1)
        anchor = x.gather(1, result.indices.unsqueeze(-1).expand(b, m, x.shape[-1])).float()
        alpha = (1.0 / (sizes + 1.0)).clamp(min=self.anchor_alpha)
        weighted = alpha * anchor + (1.0 - alpha) * result.tokens.float()
        is_anchor = ~salient.gather(1, result.indices)
        tokens = torch.where(
            (is_anchor & result.merged).unsqueeze(-1), weighted.to(x.dtype), result.tokens
        )
        return dataclasses.replace(result, tokens=tokens)
