"""The counts: Eq. S3 as printed (``eq_s3``) and the exact count of the real layer (``exact``),
per layer and summed over a token schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ustc.config import CompressionConfig
from ustc.flops.schedule import MergeAt, TokenSchedule
from ustc.flops.specs import ModelSpec, _check_int

#: R in Eq. S3: tokens generated in the decoding phase.
GENERATED_TOKENS = 100


@dataclass(frozen=True)
class FlopsCount:
    """Multiply-adds of one video question: prefill, R decode steps, optional LM head."""

    prefill: int
    decode: int
    lm_head: int = 0
    per_layer: tuple[int, ...] = field(default=(), repr=False)

    @property
    def total(self) -> int:
        return self.prefill + self.decode + self.lm_head

    @property
    def tera(self) -> float:
        """Total in units of 10^12 multiply-adds (the paper's "FLOPs (T)")."""
        return self.total / 1e12

    def ratio(self, reference: FlopsCount) -> float:
        """This count as a fraction of ``reference`` (the paper's "FLOPs Ratio")."""
        return self.total / reference.total


def eq_s3_layer(n: int, d: int, m: int, generated: int = GENERATED_TOKENS) -> tuple[int, int]:
    """One summand of Eq. S3, split into (prefill, decode) multiply-adds.

        prefill = 4 n d^2 + 2 n^2 d + 2 n d m
        decode  = R ((4 d^2 + 2 d m) + 2 (d n + d/2 (R + 1)))

    n: n_i, tokens entering the layer; d: hidden size; m: FFN size; R = ``generated``.
    ``2 * d/2 * (R+1)`` is written ``d (R+1)`` to stay in integers (same value).
    """
    _check_int("tokens", n, minimum=0)
    _check_int("generated tokens R", generated, minimum=0)
    prefill = 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    decode = generated * ((4 * d * d + 2 * d * m) + 2 * d * n + d * (generated + 1))
    return prefill, decode


def exact_layer(n: int, spec: ModelSpec, generated: int = GENERATED_TOKENS) -> tuple[int, int]:
    """Multiply-adds of one Qwen2 decoder layer (GQA, SwiGLU), split into (prefill, decode).

        prefill = 2 n d d_a + 2 n d d_kv + 2 n^2 d_a + 3 n d m
        decode  = R (2 d d_a + 2 d d_kv + 3 d m) + 2 d_a (R n + R (R + 1) / 2)

    q/o projections 2 n d d_a, k/v projections 2 n d d_kv, Q K^T and A V 2 n^2 d_a (eager
    attention computes the full n x n scores; the causal mask does not save work), gate/up/down
    3 n d m.  Decode step t = 1..R feeds one token that attends to the n + t cached keys.
    """
    _check_int("tokens", n, minimum=0)
    _check_int("generated tokens R", generated, minimum=0)
    d, m, da, dkv = spec.hidden_size, spec.intermediate_size, spec.attention_dim, spec.kv_dim
    per_token = 2 * d * da + 2 * d * dkv + 3 * d * m
    prefill = n * per_token + 2 * n * n * da
    decode = generated * per_token + da * (2 * generated * n + generated * (generated + 1))
    return prefill, decode


def eq_s3(
    spec: ModelSpec, schedule: TokenSchedule, generated: int = GENERATED_TOKENS
) -> FlopsCount:
    """Eq. S3 as printed: sum over the T layers of :func:`eq_s3_layer` with n_i from ``schedule``."""
    _check_layers(spec, schedule)
    parts = [
        eq_s3_layer(n, spec.hidden_size, spec.intermediate_size, generated) for n in schedule.tokens
    ]
    return FlopsCount(
        prefill=sum(p for p, _ in parts),
        decode=sum(q for _, q in parts),
        per_layer=tuple(p + q for p, q in parts),
    )


def exact(
    spec: ModelSpec,
    schedule: TokenSchedule,
    generated: int = GENERATED_TOKENS,
    lm_head: bool = False,
) -> FlopsCount:
    """Exact multiply-adds of the real architecture (:func:`exact_layer` summed over layers).

    lm_head: also count the output projection d x V for the rows that produce logits: the last
    prefill position (``generate`` keeps only that row) and each of the R decode steps.
    """
    _check_layers(spec, schedule)
    parts = [exact_layer(n, spec, generated) for n in schedule.tokens]
    head = 0
    if lm_head:
        if spec.vocab_size < 1:
            raise ValueError(f"{spec.name}: counting the LM head needs vocab_size >= 1")
        rows = (1 if schedule.tokens[-1] > 0 else 0) + generated
        head = rows * spec.hidden_size * spec.vocab_size
    return FlopsCount(
        prefill=sum(p for p, _ in parts),
        decode=sum(q for _, q in parts),
        lm_head=head,
        per_layer=tuple(p + q for p, q in parts),
    )


Counter = Literal["eq-s3", "exact"]


def count(
    config: CompressionConfig,
    spec: ModelSpec,
    *,
    counter: Counter = "eq-s3",
    text_tokens: int = 0,
    generated: int = GENERATED_TOKENS,
    merge_at: MergeAt = "input",
) -> FlopsCount:
    """FLOPs of ``spec``'s LLM when its video is compressed with ``config``."""
    schedule = TokenSchedule.from_config(config, spec, text_tokens=text_tokens, merge_at=merge_at)
    if counter == "eq-s3":
        return eq_s3(spec, schedule, generated)
    if counter == "exact":
        return exact(spec, schedule, generated)
    raise ValueError(f"counter must be 'eq-s3' or 'exact', got {counter!r}")


#: The uncompressed model: every visual token through every layer.
VANILLA = CompressionConfig(retention=1.0, merger="none")


def fastv(keep: float, layer: int = 2) -> CompressionConfig:
    """FastV's schedule as a config: all tokens enter, the share ``keep`` survives layer K = 2.

    FastV drops rather than merges and ranks by the last token's attention; both leave the
    token counts, hence the FLOPs, of a last-token merger with keep_ratio = ``keep``.
    """
    return CompressionConfig(retention=1.0, merger="last-token", layer=layer, keep_ratio=keep)


def _check_layers(spec: ModelSpec, schedule: TokenSchedule) -> None:
    if schedule.num_layers != spec.num_layers:
        raise ValueError(
            f"token schedule has {schedule.num_layers} layers, {spec.name} has "
            f"{spec.num_layers} layers: give one token count per decoder layer"
        )
