"""The recycle pool, Eq. (3)-(4): DPC-KNN clustering of the tokens the retention pool did not take.

Densities are handled as log rho: rho = exp(-mean d^2) underflows to 0 for every token once
features have LLM-scale norms, which would make every density equal.  Ranking by log rho, and by
log gamma = log rho + log delta, is the same ranking as by rho and gamma = rho * delta.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ustc.ops import (
    denser_than,
    descending_order,
    first_n_mask,
    pairwise_squared_distances,
    peak_from_distances,
    row_blocks,
    squared_distances,
)
from ustc.registry import RECYCLERS
from ustc.screening import screen, screening_applies

#: largest N x N distance matrix kept for the density and delta passes (N <= 8192)
GRAM_CACHE_ENTRIES = 1 << 26

#: log gamma of tokens with delta = 0 (a duplicate of a denser token): below every real value
_LOG_ZERO = torch.finfo(torch.float32).min / 2


@dataclass(frozen=True)
class Recycled:
    """centers: (B, N) bool, the tokens that become output tokens;
    owner: (B, N) long, the center index each recycle-pool token is merged into, -1 if dropped."""

    centers: Tensor
    owner: Tensor


def _distance_blocks(features: Tensor, d2: Tensor | None) -> Iterator[tuple[slice, Tensor]]:
    """(rows, (B, r, N) squared distances) over row blocks: slices of ``d2`` when it is given."""
    n = features.shape[1]
    for rows in row_blocks(n, n):
        if d2 is None:
            yield rows, squared_distances(features[:, rows], features)
        else:
            yield rows, d2[:, rows].clone()


def knn_log_density(features: Tensor, mask: Tensor, k: int, d2: Tensor | None = None) -> Tensor:
    """log rho_i = -(1/k) sum_{v_j in kNN(v_i)} d(v_i, v_j)^2   -- Eq. (3)

    kNN(v_i): the k nearest other members of the recycle pool (Euclidean d).  With fewer than k
    other members, all of them; a lone member has log rho = 0.  Computed in row blocks.

    features: (B, N, D); mask: (B, N) bool, membership of the recycle pool; d2: optional (B, N, N)
    squared distances already computed.  Returns (B, N) float32; -inf outside the pool.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    b, n, _ = features.shape
    k_eff = max(1, min(k, n - 1))
    out = torch.full((b, n), float("-inf"), device=features.device)
    col_ok = mask.unsqueeze(1)
    for rows, block in _distance_blocks(features, d2):
        self_col = torch.arange(rows.start, rows.stop, device=features.device)
        block[:, self_col - rows.start, self_col] = float("inf")
        block = block.masked_fill_(~col_ok, float("inf"))
        nearest = block.topk(k_eff, dim=-1, largest=False).values  # (B, r, k_eff)
        finite = torch.isfinite(nearest)
        count = finite.sum(-1)
        mean = torch.where(finite, nearest, 0.0).sum(-1) / count.clamp(min=1)
        out[:, rows] = -mean
    return out.masked_fill(~mask, float("-inf"))


def _denser(log_rho: Tensor, rows: slice) -> Tensor:
    """(B, r, N) bool: token j is denser than token i (Eq. 4, ``ops.denser_than``)."""
    idx = torch.arange(log_rho.shape[1], device=log_rho.device)
    return denser_than(
        log_rho[:, rows].unsqueeze(-1), idx[rows].unsqueeze(-1), log_rho.unsqueeze(1), idx
    )


def peak_distance(
    features: Tensor, mask: Tensor, log_rho: Tensor, d2: Tensor | None = None
) -> Tensor:
    """delta_i = min_{j: rho_j > rho_i} d(v_i, v_j), or max_{j != i} d(v_i, v_j) for the densest  -- Eq. (4)

    Equal densities are ordered by index (lower index = denser), so exactly one token per video
    is the densest.  features: (B, N, D); mask, log_rho: (B, N).  Returns (B, N) float32, 0
    outside the pool and for a lone member.
    """
    b, n, _ = features.shape
    out = torch.zeros(b, n, device=features.device)
    col_ok = mask.unsqueeze(1)
    for rows, block in _distance_blocks(features, d2):
        d = block.sqrt_()
        out[:, rows] = peak_from_distances(d, _denser(log_rho, rows) & col_ok, col_ok)
    return out.masked_fill(~mask, 0.0)


def nearest_center(features: Tensor, mask: Tensor, centers: Tensor) -> Tensor:
    """owner_i = argmin_{c in centers} d(v_i, v_c) for members of ``mask``, -1 elsewhere.

    Centers own themselves (a duplicate of a lower-index center would otherwise leave its own
    cluster empty); distance ties go to the lower center index.  Distances are taken to the
    centers only: (B, C, N) in blocks.  (B, N) long.
    """
    b, n, d = features.shape
    n_centers = max(1, int(centers.sum(-1).max()))
    center_idx = descending_order(centers.to(torch.uint8))[:, :n_centers]  # ascending index first
    center_ok = centers.gather(1, center_idx)  # padding columns of videos with fewer centers
    center_x = features.gather(1, center_idx.unsqueeze(-1).expand(b, n_centers, d))
    owner = torch.full((b, n), -1, dtype=torch.long, device=features.device)
    for rows in row_blocks(n, n_centers):
        # (B, C, r): the centers as the rows of the product, the faster orientation on the CPU
        d2 = squared_distances(center_x, features[:, rows])
        d2 = d2.masked_fill_(~center_ok.unsqueeze(-1), float("inf"))
        owner[:, rows] = center_idx.gather(1, d2.argmin(1))
    own = torch.arange(n, device=features.device).expand(b, n)
    owner = torch.where(centers, own, owner)
    return owner.masked_fill(~mask, -1)


def dpc_knn(features: Tensor, mask: Tensor, n_clusters: Tensor, k: int) -> Recycled:
    """DPC-KNN on the recycle pool (Eq. 3-4): gamma_i = rho_i * delta_i, the top-gamma tokens are
    centers, every member joins its nearest center.

    features: (B, N, D); mask: (B, N) bool recycle-pool membership; n_clusters: (B,) long, at most
    the pool size per video (more is clipped: every member becomes its own center).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    screened = screen(features, mask, k) if screening_applies(features, mask, k) else None
    if screened is not None:  # large pools on the CPU: see ustc.screening
        log_rho, delta = screened
    else:
        n = features.shape[1]
        # one Gram matrix serves both passes when it is small enough to keep
        d2 = pairwise_squared_distances(features) if n * n <= GRAM_CACHE_ENTRIES else None
        log_rho = knn_log_density(features, mask, k, d2)
        delta = peak_distance(features, mask, log_rho, d2)
    log_gamma = torch.where(delta > 0, log_rho + delta.clamp(min=1e-30).log(), _LOG_ZERO)
    log_gamma = log_gamma.masked_fill(~mask, float("-inf"))
    counts = torch.minimum(n_clusters, mask.sum(-1))
    centers = first_n_mask(descending_order(log_gamma), counts) & mask
    return Recycled(centers=centers, owner=nearest_center(features, mask, centers))


class Recycler:
    """Base class: turns the recycle pool into ``n_slots[b]`` extra output tokens per video."""

    def recycle(
        self, features: Tensor, mask: Tensor, n_slots: Tensor, priority: Tensor | None
    ) -> Recycled:
        """features (B, N, D); mask (B, N) recycle pool; n_slots (B,); priority (B, N) or None."""
        raise NotImplementedError


@RECYCLERS.register("none")
class NoRecycler(Recycler):
    """Drop the recycle pool.  Slots the retention pool left empty (fewer than capacity passed
    tau) are filled with the highest-priority rejected tokens, so the budget is always met."""

    def recycle(
        self, features: Tensor, mask: Tensor, n_slots: Tensor, priority: Tensor | None
    ) -> Recycled:
        if priority is None:
            priority = torch.zeros(mask.shape, device=mask.device)
        key = priority.float().masked_fill(~mask, float("-inf"))
        centers = first_n_mask(descending_order(key), n_slots) & mask
        own = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        return Recycled(centers=centers, owner=torch.where(centers, own, -1))


@RECYCLERS.register("dpc")
class DPCKNNRecycler(Recycler):
    """DPC-KNN (Eq. 3-4) with ``k`` neighbours for the local density."""

    def __init__(self, k: int = 5) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (DPC-KNN neighbours) must be an integer >= 1, got {k!r}")
        self.k = k

    def recycle(
        self, features: Tensor, mask: Tensor, n_slots: Tensor, priority: Tensor | None
    ) -> Recycled:
        return dpc_knn(features, mask, n_slots, self.k)
