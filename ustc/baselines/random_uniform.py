"""Sanity floors at the same budget: random selection and per-frame uniform (evenly spaced) selection.

Neither looks at the content of a token.  A compressor that does not beat them at a given budget
has learnt nothing from attention or similarity.

    CompressionConfig(scorer="random", recycler="none", merger="none", params={"seed": 0})
    CompressionConfig(method="uniform", merger="none")
"""

from __future__ import annotations

import torch
from torch import Tensor

from ustc.baselines._common import check_method_inputs, per_frame_budget, result_from_owner
from ustc.registry import METHODS, SCORERS
from ustc.results import CompressionResult
from ustc.scoring import Scorer


@SCORERS.register("random")
class RandomScorer(Scorer):
    """Random priority: with ``recycler="none"`` the pool keeps a uniformly random ``budget`` tokens.

    The priorities are drawn from a CPU generator seeded with ``seed`` on every call, so the
    selection is reproducible and the same on every device; it depends only on (B, N) and the
    seed, never on the features.  Use it with ``recycler="none"`` (the DPC recycler would spend
    30 % of the budget on cluster tokens, which is no longer random selection).
    """

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = seed

    def score(self, features: Tensor, attention: Tensor | None) -> Tensor:
        """features: (B, N, D).  Returns (B, N) priorities uniform in [0, 1)."""
        generator = torch.Generator().manual_seed(self.seed)
        priority = torch.rand(features.shape[:2], generator=generator)
        return priority.to(features.device)


def evenly_spaced(tokens_per_frame: int, count: int, device: torch.device | None = None) -> Tensor:
    """p_j = floor((j + 1/2) * P / q),  j = 0..q-1: the centres of q equal runs of the frame.

    Positions in raster order within one frame of P tokens.  Returns (q,) long, ascending and
    distinct for 1 <= q <= P.
    """
    if not 1 <= count <= tokens_per_frame:
        raise ValueError(f"count must be in [1, P = {tokens_per_frame}], got {count}")
    j = torch.arange(count, device=device, dtype=torch.float64)
    return torch.floor((j + 0.5) * tokens_per_frame / count).long()


@METHODS.register("uniform")
class UniformSelection:
    """Keep ``budget / F`` evenly spaced tokens of every frame (``evenly_spaced``), drop the rest.

    The same positions in every frame, in raster order; no attention, no similarity.
    """

    #: the in-LLM stage as published (a selection before the LLM, nothing inside it);
    #: applied by ``run.py --method`` unless --merger is given (ustc.registry.method_in_llm)
    in_llm = {"merger": "none"}

    uses_attention = False

    def compress(
        self, features: Tensor, attention: Tensor | None, budget: int
    ) -> CompressionResult:
        """features: (B, F, P, D); attention unused.  Returns ``budget`` tokens per video."""
        b, f, p, _ = check_method_inputs("uniform", features, attention, budget, False)
        q = per_frame_budget("uniform", budget, f)
        device = features.device
        columns = evenly_spaced(p, q, device)
        keep = torch.zeros(b, f, p, dtype=torch.bool, device=device)
        keep[:, :, columns] = True
        x = features.reshape(b, f * p, -1)
        dropped = torch.full((b, f * p), -1, dtype=torch.long, device=device)
        return result_from_owner(x, keep.reshape(b, f * p), dropped, budget)
