"""The machinery every ustc lmms-eval model shares; a backbone only declares what differs.

A backbone (``llava_onevision.py``, ``qwen2_5_vl.py``) is a subclass of :class:`USTCModel`
decorated with :func:`ustc.lmms_eval.register` that says its lmms-eval name, its transformers
model class, its default checkpoint and how to lay out one prompt's inputs from frames and a
question where the checkpoint's own processor cannot be built (no torchvision).  Everything else
lives here:

- ``--model_args`` parsing: every :class:`~ustc.config.CompressionConfig` field and strategy
  parameter, validated before the model is loaded;
- the device: ``cuda:<LOCAL_RANK>`` where CUDA is available, else ``cpu``;
- ``generate_until`` in LEFT-padded batches of ``batch_size`` prompts (one video per prompt),
  grouped by generation settings, each row's answer cut at the task's ``until`` strings, with
  the tokens that really entered the LLM returned per request (``token_counts.input_tokens`` in
  lmms-eval's samples log) and ``handle.stats`` logged per batch;
- data parallelism: lmms-eval shards the requests itself by ``RANK`` / ``WORLD_SIZE`` (set by
  ``accelerate launch`` or ``torchrun``) and gathers the results once; the padding requests it
  adds so that ranks run equal counts (``metadata["__padding_only__"]``) are answered without
  running the model, so no document is evaluated twice.

B batch, F frames, n prompt length, n' tokens entering the LLM.
"""

from __future__ import annotations

import atexit
import os
import warnings
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ustc.config import CompressionConfig

try:  # lmms-eval is an optional extra: without it this module still imports
    from lmms_eval.api.model import lmms as _LmmsBase

    LMMS_EVAL_ERROR: str | None = None
except ImportError as _exc:  # pragma: no cover - depends on the environment
    _LmmsBase = object  # type: ignore[assignment,misc]
    LMMS_EVAL_ERROR = str(_exc)

#: the keyword arguments every ustc lmms-eval model takes besides the compression settings
MODEL_ARGS = (
    "pretrained",
    "device",
    "dtype",
    "max_frames_num",
    "attn_implementation",
    "max_new_tokens",
    "batch_size",
    "session_cache",
)

#: per-prompt inputs that are 1-D token sequences (B, n): left-padded when batched; every other
#: tensor (pixels, grids) is concatenated along dim 0
SEQUENCE_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")

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


#: lmms-eval model name -> model class, filled by :func:`register`
BACKBONES: dict[str, type[USTCModel]] = {}


def register(cls: type[USTCModel]) -> type[USTCModel]:
    """Class decorator: make a backbone an lmms-eval model (``cls.name`` and ``cls.aliases``)."""
    for name in (cls.name, *cls.aliases):
        if name in BACKBONES or any(name in c.aliases for c in BACKBONES.values()):
            raise ValueError(f"lmms-eval model name {name!r} is registered twice")
    BACKBONES[cls.name] = cls
    return cls


def default_device() -> str:
    """``cuda:<LOCAL_RANK>`` where CUDA is available (one GPU per process under
    ``accelerate launch`` / ``torchrun``), else ``cpu``."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def close_process_group() -> None:
    """Destroy torch.distributed's default process group if one is still alive (a no-op
    otherwise).

    Registered at exit by a model running in several processes: lmms-eval leaves its gloo group
    alive at the end, and a gloo group still alive while the interpreter shuts down can abort the
    process (SIGABRT, "terminate called without an active exception") after the results are
    written, so that ``accelerate launch`` reports a finished run as failed.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def processes_asked_of_accelerate(
    environ: dict[str, str] | None = None, parent_cmdline: list[str] | None = None
) -> int | None:
    """``--num_processes`` of the ``accelerate launch`` that started this process, or None when
    accelerate did not start it (or the launcher's command line cannot be read).

    accelerate's launchers set ``ACCELERATE_USE_CPU`` in the processes they start; its
    single-process launcher (chosen without ``--multi_gpu``) sets no ``WORLD_SIZE`` and drops
    ``--num_processes``, which is only left in the launcher's own command line: this process's
    parent (``/proc/<ppid>/cmdline`` on Linux)."""
    environ = dict(os.environ) if environ is None else environ
    if "ACCELERATE_USE_CPU" not in environ:
        return None
    if parent_cmdline is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return None
        parent_cmdline = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    for i, arg in enumerate(parent_cmdline):
        name, _, value = arg.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value or (parent_cmdline[i + 1] if i + 1 < len(parent_cmdline) else "")
            return int(value) if value.isdigit() else None
    return None


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def left_pad(items: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch from per-prompt inputs: sequences (1, n_i) LEFT-padded to (B, max n_i) (ids with
    ``pad_id``, masks and type ids with 0), every other tensor concatenated along dim 0."""
    width = max(int(item["input_ids"].shape[1]) for item in items)
    batch: dict[str, torch.Tensor] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key in SEQUENCE_INPUTS:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.cat(
                [torch.cat([v.new_full((1, width - v.shape[1]), fill), v], dim=1) for v in values]
            )
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.cat(values)
        else:
            batch[key] = [x for v in values for x in (v if isinstance(v, list) else [v])]
    return batch


class USTCModel(_LmmsBase):  # type: ignore[misc,valid-type]
    """An lmms-eval model whose video tokens are compressed by ustc (shared implementation).

    pretrained:     transformers checkpoint or folder.
    device:         torch device; by default ``cuda:<LOCAL_RANK>`` if CUDA is available, else cpu.
    dtype:          ``auto`` (bfloat16 on CUDA, float32 on CPU) or a torch dtype name.
    max_frames_num: F, frames sampled uniformly per video.
    batch_size:     prompts per ``generate()`` call, LEFT-padded, one video each.
    session_cache:  prepared videos kept (``ustc.session.SessionCache``): with batch_size 1,
                    consecutive questions about one video reuse its vision encoding, compression
                    and prefix below layer K; 0 turns the reuse off.
    model, processor, tokenizer: already built objects (tests, notebooks); ``pretrained`` is then
                    not loaded.
    **compression:  CompressionConfig fields and strategy parameters.

    A backbone subclass declares ``name``, ``model_class``, ``default_checkpoint`` and
    :meth:`manual_processor`.
    """

    is_simple = True

    #: lmms-eval model name (``--model``), e.g. ``llava_onevision_ustc``
    name: ClassVar[str]
    #: other names lmms-eval accepts for it
    aliases: ClassVar[tuple[str, ...]] = ()
    #: the transformers class the checkpoint is loaded with (its name in ``transformers``)
    model_class: ClassVar[str]
    default_checkpoint: ClassVar[str]
    default_frames: ClassVar[int] = 32

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        max_frames_num: int | None = None,
        attn_implementation: str | None = None,
        max_new_tokens: int = 16,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        session_cache: int | str = 4,
        model: Any = None,
        processor: Any = None,
        tokenizer: Any = None,
        **compression: Any,
    ) -> None:
        if LMMS_EVAL_ERROR is not None:
            raise ImportError(f"{self.name} needs lmms-eval ({LMMS_EVAL_ERROR})")
        super().__init__()
        # everything that can be wrong is checked before the (large) model is loaded
        self.config, unknown = config_from_model_args(compression)
        if unknown:
            raise ValueError(
                f"unknown model_args {sorted(unknown)} for {self.name}; it takes "
                f"{', '.join(MODEL_ARGS)} and the compression settings {', '.join(_CONFIG_FIELDS)}"
            )
        if str(batch_size).startswith("auto"):
            raise ValueError(
                f"batch_size must be a positive integer for {self.name}, got {batch_size!r} "
                "(lmms-eval's 'auto' batch size is not supported)"
            )
        self.batch_size_per_gpu = _positive_int("batch_size", batch_size)
        self.max_frames_num = _positive_int(
            "max_frames_num", self.default_frames if max_frames_num is None else max_frames_num
        )
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        if str(session_cache) != "0":
            session_cache = _positive_int("session_cache", session_cache)
        self.session_cache_size = int(session_cache)
        if dtype != "auto" and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"dtype must be 'auto' or a torch dtype name, got {dtype!r}")
        pretrained = pretrained or self.default_checkpoint
        if device is None or device == "auto":
            device = default_device()
        elif str(device) == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            device = default_device()  # one GPU per process
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        if self._world_size > 1:
            atexit.register(close_process_group)  # a second model adds a no-op call
        asked = processes_asked_of_accelerate()
        if asked is not None and asked > self._world_size:
            warnings.warn(
                f"{self.name}: `accelerate launch --num_processes {asked}` started ONE process: "
                "without --multi_gpu accelerate uses its single-process launcher and ignores "
                "--num_processes, so this process evaluates every question alone; add "
                f"--multi_gpu (also on a machine without GPUs) to run {asked} processes",
                stacklevel=2,
            )

        loaded = model is None
        if loaded:
            model = self._load(pretrained, str(device), dtype, attn_implementation)
        self.model = model.eval()
        self._device = next(self.model.parameters()).device
        if processor is None and (loaded or tokenizer is None):
            processor = _auto_processor(pretrained)
        if processor is None:
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(pretrained)
            processor = self.manual_processor(tokenizer, self.model.config, pretrained)
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else processor.tokenizer
        from ustc.models import attach

        self.handle = None if self.config.is_identity else attach(self.model, self.config)
        self.sessions = self._session_cache()

    def _session_cache(self) -> Any:
        """The cache of prepared videos, or None where questions cannot share one."""
        from loguru import logger

        from ustc.models.qwen3_vl import Qwen3_5Handle
        from ustc.session import SessionCache

        if self.handle is None or self.session_cache_size == 0 or self.batch_size_per_gpu > 1:
            return None
        if isinstance(self.handle, Qwen3_5Handle):  # recurrent layers: nothing to share
            return None
        return SessionCache(self.session_cache_size, log=logger.info)

    # ------------------------------------------------------------------ backbone declarations

    def manual_processor(self, tokenizer: Any, config: Any, pretrained: str | None) -> Any:
        """The inputs the checkpoint's processor would build, laid out by ustc (no torchvision).

        Must offer ``apply_chat_template(messages, add_generation_prompt=True) -> str`` and
        ``__call__(text=str, videos=[frames]) -> dict`` of (1, n) sequences and the pixel inputs.
        A backbone without one needs its checkpoint's processor.
        """
        raise ValueError(
            f"{self.name}: the checkpoint's AutoProcessor could not be built from {pretrained!r} "
            "(it needs torchvision: pip install torchvision matching your torch), and ustc lays "
            "the inputs out itself only for "
            + ", ".join(
                sorted(
                    name
                    for name, cls in BACKBONES.items()
                    if cls.manual_processor is not USTCModel.manual_processor
                )
            )
        )

    # ---------------------------------------------------------------------------- loading

    def _load(self, pretrained: str, device: str, dtype: str, attn: str | None) -> Any:
        import transformers

        cls = getattr(transformers, self.model_class)
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "device_map": device}
        if attn is not None:
            kwargs["attn_implementation"] = attn
        return cls.from_pretrained(pretrained, **kwargs)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ----------------------------------------------------------------------------- inputs

    def _frames(self, visual: Any) -> np.ndarray:
        """(F, H, W, 3) uint8 frames of one visual: a video path or an array of frames."""
        if isinstance(visual, (str, bytes)) or hasattr(visual, "__fspath__"):
            from ustc.video import load_video

            return load_video(os.fsdecode(visual), num_frames=self.max_frames_num)
        frames = np.asarray(visual)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(
                f"a video must be (F, H, W, 3) frames or a path, got shape {frames.shape}"
            )
        if len(frames) > self.max_frames_num:  # uniform sampling
            keep = np.linspace(0, len(frames) - 1, self.max_frames_num).round().astype(int)
            frames = frames[keep]
        return frames

    def _inputs(self, context: str, visuals: Sequence[Any], continuation: str = "") -> Any:
        """One prompt's inputs, (1, n) sequences: chat template with the video first."""
        videos = [self._frames(v) for v in visuals if v is not None]
        if len(videos) > 1:
            raise ValueError(f"{self.name} takes one video per question, got {len(videos)}")
        content: list[dict[str, Any]] = [{"type": "video"}] if videos else []
        content.append({"type": "text", "text": context})
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        kwargs: dict[str, Any] = {"text": prompt + continuation, "return_tensors": "pt"}
        if videos:
            kwargs["videos"] = videos
        return dict(self.processor(**kwargs))

    def _visuals(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[Any]:
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
        return list(visuals or [])

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Tensors to the model's device; floating ones (pixels) to its dtype."""
        dtype = self.model.dtype
        return {
            k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
            if isinstance(v, torch.Tensor)
            else v
            for k, v in batch.items()
        }

    def _pad_id(self) -> int:
        for source in (self.tokenizer, self.model.generation_config):
            value = getattr(source, "pad_token_id", None)
            if value is not None:
                return int(value)
        return 0

    # --------------------------------------------------------------------------- lmms API

    @torch.no_grad()
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """log p(continuation | video, context) and whether greedy decoding would produce it.

        The compression removes visual tokens from the sequence, so the logits are read from the
        end of the (shorter) output: the continuation is the last L tokens either way.  lmms-eval
        0.7.3 turns these pairs into strings after this returns (``unwrap_generation_output``),
        for every model: run multiple-choice benchmarks through their generation tasks.
        """
        _warn_if_loglikelihood_is_broken()
        out = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            full = self._to_device(self._inputs(context, visuals, continuation))
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
    def generate_until(self, requests: list[Any]) -> list[Any]:
        """Answers in LEFT-padded batches of ``batch_size`` prompts, one video each.

        Requests are grouped by generation settings and sorted by prompt length (longest first,
        so a batch pads little); each answer is cut at its ``until`` strings.  Returns one
        ``GenerationResult`` per request, in request order, whose ``token_counts.input_tokens``
        is the number of tokens of that prompt that entered the LLM (after compression).
        """
        from lmms_eval.api.instance import GenerationResult, TokenCounts

        results: list[Any] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            if (request.metadata or {}).get("__padding_only__"):
                # lmms-eval's filler so that every rank runs as many requests: never scored
                results[i] = GenerationResult(text="")
                continue
            groups.setdefault(repr(sorted((request.args[1] or {}).items())), []).append(i)
        for indices in groups.values():
            order = sorted(indices, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                texts, counts = self._generate([requests[i] for i in chunk])
                for i, text, count in zip(chunk, texts, counts, strict=True):
                    results[i] = GenerationResult(
                        text=text,
                        token_counts=TokenCounts(input_tokens=count[0], output_tokens=count[1]),
                    )
                    context, gen_kwargs = requests[i].args[:2]
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results

    def _generate(self, requests: list[Any]) -> tuple[list[str], list[tuple[int, int]]]:
        """One ``generate()`` call per video layout among ``requests`` (usually one)."""
        gen = dict(requests[0].args[1] or {})
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen.pop("temperature", 0) or 0)
        settings: dict[str, Any] = {
            "max_new_tokens": int(gen.pop("max_new_tokens", self.max_new_tokens)),
            "do_sample": temperature > 0,
            "num_beams": int(gen.pop("num_beams", 1) or 1),
            "pad_token_id": self._pad_id(),
        }
        if temperature > 0:
            settings["temperature"] = temperature
            if gen.get("top_p") is not None:
                settings["top_p"] = float(gen.pop("top_p"))
        items = []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            items.append(self._inputs(context, self._visuals(doc_to_visual, doc_id, task, split)))
        # videos of different layouts (F frames; Qwen's grid) share no batch: pixel tensors of
        # other shapes cannot be stacked, and a batch reports one token count per video
        shapes: dict[tuple, list[int]] = {}
        for j, item in enumerate(items):
            key = tuple(
                (
                    k,
                    tuple(v.shape[1:]),
                    None if v.is_floating_point() else tuple(v.flatten().tolist()),
                )
                for k, v in item.items()
                if isinstance(v, torch.Tensor) and k not in SEQUENCE_INPUTS
            )
            shapes.setdefault(key, []).append(j)
        texts: list[str] = [""] * len(items)
        counts: list[tuple[int, int]] = [(0, 0)] * len(items)
        for rows in shapes.values():
            batch = self._to_device(left_pad([items[j] for j in rows], settings["pad_token_id"]))
            if self.sessions is not None and len(rows) == 1 and settings["num_beams"] == 1:
                # one question: its video's prepared session (vision, compression, prefix < K)
                sequences = self.sessions.ask(self.model, self.handle, batch, **settings)
            else:
                sequences = self.model.generate(**batch, **settings)
            new = sequences[:, batch["input_ids"].shape[1] :]
            entered = self._tokens_entering([items[j] for j in rows])
            self._log_stats(len(rows))
            for row, j in enumerate(rows):
                tokens = new[row]
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                texts[j] = text
                produced = int((tokens != settings["pad_token_id"]).sum())
                counts[j] = (entered[row], produced)
        return texts, counts

    def _tokens_entering(self, items: list[dict[str, torch.Tensor]]) -> list[int]:
        """Tokens of each prompt that entered the LLM: its own length, less the visual tokens
        the compression removed (``handle.stats`` of the prefill that just ran)."""
        lengths = [int(item["input_ids"].shape[1]) for item in items]
        if self.handle is None:
            return lengths
        stats = self.handle.stats
        return [n - stats.visual_tokens + stats.tokens_in for n in lengths]

    def _log_stats(self, rows: int) -> None:
        from loguru import logger

        if self.handle is not None:
            stats = self.handle.stats
            logger.info(
                f"{self.name} rank {self.rank}: batch of {rows}, visual tokens "
                f"{stats.visual_tokens} -> {stats.tokens_in} entering the LLM -> "
                f"{stats.tokens_after_merge} after layer {self.config.layer}"
            )

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError(f"{self.name} does not implement multi-round generation")


def _auto_processor(pretrained: str) -> Any:
    """transformers' processor of the checkpoint, or None (with a warning) where it cannot be
    built, e.g. without torchvision for the video processor."""
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(pretrained)
        if getattr(processor, "video_processor", None) is None:
            raise ValueError(f"it built a {type(processor).__name__} without a video processor")
    except Exception as exc:
        warnings.warn(
            f"AutoProcessor.from_pretrained({pretrained!r}) failed ({exc}); laying "
            "out the inputs in ustc (the backbone's manual processor)",
            stacklevel=3,
        )
        return None
    processor.tokenizer.padding_side = "left"  # batches are left-padded by the plugin anyway
    return processor


_LOGLIKELIHOOD_CHECKED: list[bool] = []


def _warn_if_loglikelihood_is_broken() -> None:
    """Warn once if lmms-eval's evaluator would turn (logprob, greedy) pairs into strings."""
    if _LOGLIKELIHOOD_CHECKED:
        return
    _LOGLIKELIHOOD_CHECKED.append(True)
    try:
        from lmms_eval.api.instance import unwrap_generation_output
    except ImportError:
        return
    if unwrap_generation_output((0.0, True))[0] != (0.0, True):
        warnings.warn(
            "this lmms-eval turns loglikelihood results into strings "
            "(unwrap_generation_output), for every model: multiple-choice tasks scored by "
            "loglikelihood fail; run their generation variants (answer letter parsed from the "
            "generated text), see docs/lmms-eval.md",
            stacklevel=3,
        )


class ManualProcessor:
    """What the torchvision-free processors share: a ChatML prompt (``system`` first, the
    video written as ``video_marker`` + ``marker_end``), the tokenizer's ids of a text piece,
    and the prompt cut at its video markers (one per video)."""

    video_marker = "<video>"
    #: written right after the marker in the prompt
    marker_end = ""
    #: the prompt's opening (a system turn), or ""
    system = ""
    tokenizer: Any

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        text = self.system
        for message in messages:
            marker = self.video_marker + self.marker_end
            body = "".join(
                marker if p["type"] == "video" else p["text"] for p in message["content"]
            )
            text += f"<|im_start|>{message['role']}\n{body}<|im_end|>\n"
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _pieces(self, text: str, videos: Sequence[np.ndarray] | None) -> list[str]:
        """``text`` cut at its video markers; ValueError unless there is one per video."""
        pieces = text.split(self.video_marker)
        if len(pieces) - 1 != len(videos or []):
            raise ValueError(f"{len(pieces) - 1} video placeholders for {len(videos or [])} videos")
        return pieces
