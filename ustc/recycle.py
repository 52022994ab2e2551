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
    centered,
    density_from_distances,
    descending_order,
    distance_from_squared,
    exact_nearest_rows,
    first_n_mask,
    gram_rounding,
    nearest_denser_listed,
    pairwise_squared_distances,
    row_blocks,
    squared_distances,
    squared_norms,
)
from ustc.registry import RECYCLERS
from ustc.screening import screen_each, screening_applies

#: largest N x N distance matrix kept for the density and delta passes (N <= 8192)
GRAM_CACHE_ENTRIES = 1 << 26

#: log gamma of tokens with delta = 0 (a duplicate of a denser token): below every real value
_LOG_ZERO = torch.finfo(torch.float32).min / 2


#: the conventions of Eq. (3)-(4): the paper as printed, or the DPC-KNN of TCFormer that HoliTom,
#: FlashVID and FastVID build on (docs/equations.md, "The peers' DPC-KNN")
CONVENTIONS = ("paper", "tcformer")


@dataclass(frozen=True)
class Recycled:
    """centers: (B, N) bool, the tokens that become output tokens;
    owner: (B, N) long, the center index each recycle-pool token is merged into, -1 if dropped."""

    centers: Tensor
    owner: Tensor


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(
            f"convention must be one of {', '.join(map(repr, CONVENTIONS))}, got {convention!r}"
        )


def _scale(features: Tensor, convention: str) -> float:
    """The factor on squared distances: 1, or 1 / D for TCFormer's d / sqrt(D)."""
    return 1.0 / features.shape[-1] if convention == "tcformer" else 1.0


class _Distances:
    """The rounded squared distances of one batch, and what measures them exactly: the centred
    features ``xc`` (``ops.centered``), their rounding bound per row (``ops.gram_rounding``) and
    row blocks of the Gram matrix to the other members (``pool_distances``), slices of ``d2``
    when it is given."""

    def __init__(self, features: Tensor, mask: Tensor, d2: Tensor | None) -> None:
        # measured in float32: one conversion here, not one per block (bf16 inputs)
        self.features, self.mask, self.d2 = features.float(), mask, d2
        self.xc = centered(features, mask)
        self.rounding = gram_rounding(squared_norms(self.xc), mask)
        self.positions = torch.arange(features.shape[1], device=features.device)

    def blocks(self) -> Iterator[tuple[slice, Tensor]]:
        """(rows, (B, r, N) rounded squared distances, +inf where ``pool_distances`` has it)
        over row blocks."""
        n = self.features.shape[1]
        for rows in row_blocks(n, n):
            if self.d2 is None:
                yield (
                    rows,
                    _others_only(squared_distances(self.xc[:, rows], self.xc), self.mask, rows),
                )
            else:
                yield rows, self.d2[:, rows]

    def nearest(
        self, v: int, rows: Tensor, gram: Tensor, allowed: Tensor | None, count: int, largest: bool
    ) -> tuple[Tensor, Tensor]:
        """``ops.exact_nearest_rows`` for rows (R,) of video v, gram and allowed (R, N) (None:
        the finite entries of gram)."""
        return exact_nearest_rows(
            self.features[v],
            self.xc[v],
            rows,
            self.positions,
            gram,
            allowed,
            count,
            self.rounding[v, rows],
            largest,
        )


def pool_distances(features: Tensor, mask: Tensor) -> Tensor:
    """(B, N, N) rounded squared distances of the centred features from each token to the other
    members of the recycle pool, as ``knn_log_density`` and ``peak_distance`` take them (``d2``):
    +inf at the columns of non-members and on the diagonal, the columns no token may take as a
    neighbour (set once here, not masked again by every pass)."""
    return _others_only(pairwise_squared_distances(centered(features, mask)), mask, slice(0, None))


def _others_only(d2: Tensor, mask: Tensor, rows: slice) -> Tensor:
    """d2 (B, r, N), the distances of the rows ``rows``, with +inf at non-member columns and at
    each row's own column, in place."""
    d2.masked_fill_(~mask.unsqueeze(1), float("inf"))
    d2.diagonal(offset=rows.start, dim1=1, dim2=2).fill_(float("inf"))
    return d2


def knn_log_density(
    features: Tensor, mask: Tensor, k: int, d2: Tensor | None = None, convention: str = "paper"
) -> Tensor:
    """log rho_i = -(1/k) sum_{v_j in kNN(v_i)} d(v_i, v_j)^2   -- Eq. (3)

    kNN(v_i): the k nearest other members of the recycle pool (Euclidean d).  With fewer than k
    other members, all of them; a lone member has log rho = 0.  ``convention="tcformer"``: the k
    nearest include v_i itself (distance 0) and d is divided by sqrt(D).  The neighbours are
    chosen on rounded distances of the centred features and their distances measured from the
    differences (``ops.exact_nearest_rows``): exact to float32.  In row blocks.

    features: (B, N, D); mask: (B, N) bool, membership of the recycle pool; d2: optional (B, N, N)
    ``pool_distances(features, mask)`` already computed.  Returns (B, N) float32; -inf outside
    the pool.
    """
    return _knn(features, mask, k, d2, convention)[0]


def _knn(
    features: Tensor, mask: Tensor, k: int, d2: Tensor | None, convention: str
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """``knn_log_density``, and each token's neighbours: their measured squared distances
    (B, N, k'), ascending, and positions (B, N, k'), -1 past the pool (None for k' = 0)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_convention(convention)
    b, n, _ = features.shape
    others = min(k - 1 if convention == "tcformer" else k, n - 1)
    out = torch.full((b, n), float("-inf"), device=features.device)
    if others == 0:
        return out.masked_fill(mask, 0.0), None
    near_d2 = torch.full((b, n, others), float("inf"), device=features.device)
    near_at = torch.full((b, n, others), -1, dtype=torch.long, device=features.device)
    dist = _Distances(features, mask, d2)
    for rows, block in dist.blocks():
        for v in range(b):
            local = _local(mask[v, rows].nonzero().squeeze(1), rows)
            if local is None:
                continue
            # the finite entries of the block are the allowed neighbours: no mask to build
            nearest, at = dist.nearest(
                v, local.positions, block[v, local.index], None, others, largest=False
            )
            nearest, at = nearest[local.keep], at[local.keep]
            out[v, local.asked] = density_from_distances(
                nearest, convention, _scale(features, convention)
            )
            near_d2[v, local.asked], near_at[v, local.asked] = nearest, at
    return out.masked_fill(~mask, float("-inf")), (near_d2, near_at)


@dataclass(frozen=True)
class _Rows:
    """Which rows of a block a pass computes: ``index`` into the block (a slice where that is
    most of it, so that the (r, N) block is a view, not a copy) and their token ``positions``;
    the rows that were asked for are ``keep`` of them, at token positions ``asked``."""

    index: Tensor | slice
    positions: Tensor
    keep: Tensor | slice
    asked: Tensor


def _local(local: Tensor, rows: slice) -> _Rows | None:
    """The rows ``local`` (ascending indices into a block of ``rows``), None if there are none.
    When they are at least 3/4 of the block, every row is computed and the others dropped after:
    each row's result depends on that row alone, and a row costs less than a copy of the block."""
    if local.numel() == 0:
        return None
    size = rows.stop - rows.start
    if 4 * local.numel() >= 3 * size:
        positions = torch.arange(rows.start, rows.stop, device=local.device)
        keep = slice(None) if local.numel() == size else local
        return _Rows(slice(None), positions, keep, rows.start + local)
    return _Rows(local, rows.start + local, slice(None), rows.start + local)


def _density_rank(log_rho: Tensor) -> Tensor:
    """(B, N) long: each token's place in Eq. (4)'s order, densest first, equal densities by
    index (``ops.denser_than``: j is denser than i iff rank[j] < rank[i])."""
    order = descending_order(log_rho)
    rank = torch.empty_like(order)
    return rank.scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )


def peak_distance(
    features: Tensor,
    mask: Tensor,
    log_rho: Tensor,
    d2: Tensor | None = None,
    convention: str = "paper",
) -> Tensor:
    """delta_i = min_{j: rho_j > rho_i} d(v_i, v_j), or max_{j != i} d(v_i, v_j) for the densest  -- Eq. (4)

    Equal densities are ordered by index (lower index = denser), so exactly one token per video
    is the densest.  ``convention="tcformer"``: d divided by sqrt(D), and the densest token's
    delta is the largest distance of the whole pool, not of its own row.  The decisive distances
    are measured from the differences (``ops.exact_nearest_rows``).  features: (B, N, D); mask,
    log_rho: (B, N); d2 as for ``knn_log_density``.  Returns (B, N) float32, 0 outside the pool
    and for a lone member.
    """
    return _peak_distance(features, mask, log_rho, d2, convention, None)


def _peak_distance(
    features: Tensor,
    mask: Tensor,
    log_rho: Tensor,
    d2: Tensor | None,
    convention: str,
    neighbours: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """``peak_distance``; with ``neighbours`` (``_knn``'s), a token with a denser one among its k
    nearest takes delta from the nearest such: every token outside that list is at least as far
    as its k-th neighbour, so it cannot be nearer, and the list's distances are the measured ones,
    the bits the full pass would measure.  Only the other rows (the local density peaks) are
    searched over the whole pool."""
    _check_convention(convention)
    b, n, _ = features.shape
    scale = _scale(features, convention)
    out = torch.zeros(b, n, device=features.device)
    farthest_rounded = torch.zeros(b, n, device=features.device)  # each row's largest, rounded
    dist = _Distances(features, mask, d2)
    # non-members rank after every member, so a member's denser tokens are members and only the
    # densest member (rank 0) has none
    rank = _density_rank(log_rho.masked_fill(~mask, float("-inf")))
    done = torch.zeros(b, n, dtype=torch.bool, device=features.device)
    if neighbours is not None:
        near_d2, near_at = neighbours
        their_rank = rank.gather(1, near_at.clamp(min=0).flatten(1)).view_as(near_at)
        listed, found = nearest_denser_listed(near_d2, near_at, their_rank, rank)
        done = listed & mask
        out = torch.where(done, distance_from_squared(found.clamp(min=0.0), scale), out)
    for rows, block in dist.blocks():
        if convention == "tcformer":
            farthest_rounded[:, rows] = block.masked_fill(block == float("inf"), 0.0).amax(-1)
        for v in range(b):
            member = mask[v, rows]
            has_denser = rank[v, rows] > 0
            local = _local((member & has_denser & ~done[v, rows]).nonzero().squeeze(1), rows)
            if local is not None:
                denser = rank[v].unsqueeze(0) < rank[v, local.positions].unsqueeze(1)
                nearest, _ = dist.nearest(
                    v, local.positions, block[v, local.index], denser, 1, largest=False
                )
                d = distance_from_squared(nearest[:, 0].clamp(min=0.0), scale)
                out[v, local.asked] = d[local.keep]
            peak = (member & ~has_denser).nonzero().squeeze(1)
            if peak.numel() == 0 or convention == "tcformer":
                continue
            # the densest token: the farthest other member (a row, not r x N)
            gram = block[v, peak]
            nearest, _ = dist.nearest(
                v, rows.start + peak, gram, gram != float("inf"), 1, largest=True
            )
            out[v, rows.start + peak] = distance_from_squared(nearest[:, 0].clamp(min=0.0), scale)
    if convention == "tcformer":
        out = _pool_diameter(dist, log_rho, farthest_rounded, out, scale)
    return out.masked_fill(~mask, 0.0)


def _pool_diameter(
    dist: _Distances, log_rho: Tensor, farthest_rounded: Tensor, out: Tensor, scale: float
) -> Tensor:
    """TCFormer's delta of each video's densest token: the largest distance of its pool, measured
    on every row whose rounded largest distance could be it."""
    mask = dist.mask
    for v in range(mask.shape[0]):
        members = mask[v].nonzero().squeeze(1)
        if members.numel() < 2:
            continue
        key = log_rho[v].masked_fill(~mask[v], float("-inf"))
        densest = descending_order(key.unsqueeze(0))[0, 0]
        top = farthest_rounded[v, members].max()
        slack = 2.0 * dist.rounding[v, members].max()
        rows = members[farthest_rounded[v, members] >= top - slack]
        allowed = mask[v].unsqueeze(0) & (dist.positions != rows.unsqueeze(1))
        gram = squared_distances(dist.xc[v : v + 1, rows], dist.xc[v : v + 1])[0]
        nearest, _ = dist.nearest(v, rows, gram, allowed, 1, largest=True)
        out[v, densest] = distance_from_squared(nearest[:, 0].max().clamp(min=0.0), scale)
    return out


def nearest_center(
    features: Tensor,
    mask: Tensor,
    centers: Tensor,
    xc: Tensor | None = None,
    sq: Tensor | None = None,
) -> Tensor:
    """owner_i = argmin_{c in centers} d(v_i, v_c) for members of ``mask``, -1 elsewhere.

    Centers own themselves (a duplicate of a lower-index center would otherwise leave its own
    cluster empty); distance ties go to the lower center index.  A video without centers (a
    cluster share of 0) drops its members (-1), as recycler ``none`` does.  The nearest center
    is chosen on rounded distances of the centred features and confirmed on distances measured
    from the differences (``ops.exact_nearest_rows``).  xc: ``ops.centered(features, mask)``
    and sq (B, N) its ``ops.squared_norms`` when the caller has them.  (B, N) long.
    """
    b, n, _ = features.shape
    owner = torch.full((b, n), -1, dtype=torch.long, device=features.device)
    xc = centered(features, mask) if xc is None else xc
    sq = squared_norms(xc) if sq is None else sq
    rounding = gram_rounding(sq, mask)
    for v in range(b):
        center_pos = centers[v].nonzero().squeeze(1)
        members = mask[v].nonzero().squeeze(1)
        if center_pos.numel() == 0 or members.numel() == 0:
            continue
        center_x = xc[v, center_pos]
        center_sq = sq[v, center_pos].unsqueeze(1)
        x = features[v].float()  # one conversion per video, not per block
        for block in row_blocks(n, center_pos.numel()):
            # (C, r): the centers as the rows of the product, the faster orientation on the CPU;
            # every token of the block, not a gathered copy of the members (a fresh copy of
            # N x D floats costs more than the products of the few non-members)
            gram = torch.addmm(center_sq, center_x, xc[v, block].T, alpha=-2.0)
            gram = gram.add_(sq[v, block]).clamp_(min=0.0)
            inside = mask[v, block]
            rows = block.start + inside.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            gram = gram[:, inside].T
            allowed = torch.ones_like(gram, dtype=torch.bool)
            _, position = exact_nearest_rows(
                x,
                xc[v],
                rows,
                center_pos,
                gram,
                allowed,
                1,
                rounding[v, rows],
                measure=False,
            )
            owner[v, rows] = position[:, 0]
    own = torch.arange(n, device=features.device).expand(b, n)
    owner = torch.where(centers & mask, own, owner)
    return owner.masked_fill(~mask, -1)


def dpc_knn(
    features: Tensor, mask: Tensor, n_clusters: Tensor, k: int, convention: str = "paper"
) -> Recycled:
    """DPC-KNN on the recycle pool (Eq. 3-4): gamma_i = rho_i * delta_i, the top-gamma tokens are
    centers, every member joins its nearest center.

    features: (B, N, D); mask: (B, N) bool recycle-pool membership; n_clusters: (B,) long, at most
    the pool size per video (more is clipped: every member becomes its own center; 0 drops the
    pool); convention: ``paper`` (Eq. 3-4 as printed) or ``tcformer`` (the peers' reading, see
    ``knn_log_density`` and ``peak_distance``).  Each video's result depends on that video alone:
    screening (``ustc.screening``) is decided per video, and both paths measure the same
    distances the same way.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_convention(convention)
    b = features.shape[0]
    log_rho = torch.full(mask.shape, float("-inf"), device=features.device)
    delta = torch.zeros(mask.shape, device=features.device)
    dense = list(range(b))
    # the centred features and their squared norms, computed once for screening and the
    # nearest centres
    xc = sq = None
    if convention == "paper" and screening_applies(features, mask, k):
        # large pools on the CPU: see ustc.screening; a video it declines takes the dense path
        xc = centered(features, mask)
        sq = squared_norms(xc)
        screened = screen_each(features, mask, k, xc, sq)
        for v, result in enumerate(screened):
            if result is not None:
                log_rho[v], delta[v] = result
        dense = [v for v, result in enumerate(screened) if result is None]
    if dense:
        pick = torch.tensor(dense, device=features.device)
        x, m = features.index_select(0, pick), mask.index_select(0, pick)
        n = features.shape[1]
        # one Gram matrix serves both passes when it is small enough to keep
        d2 = pool_distances(x, m) if n * n <= GRAM_CACHE_ENTRIES else None
        rho, neighbours = _knn(x, m, k, d2, convention)
        log_rho[pick], delta[pick] = rho, _peak_distance(x, m, rho, d2, convention, neighbours)
    log_gamma = torch.where(delta > 0, log_rho + delta.clamp(min=1e-30).log(), _LOG_ZERO)
    log_gamma = log_gamma.masked_fill(~mask, float("-inf"))
    counts = torch.minimum(n_clusters, mask.sum(-1))
    centers = first_n_mask(descending_order(log_gamma), counts) & mask
    return Recycled(centers=centers, owner=nearest_center(features, mask, centers, xc, sq))


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
    """DPC-KNN (Eq. 3-4) with ``k`` neighbours for the local density.

    convention: ``paper`` (default), Eq. 3-4 as printed: plain Euclidean distances, the k
    nearest other tokens, the densest token's delta its own farthest distance.  ``tcformer``:
    the DPC-KNN of TCFormer that HoliTom, FlashVID and FastVID use: distances divided by
    sqrt(D), the token itself among its k nearest, the densest token's delta the largest
    distance of the pool (without their random noise: ties by index).  docs/equations.md.
    """

    def __init__(self, k: int = 5, convention: str = "paper") -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (DPC-KNN neighbours) must be an integer >= 1, got {k!r}")
        _check_convention(convention)
        self.k = k
        self.convention = convention

    def recycle(
        self, features: Tensor, mask: Tensor, n_slots: Tensor, priority: Tensor | None
    ) -> Recycled:
        return dpc_knn(features, mask, n_slots, self.k, self.convention)
