"""The retention pool, Eq. (2): greedy admission under a cosine-similarity threshold tau."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ustc.ops import descending_order, put_rows, take_rows
from ustc.registry import POOLS

#: pool stage of each original token (``PoolFill.status``)
RETAINED = 1  # admitted into the retention pool
REJECTED = 2  # offered, but its max similarity to the pool was >= tau
UNVISITED = 3  # never offered: the pool was full before its turn


#: largest block of candidates offered at once (blocks double from max(256, 2 * capacity))
_MAX_BLOCK = 8192
#: rounds of ``first_fit`` before the rest of a block is settled one candidate at a time
_ROUNDS = 16
#: norm floor of the unit vectors (torch.nn.functional.normalize's default)
_EPS = 1e-12


@dataclass(frozen=True)
class PoolFill:
    """admitted: (B, N) bool; status: (B, N) int8 (RETAINED, REJECTED or UNVISITED)."""

    admitted: Tensor
    status: Tensor


def greedy_retention_pool(
    features: Tensor,
    priority: Tensor,
    capacity: int,
    tau: float | None,
    block: int | None = None,
) -> PoolFill:
    """Retention pool of Eq. (2):

        S = sim(c, P) = max_{p in P} (c . p) / (||c|| ||p||)

    Candidates c are offered in descending ``priority`` (ties: lower index first); c joins the pool
    P if S < tau, and the loop stops when |P| = capacity or no candidate is left.  ``tau=None``
    admits every candidate (plain top-``capacity`` by priority).

    Candidates are taken in blocks of L ranks (first max(256, 2 * capacity), doubling while the
    pool is not full): one matmul gives their similarity to the pool so far; the candidates that
    survive it get their mutual similarities from a second one, and ``first_fit`` settles them
    in a few vectorised rounds rather than one step per admitted token.  A candidate skipped
    once stays rejected, because the pool only grows.  The work is O(N capacity D) at most plus
    the survivors' squares, instead of O(capacity N D) per admitted token, and nothing is N x N.

    features: (B, N, D); priority: (B, N); capacity: tokens to admit per video.
    """
    b, n, d = features.shape
    device = features.device
    order = descending_order(priority)  # (B, N): rank -> original index
    rank = torch.arange(n, device=device)
    capacity = max(0, min(int(capacity), n))
    if tau is None or capacity == 0:
        admitted_rank = (rank < capacity).expand(b, n)
        status_rank = torch.where(admitted_rank, RETAINED, UNVISITED).to(torch.int8)
        return _to_original(order, admitted_rank, status_rank)

    width = block or max(256, 2 * capacity)
    x = features.float()
    inv_norm = 1.0 / torch.linalg.vector_norm(x, dim=-1).clamp(min=_EPS)  # as F.normalize
    admitted_rank = torch.zeros(b, n, dtype=torch.bool, device=device)
    # unit vectors of the admitted tokens, and one spare slot that takes the writes of the others
    pool = torch.zeros(b, capacity + 1, d, device=device)
    count = torch.zeros(b, dtype=torch.long, device=device)
    last_admitted = torch.full((b,), -1, dtype=torch.long, device=device)
    # max similarity of every token (original order) to the pool so far
    to_pool = torch.full((b, n), float("-inf"), device=device)
    start = 0
    while start < n and not bool((count >= capacity).all()):
        idx = order[:, start : start + width]
        span = idx.shape[1]
        max_sim = to_pool.gather(1, idx)
        # only candidates the pool has not already rejected need their mutual similarities
        alive = (max_sim < tau) & (count < capacity).unsqueeze(1)
        n_alive = int(alive.sum(dim=1).max())
        count_before = count.clone()
        if n_alive > 0:
            local = torch.arange(span, device=device)
            key = torch.where(alive, local, span + local)
            sel = torch.sort(key, dim=1).values[:, :n_alive]  # ascending rank, alive first
            sel_ok = sel < span
            sel = torch.where(sel_ok, sel, sel - span)
            picked = idx.gather(1, sel)
            sub = torch.nn.functional.normalize(
                x.gather(1, picked.unsqueeze(-1).expand(b, n_alive, d)), dim=-1
            )
            sub_max = max_sim.gather(1, sel).masked_fill(~sel_ok, float("inf"))
            within = torch.bmm(sub, sub.transpose(1, 2))  # (B, L', L')
            admit = first_fit(within, tau, sub_max < tau)
            # the pool takes the first of them, in rank order, up to its capacity
            nth = admit.cumsum(1)
            admit &= nth <= (capacity - count).unsqueeze(1)
            slot = torch.where(admit, count.unsqueeze(1) + nth - 1, capacity)
            pool.scatter_(1, slot.unsqueeze(-1).expand(b, n_alive, d), sub)  # slot capacity: unused
            admitted_rank[:, start : start + span].scatter_(1, sel, admit)
            newest = torch.where(admit, start + sel, -1).amax(1)
            last_admitted = torch.maximum(last_admitted, newest)
            count += admit.sum(1)
        start += span
        if start < n and not bool((count >= capacity).all()):
            # the later candidates meet this block's admissions: one (N x new) product
            first, stop = int(count_before.min()), int(count.max())
            if stop > first:
                slots = torch.arange(first, stop, device=device)
                new = (slots >= count_before.unsqueeze(1)) & (slots < count.unsqueeze(1))
                sims = torch.bmm(x, pool[:, first:stop].transpose(1, 2)) * inv_norm.unsqueeze(-1)
                sims = sims.masked_fill_(~new.unsqueeze(1), float("-inf")).amax(-1)
                to_pool = torch.maximum(to_pool, sims)
        width = min(2 * width, _MAX_BLOCK)  # a pool that fills slowly gets larger blocks
    full = count >= capacity
    visited = rank <= torch.where(full, last_admitted, n - 1).unsqueeze(1)
    status_rank = torch.where(
        admitted_rank,
        RETAINED,
        torch.where(visited, REJECTED, UNVISITED),
    ).to(torch.int8)
    return _to_original(order, admitted_rank, status_rank)


def first_fit(within: Tensor, tau: float, free: Tensor) -> Tensor:
    """(B, L) bool: the candidates the greedy rule of Eq. (2) admits, offered in order 0..L-1 to
    a pool that already rejected those not ``free``: j is admitted iff free[j] and
    within[i, j] < tau for every admitted i < j.  within: (B, L, L) similarities; free: (B, L).

    That set is the lexicographically first maximal independent set of the conflict graph
    (i < j conflict when within[i, j] >= tau), and it is computed in rounds: a candidate is
    admitted once every earlier candidate it conflicts with is rejected, rejected once one of
    them is admitted.  Each round settles every candidate whose earlier conflicts are settled,
    so clusters of near-duplicates take two rounds, whatever their number, instead of one step
    per admitted token (and one host synchronisation per round, not per token).  A long chain of
    conflicts would take one round per link: after ``_ROUNDS`` rounds the rest is settled one
    candidate at a time, in order.
    """
    b, n = free.shape
    earlier = torch.ones(n, n, dtype=torch.bool, device=free.device).triu_(1)  # [i, j]: i < j
    conflict = (within >= tau) & earlier
    admitted = torch.zeros_like(free)
    rejected = ~free
    for _ in range(_ROUNDS):
        undecided = ~(admitted | rejected)
        if not bool(undecided.any()):
            return admitted
        hit = (conflict & admitted.unsqueeze(2)).any(1)  # an earlier admitted one conflicts
        pending = (conflict & ~rejected.unsqueeze(2)).any(1)  # ... or may still be admitted
        rejected |= undecided & hit
        admitted |= undecided & ~pending
    undecided = ~(admitted | rejected)
    while bool(undecided.any()):
        first = undecided.to(torch.uint8).argmax(1)  # each video's first undecided candidate
        column = conflict.gather(2, first.view(b, 1, 1).expand(b, n, 1)).squeeze(2)
        hit = (column & admitted).any(1)
        has = undecided.any(1)
        put_rows(admitted, first, take_rows(admitted, first) | (has & ~hit))
        put_rows(rejected, first, take_rows(rejected, first) | (has & hit))
        undecided = ~(admitted | rejected)
    return admitted


def _to_original(order: Tensor, admitted_rank: Tensor, status_rank: Tensor) -> PoolFill:
    admitted = torch.zeros_like(admitted_rank).scatter(1, order, admitted_rank)
    status = torch.zeros_like(status_rank).scatter(1, order, status_rank)
    return PoolFill(admitted=admitted, status=status)


@POOLS.register("greedy")
class GreedyPool:
    """Eq. (2) with threshold ``tau`` (the paper: 0.7)."""

    def __init__(self, tau: float = 0.7) -> None:
        if not -1.0 <= tau <= 1.0:
            raise ValueError(f"tau must be in [-1, 1], got {tau}")
        self.tau = tau

    def fill(
        self, features: Tensor, priority: Tensor, capacity: int, filter_redundancy: bool
    ) -> PoolFill:
        """features (B, N, D), priority (B, N).  Without ``filter_redundancy``: top by priority."""
        return greedy_retention_pool(
            features, priority, capacity, self.tau if filter_redundancy else None
        )
