"""Analytic FLOPs of the LLM of a Video-LLM under token compression (Eq. S3 of the supplement).

Every count is in **multiply-adds** (one multiply plus one add = 1), the unit of Eq. S3 and of
fvcore; ``torch.utils.flop_counter.FlopCounterMode`` counts 2 per multiply-add.  Only the decoder
layers of the LLM are counted: the vision tower, the projector, the compression itself,
embeddings (a lookup), norms, RoPE and softmax are not, and the LM head only on request.

Two counts of the same token schedule:

* :func:`eq_s3` -- the paper's Eq. S3 as printed, summed over layers:

      FLOPs = sum_{i=1}^{T} (4 n_i d^2 + 2 n_i^2 d + 2 n_i d m)
                          + R ((4 d^2 + 2 d m) + 2 (d n_i + d/2 (R + 1)))

  T layers, n_i tokens entering layer i in the prefill, d hidden size, m FFN size, R generated
  tokens (100).  It assumes multi-head attention with four d x d projections and a two-matrix FFN.
* :func:`exact` -- the real Qwen2 layer: grouped-query attention (K and V projections of width
  d_kv = H_kv * d_h), a three-matrix SwiGLU FFN (gate, up, down):

      prefill_i = 2 n_i d d_a + 2 n_i d d_kv + 2 n_i^2 d_a + 3 n_i d m
      decode_i  = R (2 d d_a + 2 d d_kv + 3 d m) + 2 d_a (R n_i + R (R + 1) / 2)

  with d_a = H * d_h (= d for every built-in model).  This is what fvcore and FlopCounterMode
  measure on the transformers model with eager attention (tests/test_flops.py).  For Qwen2-7B
  it is about 1.17 times Eq. S3 (3 n d m against 2 n d m dominates).

The token schedule (n_i for every layer) comes from the same :class:`CompressionConfig` the
compressor runs with: ``config.budget(F, P)`` visual tokens enter the LLM and
``config.kept_after_merge(n)`` of them remain from layer K on.

``python -m ustc.flops`` prints the FLOPs columns of Tables 1-3 next to the paper's values.

The package, one job a module: ``specs`` (the LLM sizes: ``ModelSpec``, ``MODEL_SPECS``),
``schedule`` (``TokenSchedule``), ``formula`` (``eq_s3``, ``exact``, ``count``), ``paper`` (the
paper's rows and tables), ``cli`` (``python -m ustc.flops``, ``ustc-flops``).  Everything is
importable from ``ustc.flops`` as before.
"""

from ustc.flops.cli import main
from ustc.flops.formula import (
    GENERATED_TOKENS,
    VANILLA,
    FlopsCount,
    count,
    eq_s3,
    eq_s3_layer,
    exact,
    exact_layer,
    fastv,
)
from ustc.flops.paper import (
    LLAVA_VIDEO_ADAPTER_P,
    PaperRow,
    RowResult,
    format_tables,
    llava_video_layout_note,
    paper_rows,
    reproduce,
)
from ustc.flops.schedule import MergeAt, TokenSchedule
from ustc.flops.specs import MODEL_SPECS, ModelSpec

__all__ = [
    "GENERATED_TOKENS",
    "LLAVA_VIDEO_ADAPTER_P",
    "MODEL_SPECS",
    "VANILLA",
    "FlopsCount",
    "MergeAt",
    "ModelSpec",
    "PaperRow",
    "RowResult",
    "TokenSchedule",
    "count",
    "eq_s3",
    "eq_s3_layer",
    "exact",
    "exact_layer",
    "fastv",
    "llava_video_layout_note",
    "format_tables",
    "main",
    "paper_rows",
    "reproduce",
]
