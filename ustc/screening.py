"""Eq. (3)-(4) on large recycle pools without the N x N distance matrix: certified screening (CPU).

DPC-KNN needs each token's k nearest neighbours (the density, Eq. 3) and its nearest denser
token (delta, Eq. 4).  On 32 x 196 tokens of width 3584 the dense way is N^2 D / 2 = 7e10
multiply-adds of float32 distances, nearly all of DPC-KNN's time on a CPU, and nearly all of
those distances only serve to be ruled out.  Here they are ruled out by lower bounds from a
low-dimensional projection, and float32 distances are computed only where the bounds cannot
decide:

1. ``Sketch``: an orthonormal basis V (D x l) of the features' dominant directions
   (``sketch_basis``), z_i = V^T x_i.  A projection is a contraction, so for every pair

       ||z_i - z_j|| - s  <=  d(x_i, x_j),

   where s = 2 ``SLACK`` max ||x|| = 2e-3 max ||x|| covers the float32 rounding of the
   projection and of the distances themselves (typically ~1e-6 ||x|| at D = 3584: a wide
   margin, though not a worst-case bound).
2. ``cells``: k-means on z splits the pool into cells of about ``CELL`` tokens (a scene of a
   video, the same content over many frames, becomes one or a few cells).  With a cell's
   centroid c_B and radius r_B (the largest ||z_j - c_B|| over its tokens), the triangle
   inequality bounds every token j of B at once:

       gap(i, B) = ||z_i - c_B|| - r_B - s  <=  d(x_i, x_j).

3. Density: the exact distances inside a token's own cell give u_i >= its k-th neighbour
   distance (a row with fewer than k first takes the nearest cell by gap, until it has k); the
   exact distances to every cell with gap(i, B) <= u_i then hold its k nearest neighbours,
   since every other token is farther than u_i.  Distances are computed a whole cell pair at a
   time (a cell's tokens are close, so they want the same cells), each pair once.
4. Delta: where one of i's k nearest (measured in step 3) is denser than i, the nearest such is
   t_i: every other token is at least as far as the k-th.  For the other rows (the local
   density peaks) the nearest denser token t_i among the distances computed for the density is
   the nearest of all once every cell not computed for i has gap > t_i or no token denser than i.
   The rows this leaves open (mostly each scene's densest token, whose nearest denser token is
   in another scene, and the densest token of the pool, which has none: Eq. 4 gives it the
   farthest member) take their full row.

The result is the dense computation's (``recycle.knn_log_density``, ``recycle.peak_distance``)
bit for bit: both centre the pool (``ops.centered``), choose on rounded distances and measure
the decisive ones from the differences (``ops.measure_candidates``); the cells' bounds are
widened by the rounding so that they never rule out a token the choice needs.  How much exact
work is left depends on the
data, never the result: on features without structure every cell is within reach of every
token, and ``screen`` returns None (the dense path runs) once the exact pairs pass
``MAX_EXACT_SHARE`` of the dense ones.  ``screening_applies`` keeps the dense path wherever
screening cannot pay: small pools, narrow features, GPUs (the dense matrix there is a few
milliseconds and screening needs host synchronisation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ustc.ops import (
    CANDIDATE_MARGIN,
    MeasuredPairs,
    centered,
    denser_than,
    density_from_distances,
    distance_from_squared,
    exact_nearest_rows,
    gram_rounding,
    measure_candidates,
    nearest_denser_listed,
    row_blocks,
    squared_norms,
)

#: smallest recycle pool (tokens in one video) screened; below it the dense matrix is cheap
MIN_TOKENS = 1024
#: width l of the projection the bounds come from
RANK = 64
#: rows and coordinates the basis is sketched from
_SKETCH_ROWS, _SKETCH_COLUMNS = 1024, 256
#: float32 rounding margin on every bound, relative to the largest token norm
SLACK = 1e-3
#: tokens per k-means cell
CELL = 48
#: Lloyd iterations of the k-means
CELL_ITERATIONS = 4
#: the k-means++ seeds are drawn from this many tokens per cell, in this many batches
_SEED_SAMPLE, _SEED_ROUNDS = 4, 16
#: the Lloyd steps run on this many tokens per cell (a sample)
_FIT_SAMPLE = 16
#: cells wider than this many times the median radius are split in two, at most this many times
_SPLIT_WIDTH, _SPLIT_ROUNDS = 1.5, 3
#: the exact pairs may be at most this share of the dense N^2 (else the dense path runs)
MAX_EXACT_SHARE = 0.25
#: and at most this many (float32 kept until delta is known: 512 MiB)
MAX_EXACT_PAIRS = 1 << 27
#: most rows whose delta takes a full row (against every token) before the dense path is cheaper
MAX_FULL_ROWS = 1024
#: fewest rows of a group of cells whose exact distances are computed in one product
GROUP_ROWS = 256


def screening_applies(features: Tensor, mask: Tensor, k: int) -> bool:
    """Whether ``screen`` can pay on these inputs: CPU, D >= 8 l, some pool >= ``MIN_TOKENS``."""
    return (
        features.device.type == "cpu"
        and features.shape[-1] >= 8 * RANK
        and k < CELL
        and int(mask.sum(-1).max()) >= MIN_TOKENS
    )


def screen(features: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """(log rho, delta), each (B, N) float32 as ``knn_log_density`` and ``peak_distance`` return
    them (-inf and 0 outside ``mask``), or None if some video needs too much exact work for
    screening to pay.  features: (B, N, D); mask: (B, N) bool; k: neighbours (Eq. 3)."""
    each = screen_each(features, mask, k)
    if any(result is None for result in each):
        return None
    return torch.stack([r[0] for r in each]), torch.stack([r[1] for r in each])


def screen_each(
    features: Tensor, mask: Tensor, k: int, xc: Tensor | None = None, sq: Tensor | None = None
) -> list[tuple[Tensor, Tensor] | None]:
    """``screen`` decided per video: (log rho (N,), delta (N,)) for each video screening takes,
    None for each it declines (a pool of at most k tokens, or too much exact work).  A video's
    result depends on that video alone.

    The cells and bounds come from the features centred on the pool's mean (``ops.centered``);
    the neighbours and the nearest denser token are measured from the differences of the
    original features (``ops.exact_nearest``), as on the dense path: the same values, bit for
    bit, whenever both certify their candidates.  xc: ``ops.centered(features, mask)`` and sq
    (B, N) its ``ops.squared_norms`` when the caller has them.
    """
    b, n, _ = features.shape
    xc = centered(features, mask) if xc is None else xc
    sq = squared_norms(xc) if sq is None else sq
    rounding = gram_rounding(sq, mask)
    out: list[tuple[Tensor, Tensor] | None] = []
    for v in range(b):
        members = mask[v].nonzero().squeeze(1)
        result = None
        if members.numel() > k:
            sketch = Sketch.of(xc[v], sq[v])
            result = _screen_pool(sketch, features[v].float(), rounding[v], members, k)
        if result is not None:
            log_rho = torch.full((n,), float("-inf"))
            delta = torch.zeros(n)
            log_rho[members], delta[members] = result
            result = (log_rho, delta)
        out.append(result)
    return out


@dataclass(frozen=True)
class Sketch:
    """Tokens x (N, D) float32 through the orthonormal basis V (D, l) of ``sketch_basis``:
    z = x V (N, l), the squared norms sq = ||x||^2, and the rounding slack
    s = 2 ``SLACK`` max ||x|| (>= s_i + s_j of the bound for every pair)."""

    x: Tensor
    z: Tensor
    sq: Tensor
    slack: float

    @classmethod
    def of(cls, x: Tensor, sq: Tensor | None = None) -> Sketch:
        """The sketch of x (N, D); sq (N,): ``ops.squared_norms(x)`` when the caller has it."""
        sq = squared_norms(x) if sq is None else sq
        slack = 2 * SLACK * float(sq.max().sqrt())
        return cls(x=x, z=x @ sketch_basis(x, RANK), sq=sq, slack=slack)


def sketch_basis(x: Tensor, rank: int, seed: int = 0) -> Tensor:
    """(D, rank) orthonormal basis of the dominant row directions of x (m, D).

    A randomized range finder (Halko, Martinsson and Tropp 2011) on 1024 random rows R: the
    columns of y = R Omega sketch R's column space (Omega draws ``rank`` random mixtures of 256
    random coordinates, enough to tell the dominant directions apart), one power step
    y <- R R^T y sharpens it against the flat spectrum of the noise (without it a direction
    shared by a few dozen tokens can be missed at D ~ 1000-4000), and the rows of y^T R span
    the dominant row directions.  Any orthonormal basis keeps the bounds valid; a good one makes
    them tight.  The final QR is in float64, so the columns are orthonormal to float32 precision.
    """
    m, d = x.shape
    generator = torch.Generator().manual_seed(seed)
    columns = torch.randperm(d, generator=generator)[: min(d, _SKETCH_COLUMNS)].to(x.device)
    omega = torch.randn(columns.numel(), rank, generator=generator).to(x.device)
    # random rows: a stride could miss whole token positions (frames repeat every P rows)
    rows = x.index_select(0, torch.randperm(m, generator=generator)[:_SKETCH_ROWS].to(x.device))
    y = orthonormal_columns((rows.index_select(1, columns) @ omega).double()).float()
    y = rows @ (rows.T @ y)  # the power step
    return orthonormal_columns((y.T @ rows).T.double()).float()


def orthonormal_columns(y: Tensor) -> Tensor:
    """An orthonormal basis (m, r) of the column space of y (m, r) float64: Cholesky QR, twice
    (CholeskyQR2: orthonormal to float64 rounding for condition numbers up to ~1e7), or
    Householder QR where the Gram matrix is not positive definite.  Two small products and a
    r x r factorisation: LAPACK's blocked QR of a tall matrix synchronises its threads once per
    column, which on a loaded 2-core machine took 0.4 s for 3584 x 64 against 17 ms on one
    thread."""
    q = y
    for _ in range(2):
        factor, info = torch.linalg.cholesky_ex(q.T @ q)
        if int(info) != 0:
            return torch.linalg.qr(y).Q
        q = torch.linalg.solve_triangular(factor, q.T, upper=False).T
    return q


def cells(z: Tensor, count: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """k-means of z (M, l) into about ``count`` cells: k-means++ seeding, ``CELL_ITERATIONS``
    Lloyd steps (on a sample of ``_FIT_SAMPLE`` tokens per cell), then cells far wider than the median split in two.  Returns labels (M,) long in
    [0, C), centroids (C, l) and radius (C,), the largest distance of a cell's token to its
    centroid; empty cells dropped."""
    generator = torch.Generator().manual_seed(seed)
    m = z.shape[0]
    count = max(1, min(count, m))
    # k-means++ seeding on a random sample of the tokens, the seeds drawn in ``_SEED_ROUNDS``
    # batches (each proportional to the squared distance to the seeds so far) so that the
    # sequential loop stays short
    sample = z[torch.randperm(m, generator=generator)[: _SEED_SAMPLE * count]]
    centroids = sample[:1]
    nearest = (sample - sample[0]).square().sum(1)
    per_round = -(-(count - 1) // _SEED_ROUNDS)
    while centroids.shape[0] < count and bool(nearest.count_nonzero() > 0):
        draws = min(per_round, count - centroids.shape[0], int(nearest.count_nonzero()))
        new = sample[torch.multinomial(nearest, draws, generator=generator)]
        centroids = torch.cat([centroids, new])
        nearest = torch.minimum(nearest, torch.cdist(sample, new).square_().amin(1))
    # Lloyd steps on a sample of the tokens: the cells only need to be good, not optimal (any
    # partition with true radii gives valid bounds), and each pass over all M tokens costs
    fit = z
    if m > _FIT_SAMPLE * count:
        fit = z[torch.randperm(m, generator=generator)[: _FIT_SAMPLE * count]]
    centroids = _lloyd(fit, centroids, CELL_ITERATIONS)
    for _ in range(_SPLIT_ROUNDS):
        # a cell much wider than the typical one has most likely merged two clusters (a local
        # optimum of k-means); its bounds would be loose for everyone, so it is split in two
        labels, radius = _assign(z, centroids)
        wide = radius > _SPLIT_WIDTH * radius.median()
        if not bool(wide.any()):
            return labels, centroids, radius  # the cells of these centroids, as below
        halves = _bisect(z, labels, centroids, wide)
        centroids = torch.cat([centroids[~wide], halves])
        centroids = _lloyd(fit, centroids, 1)  # cells empty in the sample are dropped
    labels, radius = _assign(z, centroids)
    return labels, centroids, radius


def _lloyd(z: Tensor, centroids: Tensor, iterations: int) -> Tensor:
    """Lloyd steps of k-means from ``centroids``; cells left empty are dropped."""
    for _ in range(iterations):
        labels = _closest(z, centroids)
        sizes = torch.bincount(labels, minlength=centroids.shape[0])
        sums = torch.zeros_like(centroids).index_add_(0, labels, z)
        centroids = sums[sizes > 0] / sizes[sizes > 0].unsqueeze(1)
    used = torch.unique(_closest(z, centroids))
    return centroids[used]


def _assign(z: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's cell (its nearest centroid) and each cell's radius."""
    labels = _closest(z, centroids)
    spread = (z - centroids[labels]).norm(dim=1)
    radius = torch.zeros(centroids.shape[0], device=z.device)
    return labels, radius.scatter_reduce_(0, labels, spread, "amax")


def _bisect(z: Tensor, labels: Tensor, centroids: Tensor, wide: Tensor) -> Tensor:
    """Two centroids (2W, l) for each of the W ``wide`` (C,) bool cells of z (M, l): 2-means
    within the cell, seeded with its token farthest from the centroid and the token farthest
    from that one, three Lloyd steps; all wide cells at once (one loop per cell costs a few
    dozen small operations each)."""
    n_cells = centroids.shape[0]
    slot = torch.full((n_cells,), -1, dtype=torch.long)
    slot[wide] = torch.arange(int(wide.sum()))
    inside = (slot[labels] >= 0).nonzero().squeeze(1)
    points, cell = z[inside], slot[labels[inside]]
    w = int(wide.sum())

    def farthest(distance: Tensor) -> Tensor:
        # per wide cell the point of largest distance, the lowest index among equals
        top = torch.full((w,), float("-inf")).scatter_reduce_(0, cell, distance, "amax")
        at = torch.where(distance == top[cell], torch.arange(cell.numel()), cell.numel())
        return torch.full((w,), cell.numel()).scatter_reduce_(0, cell, at, "amin")

    first = points[farthest((points - centroids[wide][cell]).square().sum(1))]
    second = points[farthest((points - first[cell]).square().sum(1))]
    seeds = torch.cat([first, second])  # (2W, l): cell c's halves at c and W + c
    for _ in range(3):
        near_first = (points - seeds[cell]).square().sum(1)
        near_second = (points - seeds[w + cell]).square().sum(1)
        half = cell + w * (near_second < near_first).long()
        sizes = torch.bincount(half, minlength=2 * w).unsqueeze(1)
        sums = torch.zeros_like(seeds).index_add_(0, half, points)
        seeds = torch.where(sizes > 0, sums / sizes.clamp(min=1), seeds)
    return seeds


def _closest(z: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid of every row of z, in row blocks."""
    norms = squared_norms(centroids)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for rows in row_blocks(z.shape[0], centroids.shape[0]):
        # ``min(1).indices`` is ``argmin(1)`` (the first of equal values), 2-3x faster on the CPU
        out[rows] = torch.addmm(norms, z[rows], centroids.T, alpha=-2.0).min(1).indices
    return out


class _HeldPairs:
    """Exact squared distances of one pool, computed a group of row cells at a time.

    The pool's tokens are sorted cell by cell (``cell(b)`` of that order), and the cells group
    by group: row groups of about ``GROUP_ROWS`` tokens, cells near each other (a k-means of the
    cells' centroids), which want mostly the same cells.  When some row cells of a group want a column cell, the whole group
    gets it, in one product (rows x gathered columns) instead of one small product per cell
    pair: a CPU pays a thread wake-up per product, which for 48 x 48 cell pairs cost ten times
    the arithmetic.  The extra distances are true ones, so they only tighten what is known.
    ``held[g]`` lists (columns (U,) sorted-order positions, d2 (R, U)) for row group g; a token
    against itself is +inf, not being its own neighbour.  ``done`` (C, C) records the cell
    pairs held for each row cell, ``budget`` the exact pairs still allowed: it is charged for
    the cell pairs the bounds ask for (each unordered pair once), not for the group's extra
    columns, so whether screening pays depends on the data, not on the grouping.
    """

    def __init__(
        self,
        x: Tensor,
        sq: Tensor,
        position: Tensor,
        sizes: Tensor,
        group_sizes: Tensor,
        budget: float,
    ) -> None:
        self.bounds = [0, *torch.cumsum(sizes, 0).tolist()]
        self.x, self.sq, self.position = x, sq, position
        self.sizes = sizes
        n_cells = sizes.numel()
        self.labels = torch.repeat_interleave(torch.arange(n_cells), sizes)
        self.done = torch.zeros(n_cells, n_cells, dtype=torch.bool)
        self.charged = torch.zeros(n_cells, n_cells, dtype=torch.bool)
        self.budget = budget
        # row groups: consecutive cells, ``group_sizes`` (G,) cells each (empty groups dropped)
        ends = torch.cumsum(group_sizes[group_sizes > 0], 0).tolist()
        self.groups = list(zip([0, *ends[:-1]], ends, strict=True))  # (first cell, stop)
        self.held: list[list[tuple[Tensor, Tensor]]] = [[] for _ in self.groups]

    def cell(self, b: int) -> slice:
        return slice(self.bounds[b], self.bounds[b + 1])

    def rows(self, g: int) -> slice:
        """The sorted-order rows of group g."""
        first, stop = self.groups[g]
        return slice(self.bounds[first], self.bounds[stop])

    def add(self, want: Tensor) -> list[int] | None:
        """Compute the cell pairs ``want`` (C, C) bool (row cell, column cell) not yet held.
        Returns the row groups that got new distances, or None past the budget."""
        charge = (want | want.T) & ~self.charged
        pairs = charge.triu().nonzero()
        sizes = self.sizes.double()
        self.budget -= float((sizes[pairs[:, 0]] * sizes[pairs[:, 1]]).sum())
        if self.budget < 0:
            return None
        self.charged |= charge
        want = want & ~self.done
        touched = []
        for g, (first, stop) in enumerate(self.groups):
            need = want[first:stop].any(0)  # (C,) column cells some row cell of g wants
            if not bool(need.any()):
                continue
            rows = self.rows(g)
            cols = need[self.labels].nonzero().squeeze(1)  # sorted-order positions
            token_rows, token_cols = self.position[rows], self.position[cols]
            x_rows = self.x.index_select(0, token_rows)
            # the group's own columns (its first round) are its rows: gathered once
            own_block = cols.numel() == rows.stop - rows.start and (
                int(cols[0]) == rows.start and int(cols[-1]) == rows.stop - 1
            )
            x_cols = x_rows if own_block else self.x.index_select(0, token_cols)
            # the dense path's expression (``ops.pairwise_squared_distances``)
            d2 = torch.addmm(self.sq[token_cols], x_rows, x_cols.T, alpha=-2.0)
            d2.add_(self.sq[token_rows].unsqueeze(1)).clamp_(min=0.0)
            own = cols.unsqueeze(0) == torch.arange(rows.start, rows.stop).unsqueeze(1)
            d2.masked_fill_(own, float("inf"))
            self.held[g].append((cols, d2))
            self.done[first:stop] |= need
            touched.append(g)
        return touched

    def columns(self, g: int) -> Tensor:
        """The sorted-order positions of the columns held for row group g."""
        return torch.cat([cols for cols, _ in self.held[g]])

    def distances(self, g: int) -> Tensor:
        """The squared distances held for row group g, (R, len(columns(g)))."""
        return torch.cat([d2 for _, d2 in self.held[g]], 1)


def _screen_pool(
    sketch: Sketch, features: Tensor, rounding: Tensor, members: Tensor, k: int
) -> tuple[Tensor, Tensor] | None:
    """log rho and delta (M,) of the recycle pool ``members`` (M,), ascending indices into the
    sketch's tokens, or None (see ``screen``).  features (N, D): the video's own features, which
    the decisive distances are measured on; rounding (N,): the bound on each row's rounded
    squared distances (``ops.gram_rounding``)."""
    pool = _Pool(sketch, members, features, rounding)
    log_rho = pool.density(k)
    delta = None if log_rho is None else pool.delta(log_rho)
    if delta is None:
        return None
    return pool.unsorted(log_rho), pool.unsorted(delta)


class _Pool:
    """One recycle pool being screened: its tokens sorted cell by cell (module doc, 2), the
    exact distances held (``pairs``) and the bounds that decide which are still needed.
    Equal densities order by the token's index in the video (``position``), as in the dense
    path."""

    def __init__(self, sketch: Sketch, members: Tensor, features: Tensor, rounding: Tensor) -> None:
        m = members.numel()
        # the density's, delta's and full rows' measured pairs, each unordered pair once
        self.features = MeasuredPairs(features)
        labels, centroids, radius = cells(sketch.z[members], round(m / CELL))
        # cells grouped by a k-means of their centroids, so that the cells of a row group are
        # near each other and want the same cells (``_HeldPairs``)
        n_cells = centroids.shape[0]
        group = cells(centroids, round(m / GROUP_ROWS))[0]
        rank = torch.empty(n_cells, dtype=torch.long)
        rank[torch.sort(group, stable=True).indices] = torch.arange(n_cells)
        labels = rank[labels]
        self.centroids = torch.empty_like(centroids).index_copy_(0, rank, centroids)
        self.radius = torch.empty_like(radius).index_copy_(0, rank, radius)
        cell_group = torch.empty_like(group).index_copy_(0, rank, group)
        self.n_cells = n_cells
        self.order = torch.sort(labels, stable=True).indices  # ascending index inside a cell
        self.labels, self.position = labels[self.order], members[self.order]
        self.sketch, self.z = sketch, sketch.z[self.position]
        self.rounding = rounding[self.position]
        self.pairs = _HeldPairs(
            sketch.x,
            sketch.sq,
            self.position,
            torch.bincount(self.labels, minlength=self.n_cells),
            torch.bincount(cell_group, minlength=int(cell_group.max()) + 1),
            budget=min(MAX_EXACT_SHARE * m * m, MAX_EXACT_PAIRS),
        )
        #: each row's k nearest (measured squared distances, token positions), from ``density``
        self.neighbours: tuple[Tensor, Tensor] | None = None
        self.blocks = list(row_blocks(m, self.n_cells))
        # the bounds are kept when they fit in one block (pools up to ~64 frames)
        self.gaps = {0: self.lower_bounds(self.blocks[0])} if len(self.blocks) == 1 else {}

    def lower_bounds(self, rows: slice | Tensor) -> Tensor:
        """(r, C): a lower bound on the distance from each row to every token of each cell
        (module doc, 2)."""
        centroids = self.centroids
        gap = torch.addmm(squared_norms(centroids), self.z[rows], centroids.T, alpha=-2.0)
        gap = gap.add_(squared_norms(self.z[rows]).unsqueeze(1)).clamp_(min=0.0).sqrt_()
        return gap.sub_(self.radius + self.sketch.slack)

    def wanted(
        self,
        bound: Tensor,
        denser: tuple[Tensor, Tensor, Tensor] | None = None,
        active: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The cells each row still needs, given the squared distance ``bound`` (M,) its answer
        is known to be within (+inf: unknown yet): every cell within the bound not yet asked for
        (density: so that the exact-work budget is charged for what the bounds ask, see
        ``_HeldPairs``) or not held (``denser`` given), or without a bound the nearest.  With
        ``denser`` = (log rho (M,), and per cell the log rho and position of its densest
        token), only cells holding a token denser than the row count.  ``active`` (M,) bool:
        only these rows are looked at (the others are known to need nothing).  Returns (C, C)
        bool, some token of row cell a needs cell b, and (M,) bool, the rows that need any.  In
        row blocks, so nothing is M x C."""
        # counts of wanting rows (only > 0 matters), in float32: torch adds float rows with one
        # vector operation each, int32 rows by a slower path (twice the time at 6246 x 261)
        by_cell = torch.zeros(self.n_cells, self.n_cells)
        needs = torch.zeros(bound.shape[0], dtype=torch.bool)
        known = self.pairs.charged if denser is None else self.pairs.done
        for block in self.blocks:
            rows: slice | Tensor = block
            if active is not None:
                rows = block.start + active[block].nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
            if block.start in self.gaps:
                gap = self.gaps[block.start]
                gap = gap if active is None else gap[rows - block.start]
            else:
                gap = self.lower_bounds(rows)
            open_cells = ~known[self.labels[rows]]
            if denser is not None:
                log_rho, cell_rho, cell_position = denser
                row_rho, row_position = log_rho[rows].unsqueeze(1), self.position[rows]
                open_cells &= denser_than(
                    row_rho, row_position.unsqueeze(1), cell_rho, cell_position
                )
            unknown = torch.isinf(bound[rows])
            want = open_cells & (gap <= bound[rows].sqrt().unsqueeze(1)) & ~unknown.unsqueeze(1)
            unknown = unknown.nonzero().squeeze(1)
            first = gap[unknown].masked_fill_(~open_cells[unknown], float("inf")).argmin(1)
            want[unknown, first] = open_cells[unknown, first]
            needs[rows] = want.any(1)
            by_cell.index_add_(0, self.labels[rows], want.float())
        return by_cell > 0, needs

    def density(self, k: int) -> Tensor | None:
        """log rho (M,), Eq. (3) (module doc, 3): own cell, then every cell within the k-th
        distance held, or for rows with fewer than k distances the nearest cell, until no row
        needs more.  None past the budget."""
        pairs = self.pairs
        m, c = self.labels.numel(), k + CANDIDATE_MARGIN
        # a running top c of every row (values, token positions, -1 for none) and its count of
        # finite columns: what ``ops.measure_candidates`` takes, kept up to date as distances
        # arrive instead of rebuilt from every held block at the end
        top = torch.full((m, c), float("inf"))
        position = torch.full((m, c), -1, dtype=torch.long)
        n_allowed = torch.zeros(m, dtype=torch.long)
        folded = [0] * len(pairs.groups)  # blocks of each row group already merged
        want = torch.eye(self.n_cells, dtype=torch.bool)
        active = None  # every row
        while bool(want.any()):
            touched = pairs.add(want)
            if touched is None:
                return None
            for g in touched:
                rows = pairs.rows(g)
                new = pairs.held[g][folded[g] :]
                folded[g] = len(pairs.held[g])
                values, at = torch.cat([top[rows], *[d2 for _, d2 in new]], 1).topk(
                    c, dim=1, largest=False
                )
                columns = self.position[torch.cat([cols for cols, _ in new])]
                taken = torch.where(
                    at < c,
                    position[rows].gather(1, at.clamp(max=c - 1)),
                    columns[(at - c).clamp(min=0)],
                )
                top[rows], position[rows] = values, taken.masked_fill_(torch.isinf(values), -1)
                for _, d2 in new:
                    n_allowed[rows] += torch.isfinite(d2).sum(1)
            # a row's k nearest by rounded distance are measured below; the cells that may hold
            # a true k nearest are those within the k-th rounded one plus its rounding.  A row
            # that needed no cell needs none later (its bound only shrinks, the cells asked for
            # only grow), so each round looks at the rows of the last one only
            want, active = self.wanted(top[:, k - 1] + self.rounding, active=active)
        nearest, at, certified = measure_candidates(
            self.features, self.position, top, position, n_allowed, k, self.rounding
        )
        self._measure_full_rows((~certified).nonzero().squeeze(1), nearest, at, k)
        # each row's k nearest, measured: ``delta`` reads a nearest denser token off them
        self.neighbours = (nearest, at)
        return density_from_distances(nearest, "paper", 1.0)

    def candidates(
        self, count: int, allowed: Callable[[int, slice | Tensor, Tensor], Tensor], wanted: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The ``count + CANDIDATE_MARGIN`` nearest held columns by rounded distance of the T rows
        ``wanted`` (M,) bool marks, ascending, as ``ops.measure_candidates`` takes them: (T, c) values and
        token positions (-1 past the columns allowed), and (T,) how many are allowed.
        ``allowed(g, rows, gram)`` (R, columns): the held columns the rows (a slice or positions
        into the sorted pool) of group g may take, gram their held distances."""
        pairs = self.pairs
        c = count + CANDIDATE_MARGIN
        m = self.labels.numel()
        top = torch.full((m, c), float("inf"))
        position = torch.full((m, c), -1, dtype=torch.long)
        n_allowed = torch.zeros(m, dtype=torch.long)
        for g in range(len(pairs.groups)):
            rows: slice | Tensor = pairs.rows(g)
            gram = pairs.distances(g)
            pick = wanted[rows]
            if not bool(pick.all()):  # a copy of the rows left, not of the whole block
                if not bool(pick.any()):
                    continue
                local = pick.nonzero().squeeze(1)
                rows, gram = rows.start + local, gram[local]
            ok = allowed(g, rows, gram)
            width = min(c, gram.shape[1])
            values, at = torch.where(ok, gram, float("inf")).topk(width, dim=1, largest=False)
            top[rows, :width] = values
            held = self.position[pairs.columns(g)]
            position[rows, :width] = held[at].masked_fill_(~ok.gather(1, at), -1)
            n_allowed[rows] = ok.sum(1)
        return top[wanted], position[wanted], n_allowed[wanted]

    def _measure_full_rows(self, rows: Tensor, nearest: Tensor, at: Tensor, k: int) -> None:
        """The k nearest of ``rows`` (sorted order) against the whole pool, in float64: their
        measured squared distances into ``nearest``, their token positions into ``at``."""
        if rows.numel() == 0:
            return
        position = self.position
        allowed = position.unsqueeze(0) != position[rows].unsqueeze(1)
        nearest[rows], at[rows] = exact_nearest_rows(
            self.features,
            self.sketch.x,
            position[rows],
            position,
            None,
            allowed,
            k,
            self.rounding[rows],
        )

    def delta(self, log_rho: Tensor) -> Tensor | None:
        """delta (M,), Eq. (4) (module doc, 4): a row with a denser token among its k nearest
        (``density``'s, measured) takes the nearest such, since every other token is at least as
        far as its k-th; the others, the nearest denser token among the distances held, then a
        full row for every row that leaves open.  None past ``MAX_FULL_ROWS``."""
        pairs, position = self.pairs, self.position
        m = position.numel()

        # Eq. (4)'s order as one rank per token (``ops.denser_than``: by log rho, equal ones by
        # position), so that "denser" is one comparison per held pair
        by_position = torch.sort(position).indices
        order = by_position[torch.sort(log_rho[by_position], descending=True, stable=True).indices]
        rank = torch.empty_like(order).index_copy_(0, order, torch.arange(order.numel()))

        if self.neighbours is None:
            raise RuntimeError("delta needs the k nearest of density() first")
        near_d2, near_at = self.neighbours
        slot = torch.zeros(int(position.max()) + 1, dtype=torch.long)
        slot[position] = torch.arange(m)  # token position -> row of the sorted pool
        their_rank = rank[slot[near_at.clamp(min=0)]]
        listed, measured = nearest_denser_listed(near_d2, near_at, their_rank, rank)
        active = ~listed  # the rows the held distances and full rows decide
        todo = active.nonzero().squeeze(1)

        def denser_held(g: int, rows: slice | Tensor, gram: Tensor) -> Tensor:
            return rank[pairs.columns(g)].unsqueeze(0) < rank[rows].unsqueeze(1)

        top, nearest, n_allowed = self.candidates(1, denser_held, active)
        best = torch.full((m,), float("inf"))
        best[todo] = top[:, 0]  # rounded squared distance to the nearest denser token held
        held, _, certified = measure_candidates(
            self.features, position[todo], top, nearest, n_allowed, 1, self.rounding[todo]
        )
        measured[todo] = held[:, 0]
        uncertified = torch.zeros(m, dtype=torch.bool)
        uncertified[todo] = ~certified
        # cell b holds a token denser than i iff its densest token is denser than i
        labels = self.labels
        cell_rho = torch.full((self.n_cells,), float("-inf"))
        cell_rho.scatter_reduce_(0, labels, log_rho, "amax")
        at_top = log_rho == cell_rho[labels]
        cell_position = torch.full((self.n_cells,), int(position.max()) + 1)
        cell_position.scatter_reduce_(0, labels[at_top], position[at_top], "amin")
        bound = best + self.rounding  # a nearer denser token held nowhere must be within it
        needs_more = self.wanted(bound, (log_rho, cell_rho, cell_position), active=active)[1]
        open_rows = ((needs_more | torch.isinf(best) | uncertified) & active).nonzero().squeeze(1)
        if open_rows.numel() > MAX_FULL_ROWS:
            return None
        x, sq = self.sketch.x, self.sketch.sq
        # full rows cost (rows x N) each pass, and their count grows with the scenes: the
        # products in place, "denser" one rank comparison, the densest row (rank 0) alone
        for block in row_blocks(open_rows.numel(), x.shape[0]):
            rows = open_rows[block]
            token = position[rows]
            d2 = torch.addmm(sq, x[token], x.T, alpha=-2.0)
            d2 = d2.add_(sq[token].unsqueeze(1)).clamp_(min=0.0)[:, position]  # sorted order
            for peak in (False, True):  # rows with a denser token; the densest (Eq. 4)
                pick = ((rank[rows] == 0) == peak).nonzero().squeeze(1)
                if pick.numel() == 0:
                    continue
                if peak:
                    allowed = position.unsqueeze(0) != token[pick].unsqueeze(1)
                else:
                    allowed = rank.unsqueeze(0) < rank[rows[pick]].unsqueeze(1)
                values, _ = exact_nearest_rows(
                    self.features,
                    x,
                    token[pick],
                    position,
                    d2 if pick.numel() == rows.numel() else d2[pick],
                    allowed,
                    1,
                    self.rounding[rows[pick]],
                    largest=peak,
                )
                measured[rows[pick]] = values[:, 0].clamp(min=0.0)
        return distance_from_squared(measured, 1.0)

    def unsorted(self, values: Tensor) -> Tensor:
        """``values`` (M,) of the sorted tokens, back in the order of ``members``."""
        return torch.empty_like(values).index_copy_(0, self.order, values)
