"""What the external compression returns: the type shared by the compressor and the baselines.

Its own module so that the strategies (``ustc.baselines``) and the compressor that composes them
both import it, and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ustc.ops import group_sizes


@dataclass(frozen=True)
class CompressionResult:
    """What the external compression produced for a batch of B videos of N = F * P tokens.

    tokens:     (B, M, D) compressed tokens in original spatiotemporal order (input dtype).
    indices:    (B, M) long, ascending: the original position (in N) of each output token; a
                cluster token sits at its center's position.
    assignment: (B, N) long: the output slot each original token went into, -1 if dropped.
    merged:     (B, M) bool: the output token is a mean of several originals.
    status:     (B, N) int8: pool stage of each original (RETAINED, REJECTED, UNVISITED).
    """

    tokens: Tensor
    indices: Tensor
    assignment: Tensor
    merged: Tensor
    status: Tensor

    @property
    def sizes(self) -> Tensor:
        """(B, M) long: how many original tokens each output token stands for."""
        return group_sizes(self.assignment, self.indices.shape[1])
