"""The one typed configuration shared by the compressor, the model adapters, the FLOPs counter and the CLI."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ustc.ops import round_half_up

# The paper's settings (Section 4.1): tau 0.7, cluster ratio 0.3, K 18, R 50 %, lambda 0.5.
PAPER_DEFAULTS: dict[str, Any] = {
    "tau": 0.7,
    "cluster_ratio": 0.3,
    "layer": 18,
    "keep_ratio": 0.5,
    "lam": 0.5,
}


def _ceil(x: float) -> int:
    # round first so that 0.07 * 100 = 7.000000000000001 gives 7, not 8
    return math.ceil(round(x, 9))


def visual_budget(frames: int, tokens_per_frame: int, retention: float) -> int:
    """Number of visual tokens that enter the LLM: ``F * clamp(round(r * P), 1, P)``.

    The budget is the per-frame share rounded to the nearest integer (halves up, at least one
    token per frame), times the frames, spent on one global pool (no per-frame quota).  This is
    the rounding that reproduces every FLOPs figure of Tables 1-3: 32 x 196 tokens at
    10/5/2/1 % give 640/320/128/64 tokens (4.0/2.2/1.2/0.9 T, the paper's "about four tokens per
    frame" at 2 %), and LLaVA-Video's 64 x 169 at 2/1 % give 192/128 (1.5/1.2 T).  ``retention
    = 1`` keeps every token.
    """
    if frames < 1 or tokens_per_frame < 1:
        raise ValueError(
            f"a video needs at least one frame and one token per frame, got F={frames}, "
            f"P={tokens_per_frame}"
        )
    _check_ratio("retention", retention)
    per_frame = min(tokens_per_frame, max(1, round_half_up(retention * tokens_per_frame)))
    return frames * per_frame


def merge_keep(visual_tokens: int, keep_ratio: float) -> int:
    """Visual tokens kept at layer K by the in-LLM merger: ``ceil(R * n)``, at least 1 (Eq. 9)."""
    _check_ratio("keep_ratio", keep_ratio)
    if visual_tokens < 0:
        raise ValueError(f"visual token count must be >= 0, got {visual_tokens}")
    if visual_tokens == 0:
        return 0
    return max(1, min(visual_tokens, _ceil(keep_ratio * visual_tokens)))


def _is_number(value: Any) -> bool:
    # bool is an int to Python, but True is no ratio
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_ratio(name: str, value: float) -> None:
    if not _is_number(value) or not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not _is_number(value) or math.isnan(value) or not (lo <= value <= hi):
        raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {value!r}")


@dataclass(frozen=True)
class CompressionConfig:
    """What to compress and how.  Field names are the paper's symbols.

    retention:     r, fraction of the F*P visual tokens that enter the LLM (``visual_budget``).
    method:        the external compressor: ``ustc`` (the paper's, composed from the scorer, pool
                   and recycler below) or a registered baseline (``ustc.METHODS``).
    scorer:        candidate order for the retention pool: ``attn`` (Eq. 1), ``sim``, ``attn+sim``.
    pool:          how the retention pool is filled: ``greedy`` (Eq. 2, threshold ``tau``).
    tau:           tau, max cosine similarity of a candidate to the pool for admission (Eq. 2).
    recycler:      what happens to tokens not admitted: ``none`` or ``dpc`` (DPC-KNN, Eq. 3-4).
    cluster_ratio: share of the budget spent on DPC-KNN cluster tokens.
    k:             neighbours of the DPC-KNN local density (Eq. 3).
    merger:        in-LLM merging at layer K: ``none``, ``last-token``, ``text-aware`` (Eq. 5-10).
    layer:         K, the decoder layer before which the merger runs (0-based count of full layers).
    keep_ratio:    R, share of the visual tokens kept at layer K.
    lam:           lambda, weight of text similarity against text attention (Eq. 9).
    params:        extra constructor parameters of third-party strategies, by name.
    """

    retention: float = 0.02
    method: str = "ustc"
    scorer: str = "attn+sim"
    pool: str = "greedy"
    tau: float = PAPER_DEFAULTS["tau"]
    recycler: str = "dpc"
    cluster_ratio: float = PAPER_DEFAULTS["cluster_ratio"]
    k: int = 5
    merger: str = "text-aware"
    layer: int = PAPER_DEFAULTS["layer"]
    keep_ratio: float = PAPER_DEFAULTS["keep_ratio"]
    lam: float = PAPER_DEFAULTS["lam"]
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_ratio("retention", self.retention)
        _check_range("tau", self.tau, -1.0, 1.0)
        _check_range("cluster_ratio", self.cluster_ratio, 0.0, 1.0)
        _check_ratio("keep_ratio", self.keep_ratio)
        _check_range("lam", self.lam, 0.0, 1.0)
        for name in ("k", "layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.k < 1:
            raise ValueError(f"k (DPC-KNN neighbours) must be >= 1, got {self.k}")
        if self.layer < 0:
            raise ValueError(f"layer (K) must be >= 0, got {self.layer}")
        if not isinstance(self.params, dict):
            raise ValueError(
                f"params must be a dict of strategy parameters (or left out), "
                f"got {type(self.params).__name__}"
            )
        own = sorted(set(self.params) & {f.name for f in fields(self)})
        if own:
            raise ValueError(
                f"params {', '.join(map(repr, own))} are fields of CompressionConfig: set them "
                f"as such (CompressionConfig({own[0]}=...)), not through params"
            )
        from ustc import strategies  # noqa: F401  (registers the built-in strategies)
        from ustc.registry import REGISTRIES

        accepted: set[str] = set()
        for kind, registry in REGISTRIES.items():
            name = getattr(self, kind)
            registry.get(name)  # raises with the list of known names
            accepted |= {p.name for p in registry.params(name)}
        unknown = sorted(set(self.params) - accepted)
        if unknown:
            raise ValueError(
                f"params {', '.join(map(repr, unknown))} are taken by none of the selected "
                f"strategies (method={self.method!r}, scorer={self.scorer!r}, pool={self.pool!r}, "
                f"recycler={self.recycler!r}, merger={self.merger!r})"
            )

    def strategy_values(self) -> dict[str, Any]:
        """Every value a strategy constructor may take, by parameter name."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "params"}
        values.update(self.params)
        return values

    def budget(self, frames: int, tokens_per_frame: int) -> int:
        """Visual tokens entering the LLM for one video of F frames x P tokens."""
        return visual_budget(frames, tokens_per_frame, self.retention)

    def kept_after_merge(self, visual_tokens: int) -> int:
        """Visual tokens left after layer K (all of them when the merger is ``none``)."""
        if self.merger == "none":
            return visual_tokens
        return merge_keep(visual_tokens, self.keep_ratio)

    @property
    def is_identity(self) -> bool:
        """True when this config changes nothing: retention 1 and no merger."""
        return self.retention == 1.0 and self.merger == "none"

    def replace(self, **changes: Any) -> CompressionConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CompressionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CompressionConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)
