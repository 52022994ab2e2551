"""What the baselines share: input checks, per-frame budgets, quotas, and building the result.

Every baseline ends the same way: a set of kept positions (the output tokens, in original
spatiotemporal order) and, for each original token, the kept position it was merged into (or -1
when it is dropped).  ``result_from_owner`` turns that into a ``CompressionResult``, so no
baseline repeats the slot bookkeeping.

Stage codes of ``CompressionResult.status`` for baselines (there is no retention pool):
RETAINED = the token is an output token's own position; REJECTED = judged redundant and merged
into another output token; UNVISITED = dropped outright.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from ustc.ops import group_mean, group_sizes, slot_map, sorted_indices, top_count_mask
from ustc.pool import REJECTED, RETAINED, UNVISITED
from ustc.results import CompressionResult


def check_method_inputs(
    name: str, features: Tensor, attention: Tensor | None, budget: int, needs_attention: bool
) -> tuple[int, int, int, int]:
    """Validate a baseline's ``compress`` arguments; returns (B, F, P, D).

    ``Compressor.compress`` checks features and attention before calling a method; this repeats
    the cheap checks so that a baseline called directly fails just as clearly.
    """
    if not isinstance(features, Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{name}: features must be a (B, F, P, D) tensor, got {shape}")
    b, f, p, d = features.shape
    if min(b, f, p, d) < 1:
        raise ValueError(f"{name}: features must be non-empty, got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"{name}: features must be floating point, got {features.dtype}")
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= f * p:
        raise ValueError(f"{name}: budget must be an integer in [1, F*P = {f * p}], got {budget!r}")
    if needs_attention:
        if attention is None:
            raise ValueError(
                f"{name} needs per-token vision attention scores (B, F, P) = {(b, f, p)}, got None"
            )
        if tuple(attention.shape) != (b, f, p):
            raise ValueError(
                f"{name}: attention must be (B, F, P) = {(b, f, p)}, got {tuple(attention.shape)}"
            )
    return b, f, p, d


def check_counts(**values: int) -> None:
    """Each keyword must be an integer >= 1 (a bool is not): ``segments must be an integer >= 1``."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_unit_range(*checks: tuple[str, float, float]) -> None:
    """Each (name, value, lo) must be a number in [lo, 1]: ``segment_tau must be in [-1, 1]``."""
    for name, value, lo in checks:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= 1:
            raise ValueError(f"{name} must be in [{lo:g}, 1], got {value!r}")


def per_frame_budget(name: str, budget: int, frames: int) -> int:
    """q = budget / F for methods that keep the same number of tokens in every frame.

    ``CompressionConfig.budget`` is always F times a per-frame count; any other budget is refused
    rather than silently rounded, since the method must return exactly ``budget`` tokens.
    """
    if budget % frames:
        raise ValueError(
            f"{name} keeps the same number of tokens in every frame, so the budget must be a "
            f"multiple of F = {frames} (CompressionConfig.budget always is), got {budget}"
        )
    return budget // frames


class TopAttentionPerFrame:
    """Base of the methods that keep each frame's highest-attention tokens (Eq. 1) and fill the
    rest of the frame's q = budget / F output tokens with contextual ones (VisionZip, FastVID),
    before the LLM only.  A subclass says how q splits (``split``) and builds the result from
    the kept tokens (``add_contextual``)."""

    #: the in-LLM stage as published (both prune before the LLM only);
    #: applied by ``run.py --method`` unless --merger is given (ustc.registry.method_in_llm)
    in_llm: ClassVar[dict[str, str]] = {"merger": "none"}

    uses_attention = True

    def split(self, per_frame: int) -> tuple[int, int]:
        """(top, contextual) output tokens of a frame with ``per_frame`` = q output tokens."""
        raise NotImplementedError

    def add_contextual(
        self, features: Tensor, top: Tensor, contextual: int, budget: int
    ) -> CompressionResult:
        """The result of ``top`` (B*F, P) kept tokens of features (B, F, P, D) plus
        ``contextual`` tokens per frame."""
        raise NotImplementedError

    def compress(
        self, features: Tensor, attention: Tensor | None, budget: int
    ) -> CompressionResult:
        """features: (B, F, P, D); attention: (B, F, P).  Returns ``budget`` tokens per video."""
        name = self.registered_name  # type: ignore[attr-defined]
        b, f, p, _ = check_method_inputs(name, features, attention, budget, True)
        assert attention is not None
        top, contextual = self.split(per_frame_budget(name, budget, f))
        mask = top_count_mask(attention.reshape(b * f, p).float(), top)
        return self.add_contextual(features, mask, contextual, budget)


def proportional_quota(sizes: list[int], total: int) -> list[int]:
    """Split ``total`` slots over groups in proportion to their ``sizes``, never above a size.

    Largest-remainder (Hamilton) apportionment: each group gets floor(total * size / sum), the
    leftover slots go to the largest fractional parts (ties: earlier group), and slots a full
    group cannot take move on to the others.  The quotas sum to ``min(total, sum(sizes))``.
    """
    capacity = sum(sizes)
    total = min(total, capacity)
    if total <= 0 or capacity == 0:
        return [0] * len(sizes)
    exact = [total * s / capacity for s in sizes]
    quota = [min(s, math.floor(e)) for s, e in zip(sizes, exact, strict=True)]
    order = sorted(range(len(sizes)), key=lambda g: (-(exact[g] - math.floor(exact[g])), g))
    missing = total - sum(quota)
    while missing > 0:
        for g in order:
            if missing == 0:
                break
            if quota[g] < sizes[g]:
                quota[g] += 1
                missing -= 1
    return quota


def result_from_owner(x: Tensor, keep: Tensor, owner: Tensor, budget: int) -> CompressionResult:
    """The ``CompressionResult`` of a baseline that keeps ``keep`` and merges along ``owner``.

    x:     (B, N, D) original tokens.
    keep:  (B, N) bool, exactly ``budget`` True per row: the output tokens' own positions.
    owner: (B, N) long, the kept position each original token is merged into (a kept token owns
           itself), -1 for a dropped token.
    Output tokens are plain means of their members (``ops.group_mean``).
    """
    counts = keep.sum(dim=1)
    if bool((counts != budget).any()):
        raise RuntimeError(f"a baseline kept {counts.tolist()} tokens instead of {budget}")
    n = x.shape[1]
    own = torch.arange(n, device=x.device).expand_as(keep)
    owner = torch.where(keep, own, owner)
    indices = sorted_indices(keep, budget)
    slots = slot_map(indices, n)
    assignment = torch.where(owner >= 0, slots.gather(1, owner.clamp(min=0)), -1)
    if bool(((owner >= 0) & (assignment < 0)).any()):
        raise RuntimeError("a baseline merged a token into a position that is not kept")
    status = torch.where(keep, RETAINED, torch.where(owner >= 0, REJECTED, UNVISITED)).to(
        torch.int8
    )
    return CompressionResult(
        tokens=group_mean(x, assignment, indices),
        indices=indices,
        assignment=assignment,
        merged=group_sizes(assignment, budget) > 1,
        status=status,
    )


def nearest_kept(unit: Tensor, keep: Tensor, candidates: Tensor | None = None) -> Tensor:
    """For every token, the kept position with the highest cosine similarity (ties: lower index).

    unit: (G, L, D) unit vectors; keep: (G, L) bool, at least one True per row; candidates:
    optional (G, L) bool restricting which tokens are assigned (others get -1).  Returns (G, L)
    long positions in [0, L).  Memory (G, L, L).
    """
    sims = torch.bmm(unit, unit.transpose(1, 2))
    sims = sims.masked_fill(~keep.unsqueeze(1), float("-inf"))
    nearest = sims.argmax(dim=-1)  # argmax returns the first maximum: lower index on ties
    if candidates is not None:
        nearest = torch.where(candidates, nearest, -1)
    return nearest


def unit_vectors(x: Tensor) -> Tensor:
    """x / ||x|| in float32 (cosine similarities as dot products)."""
    return torch.nn.functional.normalize(x.float(), dim=-1)
