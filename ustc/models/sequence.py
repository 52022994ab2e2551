"""Cutting a prompt's sequence: kept columns per row, padding slots, masks and positions.

Rows of a batch keep different columns (and, with videos of different sizes, different numbers of
them); every helper here takes (B, m) column indices in which -1 marks a padding slot.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ustc.models.compat import version_note


def gather_columns(x: Tensor, keep: Tensor, batch: int, dim: int = -1) -> Tensor:
    """Columns ``keep`` (B, m) of ``x`` along ``dim``; x is (..., B or 1, n, ...)."""
    dim = dim % x.dim()
    batch_dim = dim - 1
    shape = list(x.shape)
    shape[batch_dim] = batch
    x = x.expand(*shape)
    index_shape = [1] * x.dim()
    index_shape[batch_dim], index_shape[dim] = batch, keep.shape[1]
    index = keep.to(x.device).view(index_shape)
    target = list(x.shape)
    target[dim] = keep.shape[1]
    return x.gather(dim, index.expand(*target))


def slice_mask(mask: Tensor, rows: Tensor | None, columns: Tensor) -> Tensor:
    """Cut a layer's attention mask to the kept query rows and key columns (-1: padding slot).

    4-D (B or 1, 1, q, kv) masks (eager, or sdpa with padding) lose rows and columns; 2-D (B, kv)
    padding masks (flash attention) lose columns.  Padding slots are masked out.
    """
    b = columns.shape[0]
    if mask.dim() == 2:
        return take_columns(mask, columns, fill=0)
    if mask.dim() != 4:
        raise ValueError(f"unexpected attention mask shape {tuple(mask.shape)}{version_note()}")
    mask = mask.expand(b, *mask.shape[1:])
    _, h, q, kv = mask.shape
    if rows is not None:
        q = rows.shape[1]
        index = rows.clamp(min=0).to(mask.device)[:, None, :, None].expand(b, h, q, kv)
        mask = mask.gather(2, index)
    index = columns.clamp(min=0).to(mask.device)[:, None, None, :].expand(b, h, q, columns.shape[1])
    cut = mask.gather(3, index)
    blocked = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    return cut.masked_fill((columns < 0).to(mask.device)[:, None, None, :], blocked)


def padding_mask(columns: Tensor, queries: int) -> Tensor:
    """(B, 1, q, kv) bool mask: causal over the last ``queries`` columns, padding slots masked."""
    kv = columns.shape[1]
    rows = torch.arange(kv - queries, kv, device=columns.device)
    causal = torch.arange(kv, device=columns.device)[None, :] <= rows[:, None]
    return (causal[None] & (columns >= 0)[:, None, :])[:, None]


def rebuilt_mask(like: Tensor, columns: Tensor, valid: Tensor, queries: int) -> Tensor:
    """(B, 1, q, kv) mask of ``like``'s kind (bool, or additive float) over ``columns`` of a
    sequence whose first ``valid.shape[1]`` columns are real where ``valid`` (B, n') says so and
    whose later columns (decoded tokens) are all real; -1 columns are padding slots.  Causal over
    the last ``queries`` columns."""
    n = valid.shape[1]
    inside = take_columns(valid, columns.clamp(max=n - 1), fill=False)
    real = torch.where(columns < n, inside, columns >= 0)
    allowed = padding_mask(columns, queries) & real[:, None, None, :].to(columns.device)
    if like.dtype == torch.bool:
        return allowed.to(like.device)
    blocked = torch.finfo(like.dtype).min
    zeros = torch.zeros(allowed.shape, dtype=like.dtype, device=like.device)
    return zeros.masked_fill(~allowed.to(like.device), blocked)


def take_columns(x: Tensor, columns: Tensor, fill: float | bool | None = None) -> Tensor:
    """``x[b, columns[b]]`` for x (B, n) or (B, n, D) and columns (B, m); a -1 column gives
    ``fill`` (padding slots)."""
    index = columns.clamp(min=0).to(x.device)
    if x.dim() == 3:
        out = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    else:
        out = x.gather(1, index)
    if fill is None:
        return out
    pad = (columns < 0).to(x.device)
    return out.masked_fill(pad[..., None] if x.dim() == 3 else pad, fill)


def packed_columns(kept: Tensor) -> Tensor:
    """Each row's kept columns in order, right-aligned to the longest row, -1 on the left.

    kept: (B, n) bool.  Returns (B, max_b count_b) long.  Padding goes to the left, as in a
    left-padded batch, so that every row's last column is its last token (``generate()`` reads
    the next token there), whether the caller padded left or right.
    """
    n = kept.shape[1]
    counts = kept.sum(dim=1)
    width = int(counts.max())
    # a stable sort puts each row's dropped columns first and its kept ones last, both in order
    order = torch.sort(kept.to(torch.uint8), dim=1, stable=True).indices[:, n - width :]
    slot = torch.arange(width, device=kept.device)
    return torch.where(slot >= (width - counts)[:, None], order, -1)


def default_positions(mask: Tensor | None, batch: int, n: int, device: torch.device) -> Tensor:
    """1-D positions of a prompt when the caller gave none: 0..n-1, or counted over the unmasked
    tokens of each row when the batch is padded (the rule of transformers' ``generate()``)."""
    if mask is None or bool(mask.all()):
        return torch.arange(n, device=device).expand(batch, n)
    positions = mask.long().cumsum(dim=-1) - 1
    return positions.masked_fill(mask == 0, 1).to(device)


def next_position_after(positions: Tensor, keep: Tensor) -> Tensor:
    """Position after each row's last kept token, per axis: (B,) or (axes, B)."""
    return positions.masked_fill(keep.to(positions.device) < 0, -1).amax(dim=-1) + 1


def shape_groups(
    frames: list[int], per_frame: list[int], device: torch.device
) -> list[tuple[Tensor, tuple[int, int]]]:
    """Rows whose videos have the same F x P, in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for row, shape in enumerate(zip(frames, per_frame, strict=True)):
        groups.setdefault(shape, []).append(row)
    return [(torch.tensor(rows, device=device), shape) for shape, rows in groups.items()]


def first_given(value: Tensor | None, otherwise: Callable[[], Tensor]) -> Tensor:
    return value if value is not None else otherwise()


def batch_rows(x: Tensor, rows: Tensor) -> Tensor:
    """Rows of a (B or 1, ...) tensor that broadcasts over the batch."""
    return x if x.shape[0] == 1 else x[rows.to(x.device)]


def _placeholders(ids: Tensor, token: int) -> tuple[Tensor, Tensor]:
    """(B, n) bool: where ``token`` is; (B,) how many per row, at least one in every row."""
    hits = ids == token
    counts = hits.sum(dim=1)
    if int(counts.min()) == 0:
        raise ValueError(
            "pixel_values_videos given but a prompt row holds no video placeholder tokens: "
            "exactly one video per prompt row is supported"
        )
    return hits, counts


def placeholder_runs(ids: Tensor, token: int) -> tuple[Tensor, list[int]]:
    """(first column, count) of each row's one contiguous run of ``token``: (B,), [count_b]."""
    hits, counts = _placeholders(ids, token)
    starts = hits.int().argmax(dim=1)
    columns = torch.arange(ids.shape[1], device=ids.device)
    run = (columns >= starts[:, None]) & (columns < (starts + counts)[:, None])
    if not torch.equal(run, hits):
        raise ValueError(
            "every prompt row must hold its video as one contiguous run of video placeholders; "
            "a row holds several runs (one video per prompt row is supported)"
        )
    return starts, counts.tolist()


def column_mask(columns: Tensor, n: int) -> Tensor:
    """(B, n) bool: True at the ``columns`` (B, m) of each row; -1 entries mark nothing."""
    marks = torch.zeros(columns.shape[0], n + 1, dtype=torch.bool, device=columns.device)
    marks.scatter_(1, columns.masked_fill(columns < 0, n), True)
    return marks[:, :n]


def marked_columns(marked: Tensor, count: int) -> Tensor:
    """(B, count) the first ``count`` columns of each row where ``marked`` (B, n) is True, in
    order (a row with fewer marks continues with unmarked columns: callers take its own count)."""
    # a stable sort puts each row's marked columns first, in order
    order = torch.sort((~marked).to(torch.uint8), dim=1, stable=True).indices
    return order[:, : min(count, marked.shape[1])]


def placeholder_columns(ids: Tensor, token: int) -> tuple[Tensor, list[int]]:
    """Each row's columns of ``token`` wherever they lie (a video in several runs, e.g. one per
    frame with timestamp text between): (B, max count) in order, -1 past a row's count; counts."""
    hits, counts = _placeholders(ids, token)
    width = int(counts.max())
    past_count = torch.arange(width, device=ids.device) >= counts[:, None]
    return marked_columns(hits, width).masked_fill(past_count, -1), counts.tolist()
