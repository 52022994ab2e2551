"""Small tensor operations shared by the stages: ordering, selection, grouping, chunked distances."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

#: largest number of pairwise entries computed at once (rows x N); keeps 256 x 196 tokens bounded
PAIRWISE_BLOCK = 1 << 22


def round_half_up(x: float) -> int:
    """Nearest integer, halves up; rounded to 9 decimals first so 0.35 * 10 counts as 3.5."""
    return math.floor(round(x, 9) + 0.5)


def descending_order(priority: Tensor) -> Tensor:
    """Indices that sort each row of ``priority`` (B, N) high to low, ties broken by lower index."""
    return torch.sort(priority, dim=-1, descending=True, stable=True).indices


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b]] for x (B, L, ...) and index (B,): (B, ...).

    ``gather`` rather than ``x[batch, index]``: advanced indexing takes milliseconds per call on
    the CPU whatever the size, and the greedy pool calls this once per admitted token.
    """
    shape = (x.shape[0], 1, *x.shape[2:])
    view = index.view(-1, *([1] * (x.dim() - 1)))
    return x.gather(1, view.expand(shape)).squeeze(1)


def put_rows(x: Tensor, index: Tensor, value: Tensor) -> None:
    """x[b, index[b]] = value[b] in place, for x (B, L, ...), index (B,), value (B, ...)."""
    shape = (x.shape[0], 1, *x.shape[2:])
    view = index.view(-1, *([1] * (x.dim() - 1)))
    x.scatter_(1, view.expand(shape), value.unsqueeze(1))


def first_n_mask(order: Tensor, counts: Tensor) -> Tensor:
    """(B, N) bool mask of the first ``counts[b]`` entries of each row of ``order`` (B, N)."""
    ranks = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    chosen_in_rank = ranks < counts.unsqueeze(-1)
    return torch.zeros_like(chosen_in_rank).scatter(-1, order, chosen_in_rank)


def top_count_mask(scores: Tensor, count: int) -> Tensor:
    """(B, N) bool: the ``count`` highest entries of each row of ``scores`` (ties: lower index)."""
    counts = torch.full((scores.shape[0],), count, dtype=torch.long, device=scores.device)
    return first_n_mask(descending_order(scores), counts)


def sorted_indices(mask: Tensor, count: int) -> Tensor:
    """Positions of the ``count`` True entries of each row of ``mask`` (B, N), ascending.

    Every row must hold exactly ``count`` True values.  Sort-based, so it needs no host sync.
    """
    n = mask.shape[-1]
    positions = torch.arange(n, device=mask.device).expand_as(mask)
    key = torch.where(mask, positions, positions + n)
    return torch.sort(key, dim=-1).values[:, :count]


def slot_map(indices: Tensor, n: int) -> Tensor:
    """(B, N) long: the output slot of each kept position in ``indices`` (B, M), -1 elsewhere."""
    b, m = indices.shape
    slots = torch.full((b, n), -1, dtype=torch.long, device=indices.device)
    return slots.scatter(1, indices, torch.arange(m, device=indices.device).expand(b, m))


def group_mean(x: Tensor, assignment: Tensor, indices: Tensor) -> Tensor:
    """Output slot m = mean of every x[b, i] with assignment[b, i] == m; unmerged tokens exact.

    x: (B, N, D); assignment: (B, N) long in [-1, M), -1 = dropped; indices: (B, M) the position
    of each slot's own token.  Slots that absorbed nothing return x[b, indices[b, m]] bit for bit;
    merged slots are averaged in float32 (or x's dtype when wider) and cast back.
    """
    b, n, d = x.shape
    m = indices.shape[1]
    own = x.gather(1, indices.unsqueeze(-1).expand(b, m, d))
    counts = group_sizes(assignment, m).unsqueeze(-1)  # (B, M, 1)
    if not bool((counts > 1).any()):  # pure selection: nothing to average
        return own
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    batch_offset = torch.arange(b, device=x.device).unsqueeze(1) * m
    # dropped tokens go to one extra trash row instead of being filtered out
    flat = torch.where(assignment >= 0, assignment + batch_offset, b * m).reshape(-1)
    sums = torch.zeros(b * m + 1, d, dtype=acc_dtype, device=x.device)
    sums.index_add_(0, flat, x.reshape(-1, d).to(acc_dtype))
    means = (sums[: b * m].view(b, m, d) / counts.clamp(min=1)).to(x.dtype)
    return torch.where(counts > 1, means, own)


def group_sizes(assignment: Tensor, m: int) -> Tensor:
    """(B, M) long: how many entries of ``assignment`` (B, N), values in [-1, M), point at each slot."""
    b = assignment.shape[0]
    valid = assignment >= 0
    counts = torch.zeros(b, m + 1, dtype=torch.long, device=assignment.device)
    counts.scatter_add_(1, torch.where(valid, assignment, m), valid.long())
    return counts[:, :m]


def row_blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    """Row slices so that a (rows x n_cols) block holds at most ``PAIRWISE_BLOCK`` entries."""
    step = max(1, PAIRWISE_BLOCK // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


#: rows per block of the symmetric Gram matrix
_GRAM_BLOCK = 1024


def denser_than(log_rho_i: Tensor, index_i: Tensor, log_rho_j: Tensor, index_j: Tensor) -> Tensor:
    """Eq. (4)'s order, broadcast: token j is denser than token i; equal densities make the lower
    index the denser, so exactly one token of a pool is the densest."""
    return (log_rho_j > log_rho_i) | ((log_rho_j == log_rho_i) & (index_j < index_i))


def nearest_denser_listed(
    near_d2: Tensor, near_at: Tensor, their_rank: Tensor, rank: Tensor
) -> tuple[Tensor, Tensor]:
    """Eq. (4) read off each token's k nearest: near_d2 (..., k) their measured squared
    distances, ascending; near_at (..., k) their positions, -1 past the pool; their_rank (..., k)
    and rank (...) places in Eq. (4)'s order (lower is denser).  Returns (...) bool, whether one
    of them is denser, and (...) the squared distance to the nearest such.  Where there is one,
    that is delta squared: every token outside the list is at least as far as the k-th."""
    denser = (near_at >= 0) & (their_rank < rank.unsqueeze(-1))
    first = denser.int().argmax(-1, keepdim=True)  # the first True: the nearest denser
    return denser.any(-1), near_d2.gather(-1, first).squeeze(-1)


#: rows per block of ``squared_norms``
_NORM_ROWS = 256


def squared_norms(x: Tensor) -> Tensor:
    """||x_i||^2 over the last dimension, in float32: ``x.float().square().sum(-1)`` bit for bit,
    but in row blocks (a fresh N x D temporary costs more than the sum on the CPU)."""
    x = x.float()
    if x.dim() < 2 or x.shape[-2] <= _NORM_ROWS:
        return x.square().sum(-1)
    # row blocks through one reused buffer: the same sums, without an N x D temporary
    out = torch.empty(x.shape[:-1], device=x.device)
    buffer = torch.empty(0, device=x.device)
    for i in range(0, x.shape[-2], _NORM_ROWS):
        block = x[..., i : i + _NORM_ROWS, :]
        torch.sum(
            torch.square(block, out=buffer.resize_(block.shape)),
            -1,
            out=out[..., i : i + _NORM_ROWS],
        )
    return out


def pairwise_squared_distances(x: Tensor) -> Tensor:
    """||x_i - x_j||^2 for all pairs of x (B, N, D), float32 (B, N, N), rounded (``gram_rounding``).

    Only the blocks on and above the diagonal are multiplied; the others are their transposes,
    which halves the N^2 D work of the full matrix.  Within a diagonal block (i, j) and (j, i)
    may differ in the last bit: the norms are added in place, one after the other.  Nothing
    decides on these values: they choose candidates, which are measured from the differences.
    """
    b, n, _ = x.shape
    x = x.float()
    sq = squared_norms(x)
    out = torch.empty(b, n, n, device=x.device)
    # up to two blocks a side the triangle saves at most a quarter of the products, less than
    # the three smaller products and the mirrored copy cost
    step = n if n <= 2 * _GRAM_BLOCK else _GRAM_BLOCK
    for i in range(0, n, step):
        rows = slice(i, min(i + step, n))
        for j in range(i, n, step):
            cols = slice(j, min(j + step, n))
            # in place on the product: three more N x N temporaries took half the time
            block = torch.bmm(x[:, rows], x[:, cols].transpose(1, 2)).mul_(-2.0)
            block.add_(sq[:, rows, None]).add_(sq[:, None, cols]).clamp_(min=0.0)
            out[:, rows, cols] = block
            if j != i:
                out[:, cols, rows] = block.transpose(1, 2)
    return out


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """||a_i - b_j||^2 for a (B, Na, D) and b (B, Nb, D), in float32, clamped at 0.  (B, Na, Nb)."""
    a = a.float()
    b = b.float()
    d2 = torch.bmm(a, b.transpose(1, 2)).mul_(-2.0)  # in place: no N x N temporaries
    return (
        d2.add_(squared_norms(a).unsqueeze(-1)).add_(squared_norms(b).unsqueeze(1)).clamp_(min=0.0)
    )


#: float32 rounding of a Gram-matrix squared distance ``||a||^2 + ||b||^2 - 2 a.b``, relative to
#: ``||a||^2 + ||b||^2``: about 60 ulp, several times what a float32 product of width 4096 loses
#: in practice (a typical bound, like ``screening.SLACK``, not a worst-case one)
GRAM_ROUNDING = 2.0**-18
#: columns measured beyond the ones asked for, so that rounding rarely leaves a row uncertified
CANDIDATE_MARGIN = 3


def centered(x: Tensor, mask: Tensor) -> Tensor:
    """x (B, N, D) in float32 less the mean of each video's ``mask`` rows (B, N).

    A shift changes no distance, but the rounding of ``||a||^2 + ||b||^2 - 2 a.b`` grows with the
    norms: tokens 0.01 apart at norm 28 lose most of their distance's digits, centred they keep
    them.  Used to choose neighbours; the distances that decide are measured by
    ``difference_distances``.
    """
    x = x.float()
    weights = mask.to(x.dtype).unsqueeze(1)  # (B, 1, N)
    mean = torch.bmm(weights, x) / weights.sum(-1, keepdim=True).clamp(min=1.0)
    return x - mean


def gram_rounding(sq: Tensor, mask: Tensor) -> Tensor:
    """(B, N) bound on the rounding of every Gram squared distance of row i to a ``mask`` column,
    from the squared norms ``sq`` (B, N) of the (centred) features: ``GRAM_ROUNDING`` times
    ``||x_i||^2 + max_j ||x_j||^2``."""
    largest = sq.masked_fill(~mask, 0.0).amax(-1, keepdim=True)
    return GRAM_ROUNDING * (sq + largest)


def difference_distances(x: Tensor, rows: Tensor, index: Tensor) -> Tensor:
    """||x_i - x_j||^2 for i = rows[r], j = index[r, c], from the differences: a difference of
    close float32 values is exact (Sterbenz), and torch's cascade sum of the squares loses a few
    ulp at most, so the value is exact to float32 within a few ulp whatever the norms (the Gram
    form loses ~eps * ||x||^2), and a pair gets the same bits wherever it is measured (exact
    duplicates get equal distances).  x (N, D) one video's features; rows (R,) long; index
    (R, C) long.  Returns (R, C) float32."""
    x = x.float()
    out = torch.empty(index.shape, device=x.device)
    step = max(1, PAIRWISE_BLOCK // max(1, index.shape[1] * x.shape[1]))
    buffer = torch.empty(0, device=x.device)  # reused: a fresh block per step costs page faults
    for start in range(0, rows.numel(), step):
        r = slice(start, start + step)
        at = index[r]
        b = torch.index_select(x, 0, at.reshape(-1), out=buffer.resize_(at.numel(), x.shape[1]))
        b = b.view(*at.shape, -1).sub_(x.index_select(0, rows[r]).unsqueeze(1)).square_()
        out[r] = b.sum(-1)
    return out


class MeasuredPairs:
    """One video's features x (N, D) with the squared distances ``difference_distances`` has
    measured on them, each unordered pair once: a pair measured for one step (a token's k
    nearest) is looked up, not measured again, by the next (its neighbour's k nearest, its
    nearest denser token).  The values are ``difference_distances``' bits: x_j - x_i is exactly
    -(x_i - x_j) in IEEE arithmetic, so both orders square and sum to the same value, and torch
    sums each of many rows over D alone, whatever the other rows (checked by
    ``tests/test_recycle.py``).  A call of one pair is measured as it comes and not stored:
    torch splits the sum of a lone output across its threads from 32768 elements on, another
    order of additions.  Pass it wherever ``measure_candidates`` and ``exact_nearest`` take x."""

    def __init__(self, x: Tensor) -> None:
        self.x = x.float()
        self.keys = torch.empty(0, dtype=torch.long, device=x.device)  # ascending i * N + j, i <= j
        self.values = torch.empty(0, device=x.device)

    def distances(self, rows: Tensor, index: Tensor) -> Tensor:
        """``difference_distances(x, rows, index)``: (R, C) float32, the new pairs measured."""
        if index.numel() <= 1:
            return difference_distances(self.x, rows, index)
        n = self.x.shape[0]
        i = rows.unsqueeze(1).expand_as(index)
        key = torch.minimum(i, index) * n + torch.maximum(i, index)  # (R, C)
        unique, inverse = torch.unique(key, return_inverse=True)
        known = self._find(unique)[1]
        # the first entry of each pair not measured yet: measured where it stands, each row's
        # new entries moved to its front and the rows taken by their count of new entries, so
        # that a row is gathered once for all its new columns
        first = torch.full(unique.shape, key.numel(), device=key.device)
        entries = torch.arange(key.numel(), device=key.device)
        first.scatter_reduce_(0, inverse.reshape(-1), entries, "amin")
        new = torch.zeros(key.numel(), dtype=torch.bool, device=key.device)
        new[first[~known]] = True
        new = new.view(key.shape)
        if bool(new.any()):
            # each entry's place: the new ones first, each part in its order (a per-row sort
            # of a few columns costs more, row by row)
            count = new.sum(1)
            place = torch.where(new, new.cumsum(1) - 1, count.unsqueeze(1) + (~new).cumsum(1) - 1)
            columns = torch.empty_like(index).scatter_(1, place, index)
            keys = torch.empty_like(key).scatter_(1, place, key)
            found_keys, found_values = [self.keys], [self.values]
            for width in torch.unique(count[count > 0]).tolist():
                take = (count == width).nonzero().squeeze(1)
                if take.numel() * width == 1:  # two rows at least (class doc)
                    take = take.repeat(2)
                measured = difference_distances(self.x, rows[take], columns[take, :width])
                found_keys.append(keys[take, :width].reshape(-1))
                found_values.append(measured.reshape(-1))
            merged = torch.cat(found_keys)
            order = torch.sort(merged).indices
            merged, values = merged[order], torch.cat(found_values)[order]
            keep = torch.ones(merged.shape, dtype=torch.bool, device=key.device)
            keep[1:] = merged[1:] != merged[:-1]  # a pair measured twice (a lone row doubled)
            self.keys, self.values = merged[keep], values[keep]
        at, _ = self._find(unique)
        return self.values[at][inverse]

    def _find(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Where each of ``keys`` (ascending) is in the store, and whether it is there."""
        if self.keys.numel() == 0:
            return torch.zeros_like(keys), torch.zeros_like(keys, dtype=torch.bool)
        at = torch.searchsorted(self.keys, keys).clamp_(max=self.keys.numel() - 1)
        return at, self.keys[at] == keys


def _measure(x: Tensor | MeasuredPairs, rows: Tensor, index: Tensor) -> Tensor:
    """``difference_distances`` on features x (N, D), or through a ``MeasuredPairs``."""
    if isinstance(x, MeasuredPairs):
        return x.distances(rows, index)
    return difference_distances(x, rows, index)


def exact_nearest(
    x: Tensor | MeasuredPairs,
    rows: Tensor,
    cols: Tensor,
    gram: Tensor,
    allowed: Tensor | None,
    count: int,
    rounding: Tensor,
    largest: bool = False,
    measure: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``count`` nearest (``largest``: farthest) allowed columns of each row, chosen on rounded
    squared distances and measured by ``difference_distances`` (``measure_candidates``).

    x (N, D) one video's features; rows (R,) their positions; cols (C,) the positions of the
    columns of ``gram`` (R, C), squared distances within ``rounding`` (R,) of the true ones;
    allowed (R, C) bool, or None where ``gram`` already holds +inf at every column a row may not
    take (nearest only: one pass less over the block).  Returns what ``measure_candidates``
    returns.
    """
    fill = float("-inf") if largest else float("inf")
    c = min(count + CANDIDATE_MARGIN, gram.shape[1])
    if allowed is None:
        if largest:
            raise ValueError("the farthest columns need an explicit allowed mask")
        top, at = gram.topk(c, dim=1, largest=False)
        position = cols[at].masked_fill_(top == fill, -1)
    else:
        # one pass over the (R, C) block: ``masked_fill(~allowed)`` makes two
        top, at = torch.where(allowed, gram, fill).topk(c, dim=1, largest=largest)
        position = cols[at].masked_fill_(~allowed.gather(1, at), -1)

    def n_allowed(redo: Tensor) -> Tensor:
        """The count of allowed columns, needed for the few rows left unsure only."""
        return (gram[redo] != fill if allowed is None else allowed[redo]).sum(1)

    return measure_candidates(x, rows, top, position, n_allowed, count, rounding, largest, measure)


def measure_candidates(
    x: Tensor | MeasuredPairs,
    rows: Tensor,
    top: Tensor,
    position: Tensor,
    n_allowed: Tensor | Callable[[Tensor], Tensor],
    count: int,
    rounding: Tensor,
    largest: bool = False,
    measure: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``count`` nearest (farthest) of each row's candidates, measured.

    top (R, c): the c >= count best rounded squared distances of each row, ascending (``largest``:
    descending), within ``rounding`` (R,) of the true ones; position (R, c): their columns' token
    positions, -1 past the ``n_allowed`` (R,) columns the row may take (or a function giving
    them for the unsure rows (U,) only).  Where the rounded values separate the count-th
    candidate from the next by more than twice the rounding, the first ``count`` are the right
    ones and only they are measured.  Elsewhere all c are measured and the row is certified
    when no column outside them can beat its count-th measured one: every such column has a
    rounded distance at least (at most) the c-th, so a true one beyond it less (plus) the
    rounding.  Equal measured distances order by position (the lower first).
    measure False: where the choice is sure, the rounded values are returned (for a caller that
    needs only the positions).

    Returns values (R, count) float32, ascending (descending), +inf (-inf) past the allowed
    columns; positions (R, count) long, -1 there; certified (R,) bool.
    """
    n_rows, c = top.shape
    fill = float("-inf") if largest else float("inf")
    sure = torch.ones(n_rows, dtype=torch.bool, device=top.device)
    if c > count:
        gap = top[:, count - 1] - top[:, count] if largest else top[:, count] - top[:, count - 1]
        sure = (position[:, count] < 0) | (gap > 2.0 * rounding)
    values, first = top[:, :count].float(), position[:, :count].clone()
    if measure:
        measured = _measure(x, rows, first.clamp(min=0))
        measured = measured.masked_fill_(first < 0, fill)
        values, order = torch.sort(measured, dim=1, descending=largest)
        first = first.gather(1, order)
    if values.shape[1] < count:  # fewer columns than asked for
        pad = count - values.shape[1]
        values = torch.cat([values, values.new_full((n_rows, pad), fill)], 1)
        first = torch.cat([first, first.new_full((n_rows, pad), -1)], 1)
    certified = sure.clone()
    if bool(sure.all()):
        return values, first, certified
    redo = (~sure).nonzero().squeeze(1)
    at, edge = position[redo], top[redo, -1]
    measured = _measure(x, rows[redo], at.clamp(min=0)).masked_fill_(at < 0, fill)
    # by value, equal values by position: a stable sort by value after one by position
    n = (x.x if isinstance(x, MeasuredPairs) else x).shape[0]
    by_position = torch.sort(at.masked_fill(at < 0, n), dim=1, stable=True).indices
    measured, at = measured.gather(1, by_position), at.gather(1, by_position)
    order = torch.sort(measured, dim=1, descending=largest, stable=True).indices[:, :count]
    values[redo], first[redo] = measured.gather(1, order), at.gather(1, order)
    last = values[redo, count - 1]
    if largest:
        ok = edge + rounding[redo] <= last
    else:
        ok = (edge - rounding[redo]).clamp(min=0.0) >= last
    allowed_redo = n_allowed(redo) if callable(n_allowed) else n_allowed[redo]
    certified[redo] = (allowed_redo <= c) | ok
    return values, first, certified


def exact_nearest_rows(
    x: Tensor | MeasuredPairs,
    xc: Tensor,
    rows: Tensor,
    cols: Tensor,
    gram: Tensor | None,
    allowed: Tensor | None,
    count: int,
    rounding: Tensor,
    largest: bool = False,
    measure: bool = True,
) -> tuple[Tensor, Tensor]:
    """``exact_nearest`` over full rows, the rows it leaves uncertified chosen again on float64
    distances of the centred features ``xc`` (N, D) (rounding ~1e-16 of the norms: exact to
    float32).  ``gram`` None: every row in float64.  ``allowed`` None: ``gram`` is +inf at the
    columns a row may not take (``exact_nearest``).  Returns values and positions (R, count)."""
    if gram is None:
        certified = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
        values = torch.empty(rows.numel(), count, device=rows.device)
        position = torch.empty(rows.numel(), count, dtype=torch.long, device=rows.device)
    else:
        values, position, certified = exact_nearest(
            x, rows, cols, gram, allowed, count, rounding, largest, measure
        )
    if bool(certified.all()):
        return values, position
    redo = (~certified).nonzero().squeeze(1)
    for block in row_blocks(redo.numel(), cols.numel()):
        again = redo[block]
        values[again], position[again], _ = exact_nearest(
            x,
            rows[again],
            cols,
            _gram64(xc, rows[again], cols),
            gram[again] != float("inf") if allowed is None else allowed[again],
            count,
            torch.zeros(again.numel(), device=rows.device),
            largest,
            measure,
        )
    return values, position


def _gram64(xc: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """float64 squared distances between the rows and the columns of xc (N, D): (R, C).  In
    column blocks: a float64 copy of every column is 1.4 GiB at 256 x 196 tokens of width 3584."""
    a = xc.index_select(0, rows).double()
    a_sq = a.square().sum(1, keepdim=True)
    out = torch.empty(rows.numel(), cols.numel(), dtype=torch.float64, device=xc.device)
    step = max(1, PAIRWISE_BLOCK // (4 * xc.shape[1]))
    for start in range(0, cols.numel(), step):
        block = slice(start, start + step)
        b = xc.index_select(0, cols[block]).double()
        out[:, block] = a_sq + b.square().sum(1) - 2.0 * (a @ b.T)
    return out.clamp_(min=0.0)


def density_from_distances(nearest: Tensor, convention: str, scale: float) -> Tensor:
    """log rho (R,) float32 from the measured squared distances (R, k') to the nearest others,
    ascending, +inf past the pool: minus their mean (paper), or minus the mean of them and the
    token's own 0, times 1 / D (tcformer).  Summed in float64, in ascending order."""
    finite = torch.isfinite(nearest)
    total = torch.where(finite, nearest.double(), 0.0).sum(-1)
    count = finite.sum(-1) + (1 if convention == "tcformer" else 0)
    return (-(total * scale) / count.clamp(min=1)).float()


def distance_from_squared(d2: Tensor, scale: float) -> Tensor:
    """d = sqrt(scale * d2) in float32, the same bits on every path."""
    if scale == 1.0:
        return d2.sqrt()
    return (d2.double() * scale).sqrt().float()
