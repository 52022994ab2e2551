"""The LLM sizes a FLOPs count needs: ``ModelSpec``, read from a transformers config, and
the built-in public models (``MODEL_SPECS``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


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

    def text_config(self) -> dict[str, int]:
        """The LLM sizes under the names of a transformers text config (what ``from_config``
        reads back); ``head_dim`` only where it is not d / H, as transformers' configs do."""
        config = {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
        }
        if self.head_dim != self.hidden_size // self.num_heads:
            config["head_dim"] = self.head_dim
        return config

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
