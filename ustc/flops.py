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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Literal

from ustc.config import CompressionConfig

#: R in Eq. S3: tokens generated in the decoding phase.
GENERATED_TOKENS = 100

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


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


# --------------------------------------------------------------------------------------------
# Model specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of the LLM of a Video-LLM and its default video sampling.

    name:              a label.
    num_layers:        T, decoder layers.
    hidden_size:       d.
    intermediate_size: m, FFN size.
    num_heads:         H, query heads.
    num_kv_heads:      H_kv, key/value heads (grouped-query attention; = H for plain MHA).
    head_dim:          d_h; 0 means d / H.
    vocab_size:        V, only used when the LM head is counted.
    frames:            F, frames sampled per video.
    tokens_per_frame:  P, visual tokens per frame at the projector output.
    """

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    vocab_size: int = 0
    frames: int = 32
    tokens_per_frame: int = 196

    def __post_init__(self) -> None:
        for attr in (
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "frames",
            "tokens_per_frame",
        ):
            _check_int(f"{self.name}: {attr}", getattr(self, attr), minimum=1)
        for attr in ("head_dim", "vocab_size"):
            _check_int(f"{self.name}: {attr}", getattr(self, attr), minimum=0)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"{self.name}: hidden_size ({self.hidden_size}) must be a multiple of "
                    f"num_heads ({self.num_heads}) when head_dim is not given"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @property
    def attention_dim(self) -> int:
        """d_a = H * d_h, width of the query and output projections."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """d_kv = H_kv * d_h, width of the key and value projections."""
        return self.num_kv_heads * self.head_dim

    @property
    def visual_tokens(self) -> int:
        """N = F * P, visual tokens of the uncompressed video."""
        return self.frames * self.tokens_per_frame

    def with_video(
        self, frames: int | None = None, tokens_per_frame: int | None = None
    ) -> ModelSpec:
        """The same LLM with another frame sampling."""
        return dataclasses.replace(
            self,
            frames=self.frames if frames is None else frames,
            tokens_per_frame=self.tokens_per_frame
            if tokens_per_frame is None
            else tokens_per_frame,
        )

    @classmethod
    def builtin(cls, name: str) -> ModelSpec:
        """One of :data:`MODEL_SPECS` by name."""
        try:
            return MODEL_SPECS[name]
        except KeyError:
            raise ValueError(
                f"unknown model {name!r}; built-in models: {', '.join(sorted(MODEL_SPECS))} "
                "(or give the path of a transformers config.json)"
            ) from None

    @classmethod
    def from_config(
        cls,
        source: str | PathLike[str] | Mapping[str, Any] | Any,
        *,
        name: str | None = None,
        frames: int = 32,
        tokens_per_frame: int = 196,
    ) -> ModelSpec:
        """Read the LLM sizes from a transformers config.

        source: path of a ``config.json`` (or of the folder holding it), its parsed dict, or a
        ``PretrainedConfig``.  Vision-language configs keep the LLM under ``text_config``; plain
        LLM configs have the sizes at the top level.  ``frames`` and ``tokens_per_frame`` are not
        in a config: they default to LLaVA-OneVision's 32 x 196.
        """
        values = _config_dict(source)
        text = values.get("text_config")
        if isinstance(text, Mapping) and "hidden_size" in text:
            values = {**text, "_name": values.get("_name_or_path") or values.get("model_type")}
        required = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
        missing = [key for key in required if values.get(key) is None]
        if missing:
            raise ValueError(
                f"config has no {', '.join(missing)} at the top level or under text_config; "
                "expected a transformers LLM or vision-language config"
            )
        heads = values["num_attention_heads"]
        return cls(
            name=name
            or str(
                values.get("_name")
                or values.get("_name_or_path")
                or values.get("model_type")
                or "config"
            ),
            num_layers=values["num_hidden_layers"],
            hidden_size=values["hidden_size"],
            intermediate_size=values["intermediate_size"],
            num_heads=heads,
            num_kv_heads=values.get("num_key_value_heads") or heads,
            head_dim=values.get("head_dim") or 0,
            vocab_size=values.get("vocab_size") or 0,
            frames=frames,
            tokens_per_frame=tokens_per_frame,
        )


def _config_dict(source: Any) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, (str, PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"no transformers config at {path}")
        return json.loads(path.read_text())
    to_dict = getattr(source, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise ValueError(
        f"expected a config.json path, a dict or a PretrainedConfig, got {type(source).__name__}"
    )


_QWEN2_7B = dict(
    num_layers=28,
    hidden_size=3584,
    intermediate_size=18944,
    num_heads=28,
    num_kv_heads=4,
    vocab_size=152064,
)
# Qwen3-8B (the LLM of Qwen3-VL-8B and InternVL3.5-8B; public config, written from knowledge of
# it, not downloaded here): head_dim 128 is not hidden / heads
_QWEN3_8B = dict(
    num_layers=36,
    hidden_size=4096,
    intermediate_size=12288,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    vocab_size=151936,
)

#: Built-in specs (public configs; sampling from Section 4.1 of the paper).
MODEL_SPECS: dict[str, ModelSpec] = {
    "llava-onevision-7b": ModelSpec(
        "llava-onevision-7b", **_QWEN2_7B, frames=32, tokens_per_frame=196
    ),
    "llava-onevision-0.5b": ModelSpec(
        "llava-onevision-0.5b",
        num_layers=24,
        hidden_size=896,
        intermediate_size=4864,
        num_heads=14,
        num_kv_heads=2,
        vocab_size=151936,
        frames=32,
        tokens_per_frame=196,
    ),
    # P = 169 as the paper counts it; ustc's adapter runs 196 (see LLAVA_VIDEO_ADAPTER_P)
    "llava-video-7b": ModelSpec("llava-video-7b", **_QWEN2_7B, frames=64, tokens_per_frame=169),
    # The paper gives no FLOPs for Qwen2.5-VL; its sampling is dynamic.  Default: 32 frames at
    # 448 x 448 -> 16 temporal patches of 16 x 16 merged tokens.
    "qwen2.5-vl-7b": ModelSpec("qwen2.5-vl-7b", **_QWEN2_7B, frames=16, tokens_per_frame=256),
    # Sizes below are written from the public config.json of each checkpoint as we know it (no
    # network here to re-read them); the sampling is the checkpoints' usual video setting.
    # Qwen/Qwen2-VL-7B-Instruct: the Qwen2-7B LLM; frames as Qwen2.5-VL (16 temporal patches of
    # 16 x 16 merged tokens at 448 x 448).
    "qwen2-vl-7b": ModelSpec("qwen2-vl-7b", **_QWEN2_7B, frames=16, tokens_per_frame=256),
    # llava-hf/LLaVA-NeXT-Video-7B-hf: Vicuna-7B (Llama 2, multi-head attention, vocab 32000 +
    # the added image/video/pad tokens); CLIP-L/336 24 x 24 patches pooled by 2 -> 12 x 12.
    "llava-next-video-7b": ModelSpec(
        "llava-next-video-7b",
        num_layers=32,
        hidden_size=4096,
        intermediate_size=11008,
        num_heads=32,
        num_kv_heads=32,
        vocab_size=32064,
        frames=32,
        tokens_per_frame=144,
    ),
    # OpenGVLab/InternVL3_5-8B: the Qwen3-8B LLM; InternViT 448 px / 14 = 32 x 32 patches, pixel
    # shuffle 0.5 -> 16 x 16 = 256 tokens per frame.
    "internvl3.5-8b": ModelSpec("internvl3.5-8b", **_QWEN3_8B, frames=32, tokens_per_frame=256),
    # Qwen/Qwen3-VL-8B-Instruct: the Qwen3-8B LLM.  Its per-head q/k norms and the DeepStack
    # additions (3 levels x N x d adds) are not multiply-adds of note.  Sampling is dynamic;
    # default: 32 frames at 448 x 448 -> 16 frame pairs of 14 x 14 merged tokens (patch 16, 2 x 2
    # merger).
    "qwen3-vl-8b": ModelSpec("qwen3-vl-8b", **_QWEN3_8B, frames=16, tokens_per_frame=196),
    # DAMO-NLP-SG/VideoLLaMA3-7B: the Qwen2.5-7B LLM (sizes as Qwen2-7B).  Sampling: transformers'
    # VideoLlama3VideoProcessor defaults spread 768 * 28 * 28 pixels over the frames, so 32 frames
    # of 448 x 448 become 112 x 112 -> 4 x 4 tokens each (patch 14, 2 x 2 pooling; its own frame
    # pruning off, as ustc's adapter needs).  A checkpoint's own processor config may allow more.
    "videollama3-7b": ModelSpec("videollama3-7b", **_QWEN2_7B, frames=32, tokens_per_frame=16),
    # zai-org/GLM-4.1V-9B-Thinking: the GLM-4-9B LLM (the defaults of transformers'
    # Glm4vTextConfig; q/k/v biases and the extra post-attention / post-MLP norms are not
    # multiply-adds of note, gate_up + down is a 3-matrix SwiGLU).  Sampling is dynamic; default:
    # 32 frames at 448 x 448 -> 16 frame pairs of 16 x 16 merged tokens (patch 14, 2 x 2 merge).
    "glm-4.1v-9b": ModelSpec(
        "glm-4.1v-9b",
        num_layers=40,
        hidden_size=4096,
        intermediate_size=13696,
        num_heads=32,
        num_kv_heads=2,
        vocab_size=151552,
        frames=16,
        tokens_per_frame=256,
    ),
}


# --------------------------------------------------------------------------------------------
# Token schedule
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Counts
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The paper's FLOPs columns
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperRow:
    """One printed FLOPs cell of Tables 1-3 and the config whose schedule should give it.

    tera/ratio are the printed strings (their decimals set the comparison precision); ratio is
    "" where the table has no ratio column.
    """

    table: str
    model: str
    method: str
    label: str
    config: CompressionConfig
    tera: str
    ratio: str = ""
    frames: int | None = None


def _ours(retention: float, merge: bool) -> CompressionConfig:
    return CompressionConfig(retention=retention, merger="text-aware" if merge else "none")


def paper_rows() -> list[PaperRow]:
    """Every row of Tables 1-3 whose token schedule the paper defines."""
    rows: list[PaperRow] = []
    t1 = "Table 1"
    ov7 = "llava-onevision-7b"
    rows.append(PaperRow(t1, ov7, "LLaVA-OV-7B", "100%", VANILLA, "41.4", "100%"))
    # Table 1 labels three FastV rows 100%/15%, /12%, /11%; Table S2 (same values) says /5%,
    # /2%, /1%, and only those reproduce the printed FLOPs.
    fastv_t1 = [
        (0.10, "7.9", "19.1%"),
        (0.05, "6.4", "15.5%"),
        (0.02, "5.5", "13.3%"),
        (0.01, "5.2", "12.6%"),
    ]
    for keep, tera, ratio in fastv_t1:
        rows.append(PaperRow(t1, ov7, "FastV", f"100%/{keep:.0%}", fastv(keep), tera, ratio))
    ours_t1 = [
        (0.10, ("4.0", "9.6%"), ("3.4", "8.2%")),
        (0.05, ("2.2", "5.4%"), ("2.0", "4.7%")),
        (0.02, ("1.2", "2.9%"), ("1.1", "2.6%")),
        (0.01, ("0.9", "2.1%"), ("0.8", "2.0%")),
    ]
    for r, without, with_m in ours_t1:
        rows.append(PaperRow(t1, ov7, "Ours (w/o M)", _pct(r), _ours(r, False), *without))
        rows.append(PaperRow(t1, ov7, "Ours", f"{_pct(r)}/{_pct(r / 2)}", _ours(r, True), *with_m))
    t2 = "Table 2"
    table2 = {
        "llava-video-7b": (
            ("80.9", "100%"),
            {
                0.02: (("10.2", "12.6%"), ("1.5", "1.9%"), ("1.4", "1.7%")),
                0.01: (("9.7", "11.9%"), ("1.2", "1.5%"), ("1.1", "1.4%")),
            },
        ),
        "llava-onevision-0.5b": (
            ("3.54", "100%"),
            {
                0.02: (("0.50", "14.1%"), ("0.07", "1.9%"), ("0.06", "1.8%")),
                0.01: (("0.48", "13.7%"), ("0.05", "1.3%"), ("0.05", "1.3%")),
            },
        ),
    }
    for model, (vanilla, by_r) in table2.items():
        rows.append(PaperRow(t2, model, "Vanilla", "100%", VANILLA, *vanilla))
        for r, (fast, without, with_m) in by_r.items():
            rows.append(PaperRow(t2, model, "FastV", f"100%/{_pct(r)}", fastv(r), *fast))
            rows.append(PaperRow(t2, model, "Ours (w/o M)", _pct(r), _ours(r, False), *without))
            rows.append(
                PaperRow(t2, model, "Ours", f"{_pct(r)}/{_pct(r / 2)}", _ours(r, True), *with_m)
            )
    t3 = "Table 3"
    rows.append(PaperRow(t3, ov7, "Vanilla", "100%", VANILLA, "19.0", frames=16))
    for frames, tera in ((64, "1.7"), (96, "2.2"), (128, "2.8")):
        rows.append(PaperRow(t3, ov7, "Ours", "2%/1%", _ours(0.02, True), tera, frames=frames))
    return rows


def _pct(r: float) -> str:
    return f"{r * 100:g}%"


def _decimals(printed: str) -> int:
    number = printed.rstrip("%")
    return len(number.split(".")[1]) if "." in number else 0


def _fmt(value: float, like: str) -> str:
    """``value`` printed with the decimals of the paper's cell ``like`` (a % when it has one)."""
    if like.endswith("%"):
        return f"{value * 100:.{_decimals(like)}f}%"
    return f"{value:.{_decimals(like)}f}"


@dataclass(frozen=True)
class RowResult:
    """Our figures for one :class:`PaperRow`."""

    row: PaperRow
    spec: ModelSpec
    schedule: TokenSchedule
    paper_count: FlopsCount
    exact_count: FlopsCount
    ratio: float

    @property
    def tera_text(self) -> str:
        return _fmt(self.paper_count.tera, self.row.tera)

    @property
    def ratio_text(self) -> str:
        return _fmt(self.ratio, self.row.ratio) if self.row.ratio else ""

    @property
    def matches(self) -> bool:
        return self.tera_text == self.row.tera and self.ratio_text == self.row.ratio


def reproduce(
    rows: Sequence[PaperRow] | None = None, merge_at: MergeAt = "output"
) -> list[RowResult]:
    """Eq. S3 (visual tokens only, R = 100) for each paper row; ratios against vanilla."""
    results = []
    for row in paper_rows() if rows is None else rows:
        spec = ModelSpec.builtin(row.model).with_video(frames=row.frames)
        schedule = TokenSchedule.from_config(row.config, spec, merge_at=merge_at)
        vanilla = eq_s3(spec, TokenSchedule.from_config(VANILLA, spec))
        paper_count = eq_s3(spec, schedule)
        results.append(
            RowResult(
                row, spec, schedule, paper_count, exact(spec, schedule), paper_count.ratio(vanilla)
            )
        )
    return results


def _schedule_text(schedule: TokenSchedule) -> str:
    visual = schedule.visual
    first = visual[0]
    change = next((i for i, n in enumerate(visual) if n != first), None)
    if change is None:
        return f"{first}"
    return f"{first} -> {visual[change]} from layer {change}"


def _explain(result: RowResult, merge_at: MergeAt) -> str:
    """Whether the other merge-point convention reproduces a row that does not match.

    (The entering token count is config.budget's: its per-frame rounding is the one that
    reproduces every printed row, so there is no other rounding left to try.)
    """
    row, spec = result.row, result.spec
    other: MergeAt = "input" if merge_at == "output" else "output"
    vanilla = eq_s3(spec, TokenSchedule.from_config(VANILLA, spec))
    schedule = TokenSchedule._reduced(row.config, spec, result.schedule.visual[0], 0, other)
    if schedule != result.schedule:
        alt = eq_s3(spec, schedule)
        tera = _fmt(alt.tera, row.tera)
        ratio = _fmt(alt.ratio(vanilla), row.ratio) if row.ratio else ""
        if (tera, ratio) == (row.tera, row.ratio):
            return (
                f"needs the reduction at the {other} of layer K (gives {tera} T {ratio})".replace(
                    " )", ")"
                )
            )
    return "no convention found (see docs/flops.md)"


#: LLaVA-Video's visual tokens per frame in the adapter: the paper's P = 169 is 13 x 13, the
#: original LLaVA-Video code's 2 x 2 pooling with stride 2 of the 27 x 27 SigLIP patches
#: (384 px / 14; floor(27 / 2) = 13, the 27th row and column dropped); transformers' ``LlavaOnevisionForConditionalGeneration``, the
#: class ustc.attach runs LLaVA-Video weights in, pools the same patches bilinearly to
#: ceil(27 / 2) = 14 x 14 = 196 (``apply_pooling``; its processor writes as many placeholders).
LLAVA_VIDEO_ADAPTER_P = 196


def llava_video_layout_note(merge_at: MergeAt = "output") -> list[str]:
    """Lines saying that Table 2's LLaVA-Video rows count P = 169 while the adapter runs
    :data:`LLAVA_VIDEO_ADAPTER_P`, with the Eq. S3 counts of both layouts (vanilla, and 2 % / 1 %
    with text-aware merging) and the command that gives the adapter's."""
    paper = MODEL_SPECS["llava-video-7b"]
    ran = paper.with_video(tokens_per_frame=LLAVA_VIDEO_ADAPTER_P)
    p_paper, p_ran = paper.tokens_per_frame, ran.tokens_per_frame
    parts = []
    for label, config in (
        ("vanilla", VANILLA),
        ("2% w/o M", CompressionConfig(retention=0.02, merger="none")),
        ("2%/1%", CompressionConfig(retention=0.02)),
    ):
        a, b = (
            eq_s3(spec, TokenSchedule.from_config(config, spec, merge_at=merge_at))
            for spec in (paper, ran)
        )
        n_a = TokenSchedule.from_config(config, paper, merge_at=merge_at).visual[0]
        n_b = TokenSchedule.from_config(config, ran, merge_at=merge_at).visual[0]
        parts.append(
            f"{label} {n_a} -> {n_b} tokens, {a.tera:.1f} T -> {b.tera:.1f} T "
            f"({b.total / a.total - 1:+.0%})"
        )
    return [
        f"LLaVA-Video-7B: Table 2 counts P = {p_paper} (13 x 13: the original LLaVA-Video code "
        f"pools 2 x 2 with stride 2, floor(27 / 2) = 13); ustc's adapter runs transformers' LlavaOnevision class, which pools "
        f"the same 27 x 27 patches bilinearly to 14 x 14 = {p_ran}:",
        "  " + "; ".join(parts) + ".",
        f"  What the adapter runs: ustc-flops --model llava-video-7b --tokens-per-frame {p_ran} "
        "--retention 0.02 --merger text-aware",
    ]


def format_tables(merge_at: MergeAt = "output") -> str:
    """The FLOPs columns of Tables 1-3, ours next to the paper's, as plain text."""
    results = reproduce(merge_at=merge_at)
    full_until = "K" if merge_at == "output" else "K-1"
    lines = [
        "FLOPs of the LLM (multiply-adds, 10^12), Eq. S3 over the visual tokens only, R = 100 "
        "generated tokens;",
        f"in-LLM reduction applied at the {merge_at} of layer K (layers 0..{full_until} see all "
        "tokens).  'exact' = GQA + SwiGLU count of the real Qwen2 layers.",
    ]
    header = (
        f"{'method':<14}{'retention':<12}{'F':>4}{'tokens per layer':>30}"
        f"{'T':>8}{'paper':>7}{'ratio':>8}{'paper':>8}{'exact T':>9}  ok"
    )
    current = None
    notes = []
    for result in results:
        row = result.row
        key = (row.table, row.model)
        if key != current:
            current = key
            lines += ["", f"{row.table}  {row.model}", header, "-" * len(header)]
        ok = "yes" if result.matches else "NO"
        lines.append(
            f"{row.method:<14}{row.label:<12}{result.spec.frames:>4}"
            f"{_schedule_text(result.schedule):>30}{result.tera_text:>8}{row.tera:>7}"
            f"{result.ratio_text:>8}{row.ratio:>8}{result.exact_count.tera:>9.2f}  {ok}"
        )
        if not result.matches:
            notes.append(
                f"{row.table} {row.model} {row.method} {row.label}: {_explain(result, merge_at)}"
            )
    matched = sum(r.matches for r in results)
    lines += [
        "",
        "FastV keeps the given share of all tokens after layer K = 2.  Table 1 labels its rows "
        "100%/10%, /15%, /12%, /11%; Table S2 prints the same FLOPs as /10%, /5%, /2%, /1%, "
        "the shares that reproduce them.",
        "VisionZip, FastVID and LLaVA-Scissor print the FLOPs of 'Ours (w/o M)', HoliTom those "
        "of 'Ours', at the same retention.",
        *llava_video_layout_note(merge_at),
        "",
        f"{matched}/{len(results)} printed FLOPs rows reproduced (T and ratio).",
    ]
    if notes:
        lines += ["Not reproduced, and what would reproduce them:"]
        lines += [f"  - {note}" for note in notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ustc.flops``: the paper's FLOPs columns, or one config's count."""
    parser = argparse.ArgumentParser(
        prog="python -m ustc.flops",
        description="Eq. S3 FLOPs of a Video-LLM's LLM under token compression. Without --model, "
        "print the FLOPs columns of the paper's Tables 1-3 next to the printed values.",
    )
    parser.add_argument("--model", help=f"built-in ({', '.join(MODEL_SPECS)}) or a config.json")
    parser.add_argument("--frames", type=int, help="F, frames per video")
    parser.add_argument("--tokens-per-frame", type=int, help="P, visual tokens per frame")
    parser.add_argument("--retention", type=float, default=1.0, help="r (default 1)")
    parser.add_argument("--merger", default="none", help="in-LLM merger (default none)")
    parser.add_argument("--layer", type=int, default=18, help="K (default 18)")
    parser.add_argument("--keep-ratio", type=float, default=0.5, help="R (default 0.5)")
    parser.add_argument("--text-tokens", type=int, default=0, help="prompt tokens (default 0)")
    parser.add_argument("--generated", type=int, default=GENERATED_TOKENS, help="R of Eq. S3")
    parser.add_argument(
        "--merge-at",
        choices=_MERGE_AT,
        default=None,
        help="reduce at the input or output of layer K (default: input for "
        "--model, output for the paper tables)",
    )
    args = parser.parse_args(argv)
    if args.model is None:
        print(format_tables(args.merge_at or "output"))
        return
    try:
        if args.model in MODEL_SPECS:
            spec = ModelSpec.builtin(args.model)
        else:
            spec = ModelSpec.from_config(args.model)
        spec = spec.with_video(args.frames, args.tokens_per_frame)
        config = CompressionConfig(
            retention=args.retention,
            merger=args.merger,
            layer=args.layer,
            keep_ratio=args.keep_ratio,
        )
        schedule = TokenSchedule.from_config(
            config, spec, text_tokens=args.text_tokens, merge_at=args.merge_at or "input"
        )
        vanilla = TokenSchedule.from_config(VANILLA, spec, text_tokens=args.text_tokens)
        _check_int("--generated", args.generated, minimum=0)
    except ValueError as error:
        parser.error(str(error))
    print(
        f"{spec.name}: F={spec.frames} P={spec.tokens_per_frame}, "
        f"visual tokens per layer: {_schedule_text(schedule)}, text tokens {schedule.text}"
    )
    for label, fn in (("Eq. S3", eq_s3), ("exact", exact)):
        ours, full = fn(spec, schedule, args.generated), fn(spec, vanilla, args.generated)
        print(
            f"{label:>7}: {ours.tera:.4f} T multiply-adds ({ours.ratio(full):.2%} of "
            f"{full.tera:.4f} T uncompressed)"
        )


if __name__ == "__main__":
    main()
