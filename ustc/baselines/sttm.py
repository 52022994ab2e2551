"""STTM (Hyun et al., "Multi-Granular Spatio-Temporal Token Merging for Training-Free
Acceleration of Video LLMs", ICCV 2025), query-agnostic, adapted to an exact token budget.

For one video of F frames, each a square grid of P = s x s tokens (raster order):

1. Multi-granular spatial tokens, per frame, coarse to fine over a quadtree.  The root is the
   whole frame; a node splits into up to four quadrants (halves rounded up) down to single
   tokens.  A node's score is how well its mean m_n represents its tokens,
       sigma_n = min_{p in n} cos(v_p, m_n);
   searching from the root, a node with sigma_n >= tau_s becomes one token (the mean of its
   tokens) and its subtree is not visited; otherwise its quadrants are visited.
2. Directed pairwise temporal merging.  Each spatial token u of frame t >= 1 is compared with
   the tokens of frame t - 1 that cover the same positions; its edge goes to the most similar one,
   e_u = max_{p in u} cos(m_u, m_{t-1}(p)).  Following an edge merges u into the earlier token
   (directed: later into earlier), so chains of merges end in the earliest frame.

Exact budget.  Every edge removes exactly one token, so with S spatial tokens the S - budget
edges of highest similarity are followed (a per-video temporal threshold).  tau_s starts at
``spatial_tau``; it is lowered only when frame 0 alone (which has no earlier frame) holds more
than ``budget`` tokens, and raised only when the spatial tokens are already fewer than the
budget.  In the rare case that frame 0 still holds more tokens than the budget, its tokens also
get an edge to their most similar earlier token of frame 0, ranked after every temporal edge.
Output tokens are plain means of all the original tokens they absorbed and sit at the position
of their earliest, top-left token.

    CompressionConfig(method="sttm", merger="none")
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ustc.baselines._common import check_method_inputs, result_from_owner, unit_vectors
from ustc.registry import METHODS
from ustc.results import CompressionResult


def grid_side(tokens_per_frame: int) -> int:
    """s with s * s = P; a clear error when the frame's tokens are not a square grid."""
    side = math.isqrt(tokens_per_frame)
    if side * side != tokens_per_frame:
        raise ValueError(
            f"sttm needs each frame's tokens as a square grid (P = s * s, raster order) to build "
            f"its quadtree, got P = {tokens_per_frame}; non-square frames (e.g. Qwen2.5-VL with "
            "a non-square video) are not supported"
        )
    return side


@dataclass(frozen=True)
class Depth:
    """The quadtree nodes at one depth: ``ids`` (n_d,) global node ids; (``local``, ``pos``)
    (P_d,) pairs, one per covered position, ``local`` indexing ``ids``."""

    ids: Tensor
    local: Tensor
    pos: Tensor


@dataclass(frozen=True)
class QuadTree:
    """The quadtree of an s x s grid.  parent (n,) long (-1 for the root), leaf (n,) bool,
    rep (n,) long: the node's top-left (lowest raster) position; depths in root-first order."""

    side: int
    parent: Tensor
    leaf: Tensor
    rep: Tensor
    depths: tuple[Depth, ...]

    def to(self, device: torch.device) -> QuadTree:
        return QuadTree(
            self.side,
            self.parent.to(device),
            self.leaf.to(device),
            self.rep.to(device),
            tuple(
                Depth(d.ids.to(device), d.local.to(device), d.pos.to(device)) for d in self.depths
            ),
        )


def _halves(lo: int, hi: int) -> list[tuple[int, int]]:
    if hi - lo <= 1:
        return [(lo, hi)]
    mid = lo + (hi - lo + 1) // 2
    return [(lo, mid), (mid, hi)]


@functools.lru_cache(maxsize=16)
def quadtree(side: int) -> QuadTree:
    """Build the quadtree of an s x s grid (cached per s)."""
    parent: list[int] = []
    leaf: list[bool] = []
    rep: list[int] = []
    by_depth: list[tuple[list[int], list[int], list[int]]] = []
    frontier = [((0, side, 0, side), -1)]
    while frontier:
        ids: list[int] = []
        local: list[int] = []
        pos: list[int] = []
        nxt = []
        for (r0, r1, c0, c1), up in frontier:
            node = len(parent)
            parent.append(up)
            rep.append(r0 * side + c0)
            is_leaf = r1 - r0 == 1 and c1 - c0 == 1
            leaf.append(is_leaf)
            for r in range(r0, r1):
                for c in range(c0, c1):
                    local.append(len(ids))
                    pos.append(r * side + c)
            ids.append(node)
            if not is_leaf:
                for rows in _halves(r0, r1):
                    for cols in _halves(c0, c1):
                        nxt.append(((*rows, *cols), node))
        by_depth.append((ids, local, pos))
        frontier = nxt
    return QuadTree(
        side,
        torch.tensor(parent),
        torch.tensor(leaf),
        torch.tensor(rep),
        tuple(Depth(torch.tensor(i), torch.tensor(lc), torch.tensor(p)) for i, lc, p in by_depth),
    )


def node_scores(frames: Tensor, tree: QuadTree) -> Tensor:
    """sigma_n = min_{p in n} cos(v_p, m_n), m_n = mean of the node's tokens   -- step 1

    frames: (F, P, D).  Returns (F, n_nodes) float32 (1 for single-token nodes).
    """
    f, _, d = frames.shape
    x = frames.float()
    unit = unit_vectors(x)
    scores = torch.ones(f, tree.parent.shape[0], device=frames.device)
    for depth in tree.depths:
        n_d = depth.ids.shape[0]
        sums = torch.zeros(f, n_d, d, device=frames.device).index_add_(
            1, depth.local, x[:, depth.pos]
        )
        means = unit_vectors(sums)  # the direction of the sum is the direction of the mean
        cos = (unit[:, depth.pos] * means[:, depth.local]).sum(dim=-1)  # (F, P_d)
        worst = torch.full((f, n_d), float("inf"), device=frames.device)
        worst = worst.scatter_reduce(1, depth.local.expand(f, -1), cos, reduce="amin")
        scores[:, depth.ids] = worst
    return scores


def ancestor_max(scores: Tensor, tree: QuadTree) -> Tensor:
    """The highest score among each node's strict ancestors (-inf for the root).  (F, n_nodes)."""
    out = torch.full_like(scores, float("-inf"))
    for depth in tree.depths[1:]:
        up = tree.parent[depth.ids]
        out[:, depth.ids] = torch.maximum(out[:, up], scores[:, up])
    return out


def is_token(scores: Tensor, above: Tensor, leaf: Tensor, tau: float) -> Tensor:
    """Coarse to fine: node n is a spatial token iff no ancestor merged (max ancestor score
    < tau) and it merges itself (score >= tau) or is a single token.  (F, n_nodes) bool."""
    return (above < tau) & (leaf | (scores >= tau))


def spatial_owner(token: Tensor, tree: QuadTree) -> Tensor:
    """For every position of every frame, the top-left position of its spatial token.  (F, P)."""
    f = token.shape[0]
    owner = torch.full((f, tree.side * tree.side), -1, dtype=torch.long, device=token.device)
    for depth in tree.depths:
        chosen = token[:, depth.ids][:, depth.local]  # (F, P_d)
        rep = tree.rep[depth.ids][depth.local].expand(f, -1)
        owner[:, depth.pos] = torch.where(chosen, rep, owner[:, depth.pos])
    return owner


def group_means_at(x: Tensor, owner: Tensor) -> Tensor:
    """m(p) = mean of the tokens sharing p's owner, for every position p.  x (F, P, D) -> float32."""
    f, p, d = x.shape
    sums = torch.zeros(f, p, d, device=x.device).scatter_add_(
        1, owner.unsqueeze(-1).expand(f, p, d), x.float()
    )
    counts = torch.zeros(f, p, device=x.device).scatter_add_(
        1, owner, torch.ones(f, p, device=x.device)
    )
    means = sums / counts.clamp(min=1).unsqueeze(-1)
    return means.gather(1, owner.unsqueeze(-1).expand(f, p, d))


def temporal_edges(means: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
    """e_u = max_{p in u} cos(m_u, m_{t-1}(p)) and its target, for every token u of frames >= 1.

    means: (F, P, D) each position's spatial-token mean; owner: (F, P) top-left positions.
    Returns (sim, target), both (F, P) and indexed by the token's top-left position: sim -inf
    where no token starts (and for frame 0); target = top-left position in frame t - 1 (first
    best position on ties).
    """
    f, p, _ = means.shape
    sim = torch.full((f, p), float("-inf"), device=means.device)
    target = torch.full((f, p), -1, dtype=torch.long, device=means.device)
    if f == 1:
        return sim, target
    unit = unit_vectors(means)
    pos_sim = (unit[1:] * unit[:-1]).sum(dim=-1)  # (F - 1, P)
    own = owner[1:]
    best = torch.full((f - 1, p), float("-inf"), device=means.device)
    best = best.scatter_reduce(1, own, pos_sim, reduce="amax")
    columns = torch.arange(p, device=means.device).expand(f - 1, p)
    hit = pos_sim >= best.gather(1, own)
    first = torch.full((f - 1, p), p, dtype=torch.long, device=means.device)
    first = first.scatter_reduce(1, own, torch.where(hit, columns, p), reduce="amin")
    starts = torch.zeros(f - 1, p, dtype=torch.bool, device=means.device)
    starts.scatter_(1, own, True)
    sim[1:] = torch.where(starts, best, float("-inf"))
    target[1:] = torch.where(starts, owner[:-1].gather(1, first.clamp(max=p - 1)), -1)
    return sim, target


def first_frame_edges(means: Tensor, owner: Tensor) -> tuple[Tensor, Tensor]:
    """Fallback edges inside frame 0: each token to its most similar token that starts earlier.

    means, owner: (P, D), (P,) of frame 0.  Returns (sim, target) (P,), indexed by top-left
    position, -inf / -1 where no token starts and for the first token.
    """
    p = owner.shape[0]
    columns = torch.arange(p, device=owner.device)
    starts = owner == columns
    unit = unit_vectors(means)
    sims = unit @ unit.T
    earlier = starts.unsqueeze(0) & (columns.unsqueeze(0) < columns.unsqueeze(1))
    sims = sims.masked_fill(~earlier, float("-inf"))
    best, target = sims.max(dim=1)
    has = starts & earlier.any(dim=1)
    return torch.where(has, best, float("-inf")), torch.where(has, target, -1)


@METHODS.register("sttm")
class STTM:
    """STTM: quadtree multi-granular spatial tokens, then directed pairwise temporal merging.

    spatial_tau: tau_s, min cosine similarity of a quadrant's tokens to their mean for the
                 quadrant to become one token (the starting threshold; see the module docstring).
    """

    #: the in-LLM stage as published (STTM merges before the LLM only);
    #: applied by ``run.py --method`` unless --merger is given (ustc.registry.method_in_llm)
    in_llm = {"merger": "none"}

    uses_attention = False

    def __init__(self, spatial_tau: float = 0.8) -> None:
        if not isinstance(spatial_tau, (int, float)) or not -1.0 <= spatial_tau <= 1.0:
            raise ValueError(f"spatial_tau must be in [-1, 1], got {spatial_tau!r}")
        self.spatial_tau = float(spatial_tau)

    def compress(
        self, features: Tensor, attention: Tensor | None, budget: int
    ) -> CompressionResult:
        """features: (B, F, P, D); attention unused.  Returns ``budget`` tokens per video."""
        b, f, p, d = check_method_inputs("sttm", features, attention, budget, False)
        tree = quadtree(grid_side(p)).to(features.device)
        owner = torch.stack([self._video(features[i], budget, tree) for i in range(b)])
        keep = owner == torch.arange(f * p, device=features.device)
        return result_from_owner(features.reshape(b, f * p, d), keep, owner, budget)

    def spatial_threshold(self, scores: Tensor, above: Tensor, leaf: Tensor, budget: int) -> float:
        """tau_s: ``spatial_tau``, lowered until frame 0 holds <= budget tokens, or raised until
        all frames hold >= budget tokens (both monotone in tau, found by bisection)."""

        def count(tau: float, frames: slice) -> int:
            return int(is_token(scores[frames], above[frames], leaf, tau).sum())

        tau = self.spatial_tau
        inner = scores[:, ~leaf]
        if count(tau, slice(0, 1)) > budget:
            # largest frame-0 score <= tau at which frame 0 fits (at its smallest score: 1 token)
            options = torch.unique(inner[0][inner[0] <= tau]).flip(0).tolist()
            tau = options[_first(options, lambda t: count(t, slice(0, 1)) <= budget)]
        if count(tau, slice(None)) < budget:
            # smallest tau above tau at which the spatial tokens are enough (at +inf: all N)
            # just above a score, that node no longer merges (float32, as the comparison)
            above_scores = torch.unique(inner[inner >= tau])
            raised = torch.nextafter(above_scores, torch.full_like(above_scores, math.inf))
            options = [*raised.tolist(), math.inf]
            tau = options[_first(options, lambda t: count(t, slice(None)) >= budget)]
        return tau

    def _video(self, video: Tensor, budget: int, tree: QuadTree) -> Tensor:
        """owner (N,) of one video (F, P, D): the global top-left position of its output token."""
        f, p, _ = video.shape
        device = video.device
        scores = node_scores(video, tree)
        above = ancestor_max(scores, tree)
        tau = self.spatial_threshold(scores, above, tree.leaf, budget)
        spatial = spatial_owner(is_token(scores, above, tree.leaf, tau), tree)  # (F, P)
        means = group_means_at(video, spatial)
        sim, target = temporal_edges(means, spatial)
        sim0, target0 = first_frame_edges(means[0], spatial[0])
        n_spatial = int((spatial == torch.arange(p, device=device)).sum())
        # cosines lie in [-1, 1]: +4 ranks every temporal edge above every frame-0 fallback edge
        rank_key = torch.cat([sim.reshape(-1) + 4.0, sim0])
        valid = torch.isfinite(rank_key)
        key = torch.where(valid, rank_key, float("-inf"))
        order = torch.sort(key, descending=True, stable=True).indices
        follow = torch.zeros_like(valid)
        follow[order[: n_spatial - budget]] = True
        follow &= valid
        follow_t = follow[: f * p].view(f, p)
        follow_0 = follow[f * p :]
        columns = torch.arange(p, device=device)
        # frame 0: resolve fallback chains (edges point to lower positions) by pointer jumping
        root0 = torch.where(follow_0, target0, columns)
        for _ in range(max(1, p.bit_length())):
            root0 = root0.gather(0, root0)
        final = [root0.gather(0, spatial[0])]
        for t in range(1, f):
            token = spatial[t]
            merged = follow_t[t].gather(0, token)
            into = final[t - 1].gather(0, target[t].gather(0, token).clamp(min=0))
            final.append(torch.where(merged, into, t * p + token))
        return torch.cat(final)


def _first(options: list[float], ok: Callable[[float], bool]) -> int:
    """Index of the first option for which ``ok`` holds, by bisection (``ok`` is monotone:
    False ... False True ... True); the last index if none."""
    lo, hi = 0, len(options) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(options[mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo
