"""The retention pool, Eq. (2): greedy admission under a cosine-similarity threshold tau."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ustc.ops import descending_order
from ustc.registry import POOLS

#: pool stage of each original token (``PoolFill.status``)
RETAINED = 1  # admitted into the retention pool
REJECTED = 2  # offered, but its max similarity to the pool was >= tau
UNVISITED = 3  # never offered: the pool was full before its turn

#: how often (in admitted tokens) the greedy loop checks whether every video is done
_EXHAUSTION_CHECK = 32


@dataclass(frozen=True)
class PoolFill:
    """admitted: (B, N) bool; status: (B, N) int8 (RETAINED, REJECTED or UNVISITED)."""

    admitted: Tensor
    status: Tensor


def greedy_retention_pool(
    features: Tensor, priority: Tensor, capacity: int, tau: float | None
) -> PoolFill:
    """Retention pool of Eq. (2):

        S = sim(c, P) = max_{p in P} (c . p) / (||c|| ||p||)

    Candidates c are offered in descending ``priority`` (ties: lower index first); c joins the pool
    P if S < tau, and the loop stops when |P| = capacity or no candidate is left.  ``tau=None``
    admits every candidate (plain top-``capacity`` by priority).

    Vectorised over the batch; the loop runs over admitted tokens only.  Each step offers the
    first later candidate whose running max similarity is still below tau: a candidate skipped
    once stays rejected, because the pool only grows.  Memory O(B N D), never N x N.

    features: (B, N, D); priority: (B, N); capacity: tokens to admit per video.
    """
    b, n, _ = features.shape
    device = features.device
    order = descending_order(priority)  # (B, N): rank -> original index
    rank = torch.arange(n, device=device)
    capacity = max(0, min(int(capacity), n))
    if tau is None:
        admitted_rank = (rank < capacity).expand(b, n)
        status_rank = torch.where(admitted_rank, RETAINED, UNVISITED).to(torch.int8)
        return _to_original(order, admitted_rank, status_rank)

    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    unit = unit.gather(1, order.unsqueeze(-1).expand_as(unit))  # rank space
    max_sim = torch.full((b, n), float("-inf"), device=device)
    admitted_rank = torch.zeros(b, n, dtype=torch.bool, device=device)
    last = torch.full((b,), -1, dtype=torch.long, device=device)  # rank of the last offered
    batch = torch.arange(b, device=device)
    for step in range(capacity):
        eligible = (rank > last.unsqueeze(1)) & (max_sim < tau)
        found = eligible.any(dim=1)
        nxt = eligible.to(torch.uint8).argmax(dim=1)  # first eligible rank
        admitted_rank[batch, nxt] |= found
        sims = torch.bmm(unit, unit[batch, nxt].unsqueeze(-1)).squeeze(-1)  # (B, N)
        max_sim = torch.where(found.unsqueeze(1), torch.maximum(max_sim, sims), max_sim)
        last = torch.where(found, nxt, n)  # n: this video has no candidate left
        if step % _EXHAUSTION_CHECK == _EXHAUSTION_CHECK - 1 and not bool(found.any()):
            break
    visited = rank <= torch.where(last >= n, n, last).unsqueeze(1)
    status_rank = torch.where(
        admitted_rank,
        RETAINED,
        torch.where(visited, REJECTED, UNVISITED),
    ).to(torch.int8)
    return _to_original(order, admitted_rank, status_rank)


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
