"""Shared machinery of the model adapters: the ``Handle``, the hooks, the in-LLM merge at layer K.

How a compressed ``generate()`` flows through an attached model (every hook is on the instance,
removable, and nothing in transformers is patched):

1. ``model.model`` forward pre-hook (prefill with a video): checks the inputs (one video per
   row, no padding, no images) before anything runs.
2. ``get_video_features``, wrapped on the instance (``generate()`` of transformers >= 5.2x calls
   it before the first forward, older versions inside it): while it runs, a pre-hook on one
   vision-encoder attention recomputes q and k from the layer's input and reduces them, frame by
   frame, to one Eq. (1) score per token, aligned with the tokens the projector/pooling produce.
   No attention map outlives the hook.
3. ``language_model`` forward pre-hook: the model has placed the video features in
   ``inputs_embeds``; they are compressed to ``config.budget(F, P)`` tokens, and
   ``inputs_embeds``, ``attention_mask`` and ``position_ids`` are cut to the kept columns, so the
   kept tokens keep their original (RoPE / M-RoPE) positions.
4. Decoder-layer pre-hooks on layers >= K: at layer K the visual hidden states are merged to
   ``config.kept_after_merge(M)`` tokens (Eq. 5-10); the position embeddings, position ids and a
   tensor attention mask are cut the same way at every layer >= K.  The KV cache of those layers
   then simply holds fewer entries.
5. Decode steps: ``generate()`` keeps its own bookkeeping at the original length (the returned
   sequences start with the caller's ``input_ids``, positions continue at n, n+1, ...); the hooks
   map its 2-D attention mask onto the columns each cache layer really holds.

B batch, F frames, P tokens per frame, N = F*P, D features, n prompt length, n' tokens entering
the LLM, n'' tokens after layer K.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ustc.compressor import CompressionResult, Compressor
from ustc.config import CompressionConfig
from ustc.merging import MergeResult
from ustc.scoring import mean_received_attention

#: attention probabilities (frames x heads x queries x keys floats) computed at once by the
#: vision-score reduction: bounds the memory of Eq. (1) at 32-64 frames of 729 tokens
VISION_BLOCK = 1 << 26

_ATTACHED = "_ustc_handle"


@dataclass
class CompressionStats:
    """What the last compressed prefill did, per video, and the time spent compressing.

    visual_tokens:        F*P visual tokens of the video before compression.
    tokens_in:            visual tokens entering the LLM (``config.budget(F, P)``).
    tokens_after_merge:   visual tokens left after layer K (``config.kept_after_merge``).
    sequence_in:          all tokens of a prompt entering the LLM (text + visual), n'.
    sequence_after_merge: all tokens of a prompt in layers >= K, n''.
    prefills:             compressed prefills since ``attach`` (cumulative).
    score_seconds, compress_seconds, merge_seconds: time in the vision-score reduction (Eq. 1),
                          the external compression (Eq. 1-4) and the in-LLM merge (Eq. 5-10),
                          cumulative; ``total_seconds`` is their sum.
    """

    visual_tokens: int = 0
    tokens_in: int = 0
    tokens_after_merge: int = 0
    sequence_in: int = 0
    sequence_after_merge: int = 0
    prefills: int = 0
    score_seconds: float = 0.0
    compress_seconds: float = 0.0
    merge_seconds: float = 0.0

    @property
    def total_seconds(self) -> float:
        return self.score_seconds + self.compress_seconds + self.merge_seconds

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "total_seconds": self.total_seconds}


@dataclass
class LastRun:
    """The tensors of the last compressed prefill (for analysis and tests).

    vision_scores:   (B, F, P) Eq. (1) scores aligned with the LLM's visual tokens, or None when
                     the scorer needs none.
    compression:     the ``CompressionResult`` of the external stage (indices into N = F*P).
    merge:           the ``MergeResult`` of layer K (indices into the M kept tokens), or None.
    input_positions: (B, n') columns of the original prompt that entered the LLM.
    merged_positions:(B, n'') columns of the original prompt left in layers >= K, or None.
    video_start:     column of the first visual token of the original prompt.
    """

    frames: int
    tokens_per_frame: int
    vision_scores: Tensor | None
    compression: CompressionResult
    input_positions: Tensor
    video_start: int
    merge: MergeResult | None = None
    merged_positions: Tensor | None = None


@dataclass
class VideoLayout:
    """Where one video per row sits in ``input_ids`` (the same columns in every row).

    start:    column of the first of the F*P grid tokens.
    frames:   F.  tokens_per_frame: P.
    trailing: placeholder/structural tokens right after the grid that are neither compressed nor
              text for the merger (LLaVA-OV: the image_newline; Qwen2.5-VL: <|vision_end|>).
    """

    start: int
    frames: int
    tokens_per_frame: int
    trailing: int

    @property
    def end(self) -> int:
        return self.start + self.frames * self.tokens_per_frame


@dataclass
class Session:
    """What the hooks must remember about one KV cache between prefill and decode steps."""

    keep: Tensor  # (B, n') original columns held by the cache layers < K
    prompt_length: int  # n
    seen: int  # tokens generate() has accounted for, at the original length
    visual: tuple[int, int, int]  # (start, end, text start) of the visual tokens in the n' sequence
    merge_keep: Tensor | None = None  # (B, n'') columns of the n' sequence held by layers >= K


@dataclass
class VideoCall:
    """One call of ``get_video_features``: what the adapter needs to lay the video out.

    batch:  videos encoded.
    frames: F of ``pixel_values_videos`` (LLaVA-OV).
    grid:   ``video_grid_thw`` (Qwen2.5-VL).
    scores: (B*F*P,) Eq. (1) scores captured during the call, or None.
    """

    batch: int
    frames: int | None = None
    grid: Tensor | None = None
    scores: Tensor | None = None


@dataclass
class _Forward:
    """Per-forward transient state, reset after every forward of ``model.model``."""

    prefill: dict[str, Any] | None = None  # the prefill's keyword arguments
    phase: str | None = None  # "prefill" or "decode" when layer hooks must act
    session: Session | None = None
    new_session: bool = False  # this forward is a compressed prefill: remember its cache
    sliced: dict[int, Any] = field(default_factory=dict)


class Handle:
    """A compressor attached to one model instance.  Created by ``ustc.attach``.

    ``stats`` reports what the last compressed prefill did; ``last`` keeps its tensors;
    ``remove()`` detaches every hook and leaves the model exactly as before.  Also a context
    manager: ``with ustc.attach(model, config) as handle: ...``.

    Subclasses (one per backbone family) say where the vision attention, the language model and
    the decoder layers are, and how the video placeholders and positions are laid out.
    """

    #: the decoder-layer attribute names used by the merge at layer K
    layer_attention = "self_attn"
    layer_norm = "input_layernorm"

    def __init__(self, model: nn.Module, config: CompressionConfig) -> None:
        if not isinstance(config, CompressionConfig):
            raise ValueError(
                f"config must be a ustc.CompressionConfig, got {type(config).__name__}"
            )
        if getattr(model, _ATTACHED, None) is not None:
            raise ValueError(
                f"a ustc compressor is already attached to this {type(model).__name__}; call "
                "handle.remove() before attaching another one"
            )
        self.model = model
        self.config = config
        self.compressor = Compressor(config)
        self.stats = CompressionStats()
        self.last: LastRun | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._sessions: weakref.WeakKeyDictionary[Any, Session] = weakref.WeakKeyDictionary()
        self._fwd = _Forward()
        self._restore: list[Callable[[], None]] = []
        self._capturing = False
        self._scores: list[Tensor] = []
        self._video: VideoCall | None = None
        layers = self.decoder_layers()
        if self.compressor.has_merger and config.layer > len(layers):
            raise ValueError(
                f"layer K={config.layer} is past the last decoder layer: the language model has "
                f"{len(layers)} layers, so K must be in [0, {len(layers)}] (K = {len(layers)} "
                "turns the in-LLM merge off)"
            )
        self.merge_active = self.compressor.has_merger and config.layer < len(layers)
        # at retention 1 nothing is selected, so Eq. (1) would be computed for nothing
        self.needs_scores = self.compressor.needs_attention and config.retention < 1.0
        try:
            self._install()
        except Exception:
            self.remove()
            raise
        setattr(model, _ATTACHED, self)

    # ----------------------------------------------------------------- backbone specifics
    def base_model(self) -> nn.Module:
        """The module whose forward takes ``input_ids`` and ``pixel_values_videos``."""
        return self.model.model

    def language_model(self) -> nn.Module:
        return self.base_model().language_model

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model().layers

    def vision_hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Install the vision-score capture; it calls ``self._add_scores`` with (B*F, P) scores
        while ``get_video_features`` runs."""
        raise NotImplementedError

    def video_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> VideoCall:
        """Read F (or the grid) from the arguments of a ``get_video_features`` call."""
        raise NotImplementedError

    def video_layout(self, kwargs: dict[str, Any], video: VideoCall | None) -> VideoLayout:
        """Locate the video in a prefill's keyword arguments; ValueError if unsupported."""
        raise NotImplementedError

    def decode_positions(
        self, session: Session, length: int, batch: int, device: torch.device
    ) -> Tensor:
        """Position ids of ``length`` new tokens when the caller passed none (manual decoding)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ lifecycle
    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        """Detach every hook; the model is exactly as before ``attach``.  Safe to call twice."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()
        self._sessions = weakref.WeakKeyDictionary()
        self._fwd = _Forward()
        self._video = None
        if getattr(self.model, _ATTACHED, None) is self:
            delattr(self.model, _ATTACHED)

    def reset_stats(self) -> None:
        """Zero the counters and timers (e.g. between a warm-up and a timed run)."""
        self.stats = CompressionStats()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return f"{type(self).__name__}({type(self.model).__name__}, {self.config!r}, {state})"

    def _install(self) -> None:
        base = self.base_model()
        self._wrap_video_features(base)
        self._hooks.append(base.register_forward_pre_hook(self._before_model, with_kwargs=True))
        self._hooks.append(base.register_forward_hook(self._after_model, always_call=True))
        lm = self.language_model()
        self._hooks.append(
            lm.register_forward_pre_hook(self._before_language_model, with_kwargs=True)
        )
        self._hooks.append(lm.register_forward_hook(self._after_language_model, with_kwargs=True))
        if self.needs_scores:
            self._hooks.extend(self.vision_hooks())
        if self.merge_active:
            for index, layer in enumerate(self.decoder_layers()):
                if index >= self.config.layer:
                    hook = _bind_layer_hook(self._before_layer, index)
                    self._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))

    def _wrap_video_features(self, base: nn.Module) -> None:
        """Wrap ``get_video_features`` on this instance only (``remove`` restores it).

        transformers >= 5.2x ``generate()`` encodes the video *before* the first forward and
        passes ``mm_encoder_outputs``; older versions and plain forwards encode inside the
        forward.  Wrapping the one method both paths call captures the Eq. (1) scores and the
        video's shape either way.  ``functools.wraps`` keeps the signature that ``generate()``
        inspects to route its arguments.
        """
        missing = object()
        previous = base.__dict__.get("get_video_features", missing)
        original = base.get_video_features

        @functools.wraps(original)
        def get_video_features(*args: Any, **kwargs: Any) -> Any:
            self._capturing = self.needs_scores
            self._scores = []
            try:
                output = original(*args, **kwargs)
            finally:
                self._capturing = False
            video = self.video_call(args, kwargs)
            video.scores = (
                torch.cat([s.reshape(-1) for s in self._scores]) if self._scores else None
            )
            self._scores = []
            self._video = video
            return output

        base.get_video_features = get_video_features

        def restore() -> None:
            if previous is missing:
                base.__dict__.pop("get_video_features", None)
            else:
                base.get_video_features = previous

        self._restore.append(restore)

    # ------------------------------------------------------------------------- model level
    def _before_model(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self._fwd = _Forward()
        if args:  # bind positional arguments to their names so the hooks can find them
            names = [
                p.name
                for p in inspect.signature(module.forward).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            kwargs = {**dict(zip(names[: len(args)], args, strict=True)), **kwargs}
            args = ()
        cache = cache_argument(kwargs)
        session = self._sessions.get(cache) if cache is not None else None
        encoded = kwargs.get("mm_encoder_outputs") or {}
        if kwargs.get("pixel_values_videos") is not None:
            self._video = None  # encoded inside this forward
            self._start_prefill(kwargs, cache, session)
        elif encoded.get("video") is not None:
            self._start_prefill(kwargs, cache, session)
        elif session is not None:
            self._start_decode(kwargs, session)
        return args, kwargs

    def _after_model(self, module: nn.Module, args: Any, output: Any) -> None:
        self._fwd = _Forward()

    def _start_prefill(self, kwargs: dict[str, Any], cache: Any, session: Session | None) -> None:
        encoded = kwargs.get("mm_encoder_outputs") or {}
        if kwargs.get("pixel_values") is not None or encoded.get("image") is not None:
            raise ValueError(
                "images mixed with a video in one call are not supported by ustc: the compressor "
                "allocates one budget over the frames of a single video; pass the video alone"
            )
        if session is not None or (cache is not None and _cache_length(cache, 0) > 0):
            raise ValueError(
                "a new video on top of a non-empty KV cache is not supported: start a new "
                "conversation (fresh cache) for each video"
            )
        if cache is not None:
            _check_cache(cache)
        ids = kwargs.get("input_ids")
        if ids is None or ids.dim() != 2:
            raise ValueError(
                "compression needs input_ids (B, n) to find the video placeholders; "
                "inputs_embeds without input_ids is not supported"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(
                    f"only a 2-D (B, n) attention_mask is supported, got shape {tuple(mask.shape)}"
                )
            if not bool(mask.all()):
                raise ValueError(
                    "padded batches (attention_mask with zeros) are not supported: use batch "
                    "size 1 or prompts of equal length with the video at the same position"
                )
        if kwargs.get("pixel_values_videos") is not None:  # fail before the vision tower runs
            video = self.video_call((), kwargs)
            if video.batch != ids.shape[0]:
                raise ValueError(
                    f"{video.batch} videos for {ids.shape[0]} prompts: exactly one video per "
                    "prompt row is supported"
                )
            self.video_layout(kwargs, video)
        self._fwd.prefill = kwargs

    def _start_decode(self, kwargs: dict[str, Any], session: Session) -> None:
        ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        length = ids.shape[1] if ids is not None else embeds.shape[1]
        batch = ids.shape[0] if ids is not None else embeds.shape[0]
        device = ids.device if ids is not None else embeds.device
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2 or mask.shape[1] != session.seen + length:
                raise ValueError(
                    "decode-step attention_mask must be 2-D and cover the original prompt and "
                    f"every token since: expected (B, {session.seen + length}), got "
                    f"{tuple(mask.shape)}"
                )
            n = session.prompt_length
            kwargs["attention_mask"] = torch.cat(
                [mask[:, :n].gather(1, session.keep.to(mask.device)), mask[:, n:]], dim=1
            )
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = self.decode_positions(session, length, batch, device)
        session.seen += length
        if session.merge_keep is not None:
            self._fwd.phase = "decode"
            self._fwd.session = session

    # ------------------------------------------------------------------ vision scores
    def _add_scores(self, scores: Tensor) -> None:
        self._scores.append(scores)

    def _take_scores(
        self, video: VideoCall | None, batch: int, frames: int, per_frame: int
    ) -> Tensor | None:
        if not self.needs_scores:
            return None
        if video is None or video.scores is None:
            raise ValueError(
                f"scorer {self.config.scorer!r} needs the vision attention of Eq. (1), but the "
                "video features were not computed by this attached model (precomputed "
                "mm_encoder_outputs, or encoded before attach); pass pixel_values_videos"
            )
        scores = video.scores
        per_video = frames * per_frame
        if scores.numel() % per_video or batch % (scores.numel() // per_video):
            raise RuntimeError(
                f"captured {scores.numel()} vision scores for {batch} x {frames} x {per_frame} "
                "visual tokens: the vision tower ran on inputs other than this video"
            )
        scores = scores.reshape(-1, frames, per_frame)
        # generate(num_return_sequences=...) repeats the encoded videos row by row
        return scores.repeat_interleave(batch // scores.shape[0], dim=0)

    # ---------------------------------------------------------------- language model
    def _before_language_model(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        prefill = self._fwd.prefill
        if prefill is None:
            return None
        self._fwd.prefill = None
        # not consumed: generate(use_cache=False) reuses one encoding for every step
        video = self._video
        layout = self.video_layout(prefill, video)
        if self.merge_active and prefill["input_ids"].shape[1] <= layout.end + layout.trailing:
            raise ValueError(
                "in-LLM merging needs text (the question) after the video placeholders; the "
                "prompt ends with the video"
            )
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or args:
            raise RuntimeError(
                "expected the multimodal model to call its language model with inputs_embeds"
            )
        cache = cache_argument(kwargs)
        if cache is not None:
            _check_cache(cache)
        b, n, _ = embeds.shape
        f, p = layout.frames, layout.tokens_per_frame
        start, end = layout.start, layout.end

        scores = self._take_scores(video, b, f, p)
        t0 = clock(embeds)
        features = embeds[:, start:end].reshape(b, f, p, -1)
        result = self.compressor.compress(features, scores)
        m = result.indices.shape[1]
        device = embeds.device
        keep = torch.cat(
            [
                torch.arange(start, device=device).expand(b, start),
                start + result.indices,
                torch.arange(end, n, device=device).expand(b, n - end),
            ],
            dim=1,
        )
        kwargs["inputs_embeds"] = torch.cat(
            [embeds[:, :start], result.tokens.to(embeds.dtype), embeds[:, end:]], dim=1
        )
        if m < f * p:  # otherwise the prompt is unchanged and so are its mask and positions
            positions = kwargs.get("position_ids")
            if positions is None:
                positions = torch.arange(n, device=device).expand(b, n)
            kwargs["position_ids"] = _gather_columns(positions, keep, b)
            mask = kwargs.get("attention_mask")
            if mask is None:
                # gapped positions without a mask read as packed sequences to transformers
                mask = torch.ones(b, n, dtype=torch.long, device=device)
            kwargs["attention_mask"] = mask.gather(1, keep.to(mask.device))
        self.stats.compress_seconds += clock(embeds) - t0

        session = Session(
            keep=keep,
            prompt_length=n,
            seen=n,
            visual=(start, start + m, start + m + layout.trailing),
        )
        self._fwd.session = session
        self._fwd.new_session = True
        self._fwd.phase = "prefill" if self.merge_active else None
        self.stats.prefills += 1
        self.stats.visual_tokens = f * p
        self.stats.tokens_in = m
        self.stats.tokens_after_merge = m
        self.stats.sequence_in = keep.shape[1]
        self.stats.sequence_after_merge = keep.shape[1]
        self.last = LastRun(f, p, scores, result, keep, start)
        return args, kwargs

    def _after_language_model(
        self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any
    ) -> None:
        session = self._fwd.session
        if session is None or not self._fwd.new_session:
            return
        cache = next(
            (c for c in (getattr(output, name, None) for name in CACHE_NAMES) if c is not None),
            cache_argument(kwargs),
        )
        if cache is not None:
            self._sessions[cache] = session

    # ------------------------------------------------------------------ layers >= K
    def _before_layer(
        self, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        phase, session = self._fwd.phase, self._fwd.session
        if phase is None or session is None:
            return None
        if phase == "prefill":
            if index == self.config.layer:
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = self._merge(module, hidden, kwargs, session)
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs["hidden_states"] = hidden
            keep = session.merge_keep
            assert keep is not None
            kwargs["position_embeddings"] = self._sliced(
                kwargs.get("position_embeddings"),
                lambda pe: tuple(_gather_columns(x, keep, keep.shape[0], dim=-2) for x in pe),
            )
            kwargs["position_ids"] = self._sliced(
                kwargs.get("position_ids"), lambda pos: _gather_columns(pos, keep, keep.shape[0])
            )
            kwargs["attention_mask"] = self._sliced(
                kwargs.get("attention_mask"), lambda mask: _slice_mask(mask, keep, keep)
            )
        else:  # decode: the cache of this layer holds the n'' prefill columns and what followed
            mask = kwargs.get("attention_mask")
            if isinstance(mask, Tensor):
                keep = session.merge_keep
                assert keep is not None
                n_in = session.keep.shape[1]
                later = torch.arange(n_in, mask.shape[-1], device=mask.device).expand(
                    keep.shape[0], -1
                )
                columns = torch.cat([keep.to(mask.device), later], dim=1)
                kwargs["attention_mask"] = self._sliced(
                    mask, lambda m: _slice_mask(m, None, columns)
                )
            elif mask is not None:
                raise ValueError(
                    f"unsupported attention mask type {type(mask).__name__} at layer {index}"
                )
        return args, kwargs

    def _sliced(self, value: Any, fn: Callable[[Any], Any]) -> Any:
        """``fn(value)``, computed once per forward: every layer >= K receives the same objects."""
        if value is None:
            return None
        key = id(value)
        if key not in self._fwd.sliced:
            self._fwd.sliced[key] = (value, fn(value))  # keep value alive so its id stays unique
        return self._fwd.sliced[key][1]

    def _merge(
        self, layer: nn.Module, hidden: Tensor, kwargs: dict[str, Any], session: Session
    ) -> Tensor:
        """Layer K, prefill: merge the visual hidden states (Eq. 5-10) and cut the sequence."""
        start, end, text_start = session.visual
        t0 = clock(hidden)
        visual, text = hidden[:, start:end], hidden[:, text_start:]
        attention = None
        if self.compressor.merger_needs_attention:
            cos, sin = kwargs["position_embeddings"]
            attention = text_to_visual_attention(
                getattr(layer, self.layer_attention),
                getattr(layer, self.layer_norm)(hidden),
                cos,
                sin,
                text_start,
                start,
                end,
            )
        result = self.compressor.merge(visual, text, attention)
        b, n_in = hidden.shape[:2]
        device = hidden.device
        session.merge_keep = torch.cat(
            [
                torch.arange(start, device=device).expand(b, start),
                start + result.indices,
                torch.arange(end, n_in, device=device).expand(b, n_in - end),
            ],
            dim=1,
        )
        merged = torch.cat(
            [hidden[:, :start], result.tokens.to(hidden.dtype), hidden[:, end:]], dim=1
        )
        self.stats.merge_seconds += clock(hidden) - t0
        kept = result.indices.shape[1]
        self.stats.tokens_after_merge = kept
        self.stats.sequence_after_merge = merged.shape[1]
        if self.last is not None:
            self.last.merge = result
            self.last.merged_positions = self.last.input_positions.gather(
                1, session.merge_keep.to(self.last.input_positions.device)
            )
        return merged


def _bind_layer_hook(method: Callable[..., Any], index: int) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return method(index, module, args, kwargs)

    return hook


# ----------------------------------------------------------------------------- tensor helpers
def text_to_visual_attention(
    attention: nn.Module,
    normed: Tensor,
    cos: Tensor,
    sin: Tensor,
    text_start: int,
    visual_start: int,
    visual_end: int,
) -> Tensor:
    """A_qv = mean_h softmax(Q_h K_h^T / sqrt(d))[text rows, visual columns]   -- Eq. (1), (5)

    Recomputed from the decoder layer's own q/k projections and RoPE for the text rows only, so
    it works under sdpa/flash attention (which return no weights) in O(N_q * n) memory.  The
    softmax runs over the whole causal key set of each text row (every earlier token), then the
    visual columns are taken, as in the attention matrix A of Eq. (5).

    attention: the layer's self-attention (``q_proj``, ``k_proj``, ``head_dim``, ``scaling``).
    normed:    (B, n, D) the layer input after its input norm.
    cos, sin:  (B or 1, n, d) the layer's rotary embeddings.
    Returns (B, N_q, N_v) float32 with N_q = n - text_start, N_v = visual_end - visual_start.
    """
    rope = _rotary_function(attention)
    b, n, _ = normed.shape
    head_dim = attention.head_dim
    q = (
        attention.q_proj(normed[:, text_start:])
        .view(b, n - text_start, -1, head_dim)
        .transpose(1, 2)
    )
    k = attention.k_proj(normed).view(b, n, -1, head_dim).transpose(1, 2)
    q = rope(q, q, cos[:, text_start:], sin[:, text_start:])[0]
    k = rope(k, k, cos, sin)[1]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query heads
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attention.scaling
    rows = torch.arange(text_start, n, device=normed.device)
    causal = torch.arange(n, device=normed.device)[None, :] <= rows[:, None]  # (N_q, n)
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1).mean(dim=1)
    return probs[:, :, visual_start:visual_end]


def _rotary_function(attention: nn.Module) -> Callable[..., tuple[Tensor, Tensor]]:
    """The ``apply_rotary_pos_emb`` the attention module's own forward uses."""
    fn = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise ValueError(
            f"{type(attention).__name__} has no apply_rotary_pos_emb in its module; text-aware "
            "attention cannot be recomputed for this language model"
        )
    return fn


def vision_received_attention(q: Tensor, k: Tensor) -> Tensor:
    """Eq. (1) for encoders without CLS, over groups of frames so that memory stays bounded.

    q, k: (G, H, L, d) for G independent attention groups (frames or windows).  Returns (G, L).
    """
    g, h, length, _ = q.shape
    step = max(1, VISION_BLOCK // max(1, h * length * length))
    return torch.cat(
        [mean_received_attention(q[i : i + step], k[i : i + step]) for i in range(0, g, step)]
    )


def _gather_columns(x: Tensor, keep: Tensor, batch: int, dim: int = -1) -> Tensor:
    """Columns ``keep`` (B, m) of ``x`` along ``dim``; x is (..., B or 1, n, ...)."""
    dim = dim % x.dim()
    batch_dim = dim - 1
    shape = list(x.shape)
    shape[batch_dim] = batch
    x = x.expand(*shape)
    index_shape = [1] * x.dim()
    index_shape[batch_dim], index_shape[dim] = batch, keep.shape[1]
    index = keep.to(x.device).view(index_shape)
    target = list(x.shape)
    target[dim] = keep.shape[1]
    return x.gather(dim, index.expand(*target))


def _slice_mask(mask: Any, rows: Tensor | None, columns: Tensor) -> Any:
    """Cut a layer's attention mask to the kept query rows and key columns.

    4-D (B or 1, 1, q, kv) masks (eager, or sdpa with padding) lose rows and columns; 2-D (B, kv)
    padding masks (flash attention) lose columns.  ``None`` stays ``None`` (causal by shape).
    """
    if not isinstance(mask, Tensor):
        raise ValueError(
            f"attention mask of type {type(mask).__name__} is not supported with in-LLM merging "
            "(flex attention block masks cannot be cut); use sdpa, eager or flash attention"
        )
    b = columns.shape[0]
    if mask.dim() == 2:
        return _gather_columns(mask, columns, b)
    if mask.dim() != 4:
        raise ValueError(f"unexpected attention mask shape {tuple(mask.shape)}")
    mask = mask.expand(b, *mask.shape[1:])
    _, h, q, kv = mask.shape
    if rows is not None:
        q = rows.shape[1]
        mask = mask.gather(2, rows.to(mask.device)[:, None, :, None].expand(b, h, q, kv))
    return mask.gather(
        3, columns.to(mask.device)[:, None, None, :].expand(b, h, q, columns.shape[1])
    )


def placeholder_span(ids: Tensor, token: int) -> tuple[int, int]:
    """(first column, count) of the one contiguous run of ``token`` shared by every row."""
    hits = ids == token
    counts = hits.sum(dim=1)
    if int(counts.min()) == 0:
        raise ValueError(
            "pixel_values_videos given but input_ids holds no video placeholder tokens"
        )
    first = hits.int().argmax(dim=1)
    count, start = int(counts[0]), int(first[0])
    same = bool((counts == count).all()) and bool((first == start).all())
    contiguous = bool(hits[:, start : start + count].all())
    if not (same and contiguous):
        raise ValueError(
            "every prompt row must hold one video as one contiguous run of placeholders at the "
            "same columns (equal-length prompts); got rows that differ"
        )
    return start, count


#: the keyword a transformers release passes the KV cache by: ``cache`` from 5.24 on,
#: ``past_key_values`` before (and still accepted, deprecated, by 5.24)
CACHE_NAMES = ("cache", "past_key_values")


def cache_argument(kwargs: dict[str, Any]) -> Any:
    """The KV cache among a forward's keyword arguments, whichever name the caller used."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _cache_length(cache: Any, layer: int) -> int:
    try:
        return int(cache.get_seq_length(layer))
    except TypeError:
        return int(cache.get_seq_length())


def _check_cache(cache: Any) -> None:
    from transformers import DynamicCache

    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"only DynamicCache is supported with token compression, got {type(cache).__name__}: "
            "layers >= K hold fewer entries than layers < K, which static/offloaded caches "
            "cannot represent"
        )


def clock(tensor: Tensor) -> float:
    """Wall time; waits for the GPU first so that the compression time is not a launch time."""
    if tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()
