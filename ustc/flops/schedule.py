"""The token schedule of a count: n_i tokens entering every decoder layer, from the same
``CompressionConfig`` the compressor runs with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ustc.config import CompressionConfig
from ustc.flops.specs import ModelSpec, _check_int

MergeAt = Literal["input", "output"]
"""Where the in-LLM merger reduces the visual tokens relative to layer K (0-based).

``"input"`` (default): before layer K, so layers 0..K-1 see n tokens and layers K..T-1 see n'.
This is what ustc's model adapters do: layer K's own attention (recomputed from its input)
selects the tokens, and layer K already runs on the kept ones, as in FastV's code.
``"output"``: after layer K, so layers 0..K see n.  This is the convention that reproduces the
paper's FLOPs columns, for its own rows (K = 18) and for FastV (K = 2): the paper counts one
more full-length layer than the method runs.
"""

_MERGE_AT = ("input", "output")


@dataclass(frozen=True)
class TokenSchedule:
    """n_i of Eq. S3: the tokens each decoder layer sees in the prefill.

    visual: visual tokens entering each layer, one entry per layer (length T).
    text:   text tokens (system prompt, question) every layer also sees; the paper's tables
            count none.
    """

    visual: tuple[int, ...]
    text: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "visual", tuple(self.visual))
        if not self.visual:
            raise ValueError("a token schedule needs at least one layer")
        for i, n in enumerate(self.visual):
            _check_int(f"visual tokens at layer {i}", n, minimum=0)
        _check_int("text tokens", self.text, minimum=0)

    @property
    def tokens(self) -> tuple[int, ...]:
        """n_i = visual_i + text for every layer."""
        return tuple(n + self.text for n in self.visual)

    @property
    def num_layers(self) -> int:
        return len(self.visual)

    @classmethod
    def uniform(cls, num_layers: int, visual: int, text: int = 0) -> TokenSchedule:
        """The same count at every layer (no in-LLM merging)."""
        _check_int("num_layers", num_layers, minimum=1)
        return cls((visual,) * num_layers, text)

    @classmethod
    def from_config(
        cls,
        config: CompressionConfig,
        spec: ModelSpec,
        *,
        text_tokens: int = 0,
        merge_at: MergeAt = "input",
    ) -> TokenSchedule:
        """The schedule a compressor with ``config`` produces on ``spec``'s video.

        n = config.budget(F, P) visual tokens enter the LLM; with a merger, n' =
        config.kept_after_merge(n) remain from layer K = config.layer (``merge_at="input"``, what
        the adapters run) or from layer K + 1 (``merge_at="output"``, the paper's FLOPs convention).
        """
        return cls._reduced(
            config, spec, config.budget(spec.frames, spec.tokens_per_frame), text_tokens, merge_at
        )

    @classmethod
    def _reduced(
        cls,
        config: CompressionConfig,
        spec: ModelSpec,
        entering: int,
        text_tokens: int,
        merge_at: MergeAt,
    ) -> TokenSchedule:
        """``entering`` visual tokens, reduced by ``config``'s merger at layer K."""
        if merge_at not in _MERGE_AT:
            raise ValueError(f"merge_at must be one of {_MERGE_AT}, got {merge_at!r}")
        layers = spec.num_layers
        kept = config.kept_after_merge(entering)
        if config.merger == "none" or kept == entering:
            return cls.uniform(layers, entering, text_tokens)
        if config.layer > layers:
            raise ValueError(
                f"merge layer K={config.layer} is beyond the {layers} decoder layers of "
                f"{spec.name}; K must be in [0, {layers}]"
            )
        first_reduced = min(layers, config.layer + (merge_at == "output"))
        visual = (entering,) * first_reduced + (kept,) * (layers - first_reduced)
        return cls(visual, text_tokens)
