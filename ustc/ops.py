"""Small tensor operations shared by the stages: ordering, selection, grouping, chunked distances."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

#: largest number of pairwise entries computed at once (rows x N); keeps 256 x 196 tokens bounded
PAIRWISE_BLOCK = 1 << 22


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


def peak_from_distances(d: Tensor, denser: Tensor, member: Tensor) -> Tensor:
    """delta of Eq. (4) from distance rows d (..., N): the nearest ``denser`` column, or for a row
    with none (the densest) the farthest ``member`` column.  d(i, i) = 0 cannot be that maximum
    of non-negative distances, so rows need no self mask."""
    to_denser = d.masked_fill(~denser, float("inf")).amin(-1)
    farthest = d.masked_fill(~member, 0.0).amax(-1)
    return torch.where(denser.any(-1), to_denser, farthest)


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
    """||x_i - x_j||^2 for all pairs of x (B, N, D), float32 (B, N, N), exactly symmetric.

    Only the blocks on and above the diagonal are multiplied; the others are their transposes,
    which halves the N^2 D work of the full matrix.
    """
    b, n, _ = x.shape
    x = x.float()
    sq = squared_norms(x)
    out = torch.empty(b, n, n, device=x.device)
    for i in range(0, n, _GRAM_BLOCK):
        rows = slice(i, min(i + _GRAM_BLOCK, n))
        for j in range(i, n, _GRAM_BLOCK):
            cols = slice(j, min(j + _GRAM_BLOCK, n))
            block = (
                sq[:, rows, None]
                + sq[:, None, cols]
                - 2.0 * torch.bmm(x[:, rows], x[:, cols].transpose(1, 2))
            )
            block.clamp_(min=0.0)
            out[:, rows, cols] = block
            if j != i:
                out[:, cols, rows] = block.transpose(1, 2)
    return out


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """||a_i - b_j||^2 for a (B, Na, D) and b (B, Nb, D), in float32, clamped at 0.  (B, Na, Nb)."""
    a = a.float()
    b = b.float()
    d2 = (
        squared_norms(a).unsqueeze(-1)
        + squared_norms(b).unsqueeze(1)
        - 2.0 * torch.bmm(a, b.transpose(1, 2))
    )
    return d2.clamp_(min=0.0)
