"""lmms-eval model plugin: ``llava_onevision_ustc``, LLaVA-OneVision with ustc's compression.

Registered through lmms-eval's plugin mechanism, the entry point group ``lmms_eval.models``
(``pyproject.toml``: ``llava_onevision_ustc = "ustc.lmms_eval_plugin:manifest"``), so the
released lmms-eval finds it once ustc is installed, with no fork and no environment variable:

    lmms-eval --model llava_onevision_ustc \\
        --model_args pretrained=llava-hf/llava-onevision-qwen2-7b-ov-hf,retention=0.02,merger=none \\
        --tasks mvbench,videomme --batch_size 1

``--model_args`` takes every :class:`~ustc.config.CompressionConfig` field (``retention``,
``scorer``, ``tau``, ``cluster_ratio``, ``merger``, ``layer``, ``lam`` ...) and strategy
parameter, validated before the model is loaded, plus ``pretrained``, ``device``, ``dtype``,
``max_frames_num`` (32, the paper's sampling), ``attn_implementation`` and ``max_new_tokens``.

The model is a transformers ``LlavaOnevisionForConditionalGeneration`` (the ``llava-hf``
checkpoints) with :func:`ustc.models.attach` on the instance.  Inputs come from the model's
``AutoProcessor`` (needs torchvision); where that cannot be built the plugin lays the inputs out
itself exactly as the processor does (chat template, F*P + 1 video placeholders, SigLIP
normalisation) and warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ustc.config import CompressionConfig

MODEL_NAME = "llava_onevision_ustc"
DEFAULT_CHECKPOINT = "llava-hf/llava-onevision-qwen2-7b-ov-hf"

try:  # lmms-eval is an optional extra: without it this module still imports (for the CLI)
    from lmms_eval.api.model import lmms as _LmmsBase

    LMMS_EVAL_ERROR: str | None = None
except ImportError as _exc:  # pragma: no cover - depends on the environment
    _LmmsBase = object  # type: ignore[assignment,misc]
    LMMS_EVAL_ERROR = str(_exc)


def manifest() -> Any:
    """Entry point payload: lmms-eval calls it and registers the returned ``ModelManifest``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_NAME,
        simple_class_path=f"{__name__}.LlavaOneVisionUSTC",
        aliases=("ustc",),
    )


_CONFIG_FIELDS = tuple(f.name for f in fields(CompressionConfig) if f.name != "params")
_FIELD_TYPES = {f.name: str(f.type) for f in fields(CompressionConfig)}


def config_to_model_args(config: CompressionConfig) -> str:
    """``key=value,...`` of every config value, as lmms-eval's ``--model_args`` takes them."""
    values = {name: getattr(config, name) for name in _CONFIG_FIELDS}
    values.update(config.params)
    for name, value in values.items():
        if isinstance(value, str) and ("," in value or "=" in value):
            raise ValueError(f"{name}={value!r} cannot be passed in --model_args (',' or '=')")
    return ",".join(f"{k}={v}" for k, v in values.items())


def config_from_model_args(values: dict[str, Any]) -> tuple[CompressionConfig, dict[str, Any]]:
    """Split lmms-eval model args into a validated config and the rest.

    Strategy parameters that are not config fields go to ``params``; the config constructor
    rejects unknown names, impossible values and parameters no selected strategy takes.
    """
    from ustc import strategies  # noqa: F401  (registers the built-in strategies)
    from ustc.registry import REGISTRIES

    strategy = {p.name for r in REGISTRIES.values() for n in r.names() for p in r.params(n)}
    config_values = {k: v for k, v in values.items() if k in _CONFIG_FIELDS}
    params = {k: v for k, v in values.items() if k in strategy and k not in _CONFIG_FIELDS}
    rest = {k: v for k, v in values.items() if k not in config_values and k not in params}
    for name, value in config_values.items():
        kind = _FIELD_TYPES[name]
        try:
            if kind == "float" and isinstance(value, (int, str)) and not isinstance(value, bool):
                config_values[name] = float(value)  # lmms-eval parses "1" as the int 1
            elif kind == "int" and isinstance(value, str):
                config_values[name] = int(value)
        except ValueError:
            raise ValueError(f"{name} must be a number ({kind}), got {value!r}") from None
    return CompressionConfig(**config_values, params=params), rest


class LlavaOneVisionUSTC(_LmmsBase):  # type: ignore[misc,valid-type]
    """lmms-eval model: LLaVA-OneVision whose video tokens are compressed by ustc.

    pretrained:     transformers checkpoint (``llava-hf/...-hf``) or folder.
    device, dtype:  where and how to load (``auto`` dtype: bfloat16 on CUDA, float32 on CPU).
    max_frames_num: F, frames sampled uniformly per video.
    model, processor, tokenizer: already built objects (tests, notebooks); ``pretrained`` is then
                    not loaded.
    **compression:  CompressionConfig fields and strategy parameters.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str = DEFAULT_CHECKPOINT,
        device: str = "cuda",
        dtype: str = "auto",
        max_frames_num: int = 32,
        attn_implementation: str | None = None,
        max_new_tokens: int = 16,
        batch_size: int = 1,
        model: Any = None,
        processor: Any = None,
        tokenizer: Any = None,
        **compression: Any,
    ) -> None:
        if LMMS_EVAL_ERROR is not None:
            raise ImportError(f"{MODEL_NAME} needs lmms-eval ({LMMS_EVAL_ERROR})")
        super().__init__()
        # everything that can be wrong is checked before the (large) model is loaded
        self.config, unknown = config_from_model_args(compression)
        if unknown:
            raise ValueError(
                f"unknown model_args {sorted(unknown)} for {MODEL_NAME}; it takes pretrained, "
                f"device, dtype, max_frames_num, attn_implementation, max_new_tokens, "
                f"batch_size and the compression settings {', '.join(_CONFIG_FIELDS)}"
            )
        if int(max_frames_num) < 1:
            raise ValueError(f"max_frames_num must be >= 1, got {max_frames_num}")
        self.max_frames_num = int(max_frames_num)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size_per_gpu = int(batch_size)
        loaded = model is None
        if loaded:
            model = self._load(pretrained, device, dtype, attn_implementation)
        self.model = model.eval()
        self.device = next(self.model.parameters()).device
        if processor is None and (loaded or tokenizer is None):
            processor = _auto_processor(pretrained)
        if processor is None:
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(pretrained)
            processor = ManualVideoProcessor(tokenizer, self.model.config)
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else processor.tokenizer
        from ustc.models import attach

        self.handle = None if self.config.is_identity else attach(self.model, self.config)

    @staticmethod
    def _load(pretrained: str, device: str, dtype: str, attn: str | None) -> Any:
        from transformers import LlavaOnevisionForConditionalGeneration

        if dtype == "auto":
            torch_dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        kwargs = {"dtype": torch_dtype, "device_map": device}
        if attn is not None:
            kwargs["attn_implementation"] = attn
        return LlavaOnevisionForConditionalGeneration.from_pretrained(pretrained, **kwargs)

    # ---------------------------------------------------------------------------- inputs

    def _frames(self, visual: Any) -> np.ndarray:
        """(F, H, W, 3) uint8 frames of one visual: a video path or an array of frames."""
        if isinstance(visual, (str, bytes)) or hasattr(visual, "__fspath__"):
            from lmms_eval.models.model_utils.load_video import read_video

            return read_video(visual, num_frm=self.max_frames_num)
        frames = np.asarray(visual)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(
                f"a video must be (F, H, W, 3) frames or a path, got shape {frames.shape}"
            )
        if len(frames) > self.max_frames_num:  # uniform sampling, as read_video does
            keep = np.linspace(0, len(frames) - 1, self.max_frames_num).round().astype(int)
            frames = frames[keep]
        return frames

    def _inputs(self, context: str, visuals: Sequence[Any], continuation: str = "") -> Any:
        videos = [self._frames(v) for v in visuals if v is not None]
        if len(videos) > 1:
            raise ValueError(f"{MODEL_NAME} takes one video per question, got {len(videos)}")
        content: list[dict[str, Any]] = [{"type": "video"}] if videos else []
        content.append({"type": "text", "text": context})
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        kwargs: dict[str, Any] = {"text": prompt + continuation, "return_tensors": "pt"}
        if videos:
            kwargs["videos"] = videos
        inputs = self.processor(**kwargs)
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}

    def _visuals(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[Any]:
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
        return list(visuals or [])

    # --------------------------------------------------------------------------- lmms API

    @torch.no_grad()
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """log p(continuation | video, context) and whether greedy decoding would produce it.

        The compression removes visual tokens from the sequence, so the logits are read from the
        end of the (shorter) output: the continuation is the last L tokens either way.
        """
        out = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            full = self._inputs(context, visuals, continuation)
            prompt = self._inputs(context, visuals)
            length = full["input_ids"].shape[1] - prompt["input_ids"].shape[1]
            if length < 1:
                raise ValueError(f"continuation {continuation!r} adds no tokens to the prompt")
            target = full["input_ids"][:, -length:]
            logits = self.model(**full).logits[:, -length - 1 : -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            total = logprobs.gather(-1, target[..., None]).sum()
            greedy = bool((logits.argmax(-1) == target).all())
            out.append((float(total), greedy))
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Any]) -> list[str]:
        """Greedy (or sampled, per ``gen_kwargs``) answers, cut at the ``until`` strings."""
        out = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen = dict(gen_kwargs or {})
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            inputs = self._inputs(context, visuals)
            temperature = float(gen.pop("temperature", 0) or 0)
            settings = {
                "max_new_tokens": int(gen.pop("max_new_tokens", self.max_new_tokens)),
                "do_sample": temperature > 0,
                "num_beams": int(gen.pop("num_beams", 1) or 1),
            }
            if temperature > 0:
                settings["temperature"] = temperature
                if gen.get("top_p") is not None:
                    settings["top_p"] = float(gen.pop("top_p"))
            sequences = self.model.generate(**inputs, **settings)
            new = sequences[:, inputs["input_ids"].shape[1] :]
            text = self.tokenizer.decode(new[0], skip_special_tokens=True)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} does not implement multi-round generation")

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu


def _auto_processor(pretrained: str) -> Any:
    """transformers' processor of the checkpoint, or None (with a warning) where it cannot be
    built, e.g. without torchvision for the video processor."""
    try:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(pretrained)
    except Exception as exc:
        warnings.warn(
            f"AutoProcessor.from_pretrained({pretrained!r}) failed ({exc}); laying "
            "out the inputs in ustc (ManualVideoProcessor)",
            stacklevel=3,
        )
        return None


class ManualVideoProcessor:
    """The inputs LLaVA-OneVision's processor builds, without torchvision.

    Prompt: Qwen2's chat template ``<|im_start|>user\\n<video>\\n{text}<|im_end|>\\n
    <|im_start|>assistant\\n``; the ``<video>`` placeholder expands to F * P + 1 ids of
    ``video_token_id`` (P = ceil(S / 2)^2 after LLaVA-OV's 2x pooling of the S x S patch grid,
    plus one ``image_newline``).  Frames are resized to the vision tower's size (bilinear) and
    normalised with SigLIP's mean = std = 0.5: ``pixel_values_videos`` (1, F, 3, size, size).
    """

    video_marker = "<video>"

    def __init__(self, tokenizer: Any, config: Any) -> None:
        self.tokenizer = tokenizer
        self.video_token_id = int(config.video_token_id)
        vision = config.vision_config
        self.size = int(vision.image_size)
        side = -(-self.size // int(vision.patch_size))
        self.tokens_per_frame = (-(-side // 2)) ** 2

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        text = ""
        for message in messages:
            parts = message["content"]
            body = "".join(
                self.video_marker + "\n" if p["type"] == "video" else p["text"] for p in parts
            )
            text += f"<|im_start|>{message['role']}\n{body}<|im_end|>\n"
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def __call__(
        self, text: str, videos: Sequence[np.ndarray] | None = None, return_tensors: str = "pt"
    ) -> dict[str, torch.Tensor]:
        pieces = text.split(self.video_marker)
        if len(pieces) - 1 != len(videos or []):
            raise ValueError(f"{len(pieces) - 1} video placeholders for {len(videos or [])} videos")
        ids: list[int] = self._ids(pieces[0])
        for video, piece in zip(videos or [], pieces[1:], strict=True):
            ids += [self.video_token_id] * (len(video) * self.tokens_per_frame + 1)
            ids += self._ids(piece)
        input_ids = torch.tensor([ids])
        out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if videos:
            out["pixel_values_videos"] = torch.stack([self.pixels(v) for v in videos])
        return out

    def pixels(self, frames: np.ndarray) -> torch.Tensor:
        """(F, H, W, 3) uint8 -> (F, 3, size, size) float, SigLIP-normalised."""
        x = torch.as_tensor(np.asarray(frames), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
        x = F.interpolate(
            x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
        )
        return (x - 0.5) / 0.5
