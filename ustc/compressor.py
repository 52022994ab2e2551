"""Composes the strategies; the only place that knows the order of the stages.

features (B, F, P, D) + scores (B, F, P)
  -> scorer:   candidate priority                                       (Eq. 1)
  -> pool:     retention pool, capacity = budget - cluster slots        (Eq. 2)
  -> recycler: the rest becomes cluster tokens, refilled into the pool  (Eq. 3-4)
  -> tokens in original spatiotemporal order                            -> LLM
inside the LLM, layer K:
  -> merger:   keep R of the visual tokens, merge the rest into them    (Eq. 5-10)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ustc import strategies  # noqa: F401  (registers the built-in strategies)
from ustc.config import CompressionConfig, round_half_up
from ustc.merging import MergeResult
from ustc.ops import group_mean, group_sizes, slot_map, sorted_indices
from ustc.pool import REJECTED, RETAINED, UNVISITED, PoolFill
from ustc.registry import MERGERS, METHODS, POOLS, RECYCLERS, SCORERS
from ustc.results import CompressionResult

__all__ = [
    "REJECTED",
    "RETAINED",
    "UNVISITED",
    "CompressionResult",
    "Compressor",
    "MergeResult",
]


@METHODS.register("ustc")
class UnifiedCompression:
    """The paper's external compression (Eq. 1-4), composed from the config's scorer, pool and
    recycler by ``Compressor``.  Registered so that ``method="ustc"`` is a name like the others."""


class Compressor:
    """The paper's method (or any ablation of it, or a baseline), built from a ``CompressionConfig``.

    A baseline registered in ``ustc.METHODS`` replaces the external stage: it is built with the
    config values its constructor takes and must provide ``uses_attention`` and
    ``compress(features (B, F, P, D), attention (B, F, P) | None, budget) -> CompressionResult``.
    """

    def __init__(self, config: CompressionConfig | None = None) -> None:
        self.config = config if config is not None else CompressionConfig()
        values = self.config.strategy_values()
        self.method = METHODS.build_from(self.config.method, values)
        self.scorer = SCORERS.build_from(self.config.scorer, values)
        self.pool = POOLS.build_from(self.config.pool, values)
        self.recycler = RECYCLERS.build_from(self.config.recycler, values)
        self.merger = MERGERS.build_from(self.config.merger, values)

    def __repr__(self) -> str:
        return f"Compressor({self.config!r})"

    @property
    def needs_attention(self) -> bool:
        """Whether ``compress`` needs per-token vision attention scores (Eq. 1)."""
        if not isinstance(self.method, UnifiedCompression):
            return bool(self.method.uses_attention)
        pool_used = self.config.recycler == "none" or self.config.cluster_ratio < 1.0
        return self.scorer.uses_attention and pool_used

    @property
    def has_merger(self) -> bool:
        return self.config.merger != "none"

    @property
    def merger_needs_attention(self) -> bool:
        return self.has_merger and self.merger.uses_attention

    def _capacity(self, budget: int) -> int:
        """Retention-pool slots: the budget less the cluster share (rounded half up)."""
        if self.config.recycler == "none":
            return budget
        return budget - round_half_up(self.config.cluster_ratio * budget)

    def compress(self, features: Tensor, attention: Tensor | None = None) -> CompressionResult:
        """Unified spatiotemporal compression of a batch of videos.

        features: (B, F, P, D) visual tokens after the projector (and pooling).
        attention: (B, F, P) per-token Eq. (1) scores, or None for scorers that need none.
        Returns ``config.budget(F, P)`` tokens per video (see ``CompressionResult``).
        """
        _check_inputs(features, attention)
        b, f, p, d = features.shape
        n = f * p
        x = features.reshape(b, n, d)
        budget = self.config.budget(f, p)
        if budget >= n:  # retention 1: nothing to choose, the input passes unchanged
            positions = torch.arange(n, device=x.device).expand(b, n)
            return CompressionResult(
                tokens=x,
                indices=positions,
                assignment=positions,
                merged=torch.zeros(b, n, dtype=torch.bool, device=x.device),
                status=torch.full((b, n), RETAINED, dtype=torch.int8, device=x.device),
            )
        if not isinstance(self.method, UnifiedCompression):
            return self.method.compress(features, attention, budget)
        capacity = self._capacity(budget)
        scores = None if attention is None else attention.reshape(b, n)
        if capacity > 0:
            priority = self.scorer.score(x, scores)
            fill = self.pool.fill(x, priority, capacity, self.scorer.filters_redundancy)
        else:  # the whole budget is cluster tokens ("Cluster only" of Table 5)
            priority = None
            fill = PoolFill(
                admitted=torch.zeros(b, n, dtype=torch.bool, device=x.device),
                status=torch.full((b, n), UNVISITED, dtype=torch.int8, device=x.device),
            )
        admitted = fill.admitted
        # slots the pool could not fill (too few candidates passed tau) go to the recycler
        n_slots = budget - admitted.sum(dim=1)
        recycled = self.recycler.recycle(x, ~admitted, n_slots, priority)
        keep = admitted | recycled.centers
        indices = sorted_indices(keep, budget)
        own = torch.arange(n, device=x.device).expand(b, n)
        owner = torch.where(admitted, own, recycled.owner)
        slots = slot_map(indices, n)
        assignment = torch.where(owner >= 0, slots.gather(1, owner.clamp(min=0)), -1)
        return CompressionResult(
            tokens=group_mean(x, assignment, indices),
            indices=indices,
            assignment=assignment,
            merged=group_sizes(assignment, budget) > 1,
            status=fill.status,
        )

    def merge(
        self,
        visual: Tensor,
        text: Tensor,
        text_attention: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> MergeResult:
        """In-LLM merging at layer K: keep ``config.kept_after_merge(Nv)`` visual tokens.

        visual: (B, Nv, D); text: (B, Nq, D); text_attention: (B, Nq, Nv) or None; text_mask:
        (B, Nq) bool or None, the text columns that count in each row (right-aligned text).
        """
        count = self.config.kept_after_merge(visual.shape[1])
        if not self.has_merger:
            b, nv, _ = visual.shape
            positions = torch.arange(nv, device=visual.device).expand(b, nv)
            return MergeResult(visual, positions, positions)
        return self.merger.merge(visual, text, text_attention, count, text_mask=text_mask)


def _check_inputs(features: Tensor, attention: Tensor | None) -> None:
    if isinstance(features, Tensor) and features.device.type == "meta":
        raise ValueError(
            "features are on the 'meta' device (shapes without data): load the model's weights "
            "(or move the features to a real device) before compressing"
        )
    if not isinstance(features, Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a (B, F, P, D) tensor, got {shape}")
    if min(features.shape) < 1:
        raise ValueError(
            f"features must be non-empty in every dimension (B, F, P, D), got {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point, got {features.dtype}")
    if not _all_finite(features):
        raise ValueError("features contain NaN or infinite values")
    if attention is not None:
        if not isinstance(attention, Tensor):
            raise ValueError(
                f"attention must be a (B, F, P) tensor or None, got {type(attention).__name__}"
            )
        if tuple(attention.shape) != tuple(features.shape[:3]):
            raise ValueError(
                f"attention must be (B, F, P) = {tuple(features.shape[:3])}, "
                f"got {tuple(attention.shape)}"
            )
        if not _all_finite(attention):
            raise ValueError("attention scores contain NaN or infinite values")


def _all_finite(x: Tensor) -> bool:
    # one reduction instead of a full boolean copy: NaN propagates through min/max, inf shows
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))
