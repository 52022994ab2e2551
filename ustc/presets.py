"""Named configurations: the paper's method and the rows of its module ablation (Table 5).

Table 5 has three columns, Attn, Sim and Cluster.  Attn and Sim together are the scorer (the
candidate order and whether the tau filter of Eq. 2 applies); Cluster is the recycler.  All rows
run at 2 % retention without in-LLM merging: the full row (89.5 %) is "Ours (w/o M)" at 2 % of
Table 1.

How the single-module rows are read:
- "Sim only": no attention anywhere.  Candidates are offered least-redundant first (lowest mean
  cosine similarity to the whole video) and admitted through the tau filter; the rejected tokens
  are dropped.
- "Cluster only": the whole budget is spent on DPC-KNN cluster tokens over all tokens
  (cluster_ratio = 1, retention pool empty), so neither attention nor the filter is used.
"""

from __future__ import annotations

from ustc.config import CompressionConfig

#: (Attn, Sim, Cluster) marks of Table 5 -> the config that realises the row
TABLE5_ROWS: dict[tuple[bool, bool, bool], CompressionConfig] = {
    (True, False, False): CompressionConfig(
        retention=0.02, scorer="attn", recycler="none", merger="none"
    ),
    (False, True, False): CompressionConfig(
        retention=0.02, scorer="sim", recycler="none", merger="none"
    ),
    (False, False, True): CompressionConfig(
        retention=0.02, scorer="attn+sim", recycler="dpc", cluster_ratio=1.0, merger="none"
    ),
    (True, True, False): CompressionConfig(
        retention=0.02, scorer="attn+sim", recycler="none", merger="none"
    ),
    (True, False, True): CompressionConfig(
        retention=0.02, scorer="attn", recycler="dpc", merger="none"
    ),
    (False, True, True): CompressionConfig(
        retention=0.02, scorer="sim", recycler="dpc", merger="none"
    ),
    (True, True, True): CompressionConfig(
        retention=0.02, scorer="attn+sim", recycler="dpc", merger="none"
    ),
}

#: the paper's printed Table 5 (Avg. score, % of the uncompressed LLaVA-OV-7B), same keys
TABLE5_PAPER: dict[tuple[bool, bool, bool], tuple[float, float]] = {
    (True, False, False): (41.8, 74.2),
    (False, True, False): (49.2, 87.5),
    (False, False, True): (48.6, 86.4),
    (True, True, False): (49.7, 88.2),
    (True, False, True): (45.8, 81.3),
    (False, True, True): (49.5, 87.9),
    (True, True, True): (50.4, 89.5),
}


def ours(retention: float = 0.02, merging: bool = True) -> CompressionConfig:
    """The paper's method at ``retention``, with or without text-aware merging (Table 1)."""
    return CompressionConfig(retention=retention, merger="text-aware" if merging else "none")


def baseline(method: str, retention: float = 0.02, **changes: object) -> CompressionConfig:
    """Method ``method`` at ``retention`` as its paper describes it: with the in-LLM stage it
    declares (:func:`ustc.registry.method_in_llm`: none for VisionZip, FastVID, STTM and uniform,
    the last-token merger at R = 50 % for HoliTom); ``changes`` override any field, e.g.
    ``merger="text-aware"`` to combine a baseline with the paper's merger."""
    from ustc import strategies  # noqa: F401  (registers the built-in methods)
    from ustc.registry import method_in_llm

    values = {"retention": retention, "method": method, **method_in_llm(method), **changes}
    return CompressionConfig(**values)  # type: ignore[arg-type]
