"""Eq. (3)-(4) on large recycle pools without the N x N distance matrix: certified screening (CPU).

DPC-KNN needs each token's k nearest neighbours (the density, Eq. 3) and its nearest denser
token (delta, Eq. 4).  On 32 x 196 tokens of width 3584 the dense way is N^2 D / 2 = 7e10
multiply-adds of float32 distances, nearly all of DPC-KNN's time on a CPU, and nearly all of
those distances only serve to be ruled out.  Here they are ruled out by bounds from a
low-dimensional projection, and float32 distances are computed only where the bounds cannot
decide:

1. ``V`` (D x l, orthonormal): a randomized sketch of the features' dominant directions;
   z_i = V^T x_i and r_i = ||x_i - V z_i|| (from r_i^2 = ||x_i||^2 - ||z_i||^2).  A projection
   is a contraction and the residuals obey the triangle inequality, so for every pair

       ||z_i - z_j|| - s_i - s_j  <=  d(x_i, x_j)  <=  ||z_i - z_j|| + r_i + r_j + s_i + s_j,

   where s_i = ``SLACK`` ||x_i|| = 1e-3 ||x_i|| covers the float32 rounding of the projection and
   of the distances themselves: typically ~1e-6 ||x_i|| at D = 3584, so a wide margin, though
   not a worst-case bound.
2. The reach T_i (1.25 x an estimate of the k-th neighbour distance): token i is linked to
   every token whose lower bound is within T_i; the groups are the connected components, so
   every token outside i's group is farther than T_i.
3. Per group, exact float32 distances give each token's k nearest inside the group and its
   nearest denser token inside the group.  Either found within T_i is exact (nothing outside
   is that close).  The other rows (each group's densest token, mostly) get one exact distance
   row against every token.

The result is the dense computation's (``recycle.knn_log_density``, ``recycle.peak_distance``)
up to the float32 rounding of the same distances.  ``screening_applies`` keeps the dense path
wherever screening cannot pay: small pools, narrow features, GPUs (the dense matrix there is a
few milliseconds and screening needs host synchronisation), and ``screen`` returns None when
the candidate graph is too connected (one component holding most tokens).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch
from torch import Tensor

from ustc.ops import (
    denser_than,
    pairwise_squared_distances,
    peak_from_distances,
    row_blocks,
    squared_norms,
)

#: smallest recycle pool (tokens in one video) screened; below it the dense matrix is cheap
MIN_TOKENS = 4096
#: width l of the projection the bounds come from
RANK = 64
#: rows and coordinates the basis is sketched from
_SKETCH_ROWS, _SKETCH_COLUMNS = 2048, 256
#: float32 rounding margin on every bound, relative to the token's norm
SLACK = 1e-3
#: the exact work per component (sum of squared sizes) may be at most this share of N^2
MAX_EXACT_SHARE = 0.25
#: most links kept for the connected components (int32 pairs: 256 MiB)
MAX_EDGES = 1 << 25
#: components are computed exactly in chunks of about this many tokens
CHUNK = 128
#: reach of a group: this many times the estimated k-th neighbour distance
REACH = 1.25
#: most rows computed against every token before the dense path is cheaper
MAX_FULL_ROWS = 1024


def screening_applies(features: Tensor, mask: Tensor, k: int) -> bool:
    """Whether ``screen`` can pay on these inputs: CPU, D >= 8 l, some pool >= ``MIN_TOKENS``."""
    return (
        features.device.type == "cpu"
        and features.shape[-1] >= 8 * RANK
        and k < MIN_TOKENS // 4
        and int(mask.sum(-1).max()) >= MIN_TOKENS
    )


def screen(features: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """(log rho, delta), each (B, N) float32 as ``knn_log_density`` and ``peak_distance`` return
    them (-inf and 0 outside ``mask``), or None if some video's candidate graph is too connected
    for screening to pay.  features: (B, N, D); mask: (B, N) bool; k: neighbours (Eq. 3)."""
    b, n, _ = features.shape
    log_rho = torch.full((b, n), float("-inf"))
    delta = torch.zeros(b, n)
    for v in range(b):
        if int(mask[v].sum()) <= k:
            return None
        result = _screen_pool(features[v].float(), mask[v], k)
        if result is None:
            return None
        log_rho[v], delta[v] = result
    return log_rho.masked_fill(~mask, float("-inf")), delta.masked_fill(~mask, 0.0)


def sketch_basis(x: Tensor, rank: int, seed: int = 0) -> Tensor:
    """(D, rank) orthonormal basis of the dominant row directions of x (m, D).

    A randomized range finder on 2048 random rows: y = x Omega sketches the column space (Omega draws ``rank`` random mixtures of 256 random coordinates, enough to tell the
    dominant directions apart) and the rows of y^T x span the dominant row directions.  Any orthonormal basis keeps the bounds valid; a good one makes
    them tight.  QR in float64, so the columns are orthonormal to float32 precision.
    """
    m, d = x.shape
    generator = torch.Generator().manual_seed(seed)
    columns = torch.randperm(d, generator=generator)[: min(d, _SKETCH_COLUMNS)].to(x.device)
    omega = torch.randn(columns.numel(), rank, generator=generator).to(x.device)
    # random rows: a stride could miss whole token positions (frames repeat every P rows)
    rows = x.index_select(0, torch.randperm(m, generator=generator)[:_SKETCH_ROWS].to(x.device))
    y = rows.index_select(1, columns) @ omega  # (rows, rank)
    q, _ = torch.linalg.qr((y.T @ rows).T.double())
    return q.float()


def _screen_pool(x: Tensor, member: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """log rho and delta (N,) of the members of one video's recycle pool, or None (see
    ``screen``).  x: (N, D) float32, every token of the video; member: (N,) bool.  Non-members
    take part in the grouping (they are few: the retention pool) but never count as neighbours.
    """
    n = x.shape[0]
    z = x @ sketch_basis(x, RANK)  # (N, l)
    sq = squared_norms(x)
    zn = squared_norms(z)
    slack = 2 * SLACK * float(sq.max().sqrt())  # >= s_i + s_j for every pair
    residual2 = (sq - zn).clamp_(min=0.0)
    reach, labels = _groups(z, zn, residual2, member, slack, k)
    if labels is None:
        return None
    sizes = np.bincount(labels)
    if float(np.square(sizes, dtype=np.float64).sum()) > MAX_EXACT_SHARE * n * n:
        return None
    labels_t = torch.from_numpy(labels).to(x.device)
    order = torch.sort(labels_t, stable=True).indices  # by group, ascending index inside
    log_rho = torch.empty(n, device=x.device)
    kth = torch.empty(n, device=x.device)  # k-th nearest distance inside the group
    chunks = []
    for idx in _chunks(order, sizes):
        keep = (labels_t[idx].unsqueeze(1) == labels_t[idx].unsqueeze(0)) & member[idx]
        d2 = pairwise_squared_distances(x[idx].unsqueeze(0))[0]
        d2.masked_fill_(~keep, float("inf")).fill_diagonal_(float("inf"))
        nearest = d2.topk(min(k, idx.numel()), dim=1, largest=False).values
        log_rho[idx] = -(nearest.sum(1) / k)
        kth[idx] = nearest[:, -1].sqrt() if idx.numel() >= k else float("inf")
        chunks.append((idx, d2))
    # a k-th neighbour within reach certifies the density: every token outside the group is
    # farther than reach.  The other rows are computed against every token.
    full = _FullRows(x, sq, member)
    if not full.add((member & (kth > reach)).nonzero().squeeze(1)):
        return None
    ids, d2 = full.stacked()
    if ids.numel():
        d2 = d2.masked_fill(~member, float("inf"))
        d2[torch.arange(ids.numel()), ids] = float("inf")  # not its own neighbour
        log_rho[ids] = -(d2.topk(k, dim=1, largest=False).values.sum(1) / k)
    delta = torch.empty(n, device=x.device)
    for idx, d2 in chunks:
        lr = log_rho[idx]
        denser = denser_than(lr.unsqueeze(1), idx.unsqueeze(1), lr.unsqueeze(0), idx.unsqueeze(0))
        delta[idx] = d2.masked_fill_(~denser, float("inf")).amin(1).sqrt_()
    # likewise a denser token within reach certifies delta (the group's densest token has none)
    if not full.add((member & (delta > reach)).nonzero().squeeze(1)):
        return None
    ids, d2 = full.stacked()
    if ids.numel():
        index = torch.arange(n, device=x.device)
        lr = log_rho[ids].unsqueeze(1)
        denser = member & denser_than(lr, ids.unsqueeze(1), log_rho, index)
        delta[ids] = peak_from_distances(d2.sqrt(), denser, member)
    return log_rho, delta


class _FullRows:
    """Squared distances of single rows to every token, computed in blocks on demand."""

    def __init__(self, x: Tensor, sq: Tensor, member: Tensor) -> None:
        self.x, self.sq, self.member = x, sq, member
        self.rows: dict[int, Tensor] = {}

    def add(self, ids: Tensor) -> bool:
        """Compute the rows ``ids`` not yet held; False past ``MAX_FULL_ROWS`` rows."""
        todo = [i for i in ids.tolist() if i not in self.rows]
        if len(self.rows) + len(todo) > MAX_FULL_ROWS:
            return False
        n = self.x.shape[0]
        for rows in row_blocks(len(todo), n):
            ids_t = torch.tensor(todo[rows], device=self.x.device)
            d2 = torch.addmm(self.sq, self.x[ids_t], self.x.T, alpha=-2.0)
            d2.add_(self.sq[ids_t].unsqueeze(1)).clamp_(min=0.0)
            self.rows.update(zip(todo[rows], d2.unbind(0), strict=True))
        return True

    def stacked(self) -> tuple[Tensor, Tensor]:
        """The row indices held (r,) and their squared distances (r, N)."""
        if not self.rows:
            return torch.empty(0, dtype=torch.long), torch.empty(0, self.x.shape[0])
        ids = list(self.rows)
        return torch.tensor(ids, device=self.x.device), torch.stack([self.rows[i] for i in ids])


def _groups(
    z: Tensor, zn: Tensor, residual2: Tensor, member: Tensor, slack: float, k: int
) -> tuple[Tensor, np.ndarray | None]:
    """Group every token with all members that could be among its k nearest.

    est_ij = sqrt(||z_i - z_j||^2 + r_i^2 + r_j^2) estimates d(x_i, x_j) (residuals taken as
    orthogonal); reach_i is ``REACH`` times the k-th smallest estimate over members.  Tokens j
    with lower bound ||z_i - z_j|| - slack <= reach_i are linked to i; the groups are the
    connected components, so every token outside i's group is farther than reach_i.  Returns
    reach (N,) and the group label of every token, or None past ``MAX_EDGES`` links.
    """
    n = z.shape[0]
    reach = torch.empty(n, device=z.device)
    heads, tails = [], []
    n_edges = 0
    # ||z_i - z_j||^2 = zn_i + zn_j - 2 z_i.z_j; the row term zn_i moves to the thresholds
    column_cost = (zn + residual2).masked_fill(~member, float("inf"))
    proj2 = torch.empty(0, device=z.device)
    estimate = torch.empty(0, device=z.device)
    for rows in row_blocks(n, n):
        r = rows.stop - rows.start
        proj2 = torch.addmm(zn, z[rows], z.T, alpha=-2.0, out=proj2.resize_(r, n))
        estimate = torch.add(proj2, column_cost - zn, out=estimate.resize_(r, n))
        estimate.diagonal(rows.start).fill_(float("inf"))
        kth = kth_smallest_bound(estimate, k)
        kth = (kth + zn[rows] + residual2[rows]).clamp_(min=0.0)
        reach[rows] = REACH * kth.sqrt()
        # linked: ||z_i - z_j|| <= reach_i + slack
        bound = (reach[rows] + slack).square() - zn[rows]
        i, j = (proj2 <= bound.unsqueeze(1)).nonzero(as_tuple=True)
        n_edges += i.numel()
        if n_edges > MAX_EDGES:
            return reach, None
        heads.append((i + rows.start).int())
        tails.append(j.int())
    head = torch.cat(heads)  # row-major: already the CSR order
    indptr = torch.zeros(n + 1, dtype=torch.long)
    indptr[1:] = torch.bincount(head.long(), minlength=n).cumsum(0)
    tail = torch.cat(tails).cpu().numpy()
    graph = scipy.sparse.csr_matrix(
        (np.ones(tail.size, dtype=np.int8), tail, indptr.numpy()), (n, n)
    )
    _, labels = scipy.sparse.csgraph.connected_components(graph, connection="weak")
    return reach, labels


def kth_smallest_bound(x: Tensor, k: int, width: int = 64) -> Tensor:
    """An upper bound on the k-th smallest entry of each row of x (r, n), in one pass.

    The columns are dealt round-robin to k sets in chunks of ``width``; the largest of the k set
    minima is an entry of the row with k - 1 other entries (the other minima) at most as large,
    so it is >= the k-th smallest.  Chunks rather than single columns keep the reduction
    contiguous; dealing them out keeps a token's neighbours in adjacent frames (196 apart)
    in different sets.
    """
    r, n = x.shape
    per = n // (k * width)
    if per == 0:
        return x.topk(min(k, n), dim=1, largest=False).values[:, -1]
    return x[:, : per * k * width].view(r, per, k, width).amin(3).amin(1).amax(1)


def _chunks(order: Tensor, sizes: np.ndarray):
    """Index tensors of consecutive whole groups of ``order``, about ``CHUNK`` tokens each."""
    start = stop = 0
    for size in sizes.tolist():
        if stop > start and stop - start + size > CHUNK:
            yield order[start:stop]
            start = stop
        stop += size
    if stop > start:
        yield order[start:stop]
