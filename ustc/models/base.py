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
                     the scorer needs none (rows of different F, P: None, see ``groups``).
    compression:     the ``CompressionResult`` of the external stage (indices into N = F*P).
    input_positions: (B, n') columns of the original prompt that entered the LLM; -1 marks a
                     padding slot (a batch whose rows keep different numbers of tokens is
                     left-padded to the longest, and padding moves to the left).
    video_start:     column of the first visual token of the original prompt (row 0).
    merge:           the ``MergeResult`` of layer K (indices into the M kept tokens), or None.
    merged_positions:(B, n'') columns of the original prompt left in layers >= K (-1: padding).
    groups:          (rows, compression, merge) per group of rows whose videos have the same
                     F x P (one group, all rows, unless the videos of a batch differ in size);
                     ``compression`` and ``merge`` are the first group's.
    """

    frames: int
    tokens_per_frame: int
    vision_scores: Tensor | None
    compression: CompressionResult
    input_positions: Tensor
    video_start: int
    merge: MergeResult | None = None
    merged_positions: Tensor | None = None
    groups: list[Group] = field(default_factory=list)


@dataclass
class Group:
    """Rows of a batch compressed together (their videos have the same F x P)."""

    rows: Tensor  # (G,) row indices
    frames: int
    tokens_per_frame: int
    compression: CompressionResult
    merge: MergeResult | None = None


@dataclass
class VideoLayout:
    """Where the one video of each prompt row sits in ``input_ids``.

    starts:           (B,) column of each row's first grid token; rows differ with padding or
                      prompts of different lengths.
    frames:           F of each row.  tokens_per_frame: P of each row (rows differ only where
                      the backbone takes videos of different sizes in one batch).
    trailing:         placeholder/structural tokens right after the grid that are neither
                      compressed nor text for the merger (LLaVA-OV: the image_newline;
                      Qwen2.5-VL: <|vision_end|>).
    """

    starts: Tensor
    frames: list[int]
    tokens_per_frame: list[int]
    trailing: int

    @property
    def sizes(self) -> list[int]:
        """F*P of each row."""
        return [f * p for f, p in zip(self.frames, self.tokens_per_frame, strict=True)]


@dataclass
class Session:
    """What the hooks must remember about one KV cache between prefill and decode steps.

    Columns are per row: ``keep`` and ``merge_keep`` hold -1 in padding slots.
    """

    keep: Tensor  # (B, n') original columns held by the cache layers < K
    prompt_length: int  # n
    seen: int  # tokens generate() has accounted for, at the original length
    visual_starts: Tensor  # (B,) first visual token of each row in the n' sequence
    visual_counts: list[int]  # M of each row
    text_starts: Tensor  # (B,) first text token after the video of each row in the n' sequence
    valid: Tensor  # (B, n') bool: not a padding column
    groups: list[Tensor]  # rows compressed (and merged) together
    #: position of each row's next token, per position axis: (B,) or (axes, B)
    next_position: Tensor | None = None
    #: (B,) rows of a compressed prompt that were padded on the right, or None: their padding
    #: moved left, so their next positions continue from their own last token
    right_padded: Tensor | None = None
    merge_keep: Tensor | None = None  # (B, n'') columns of the n' sequence held by layers >= K
    merge_pads: bool = False  # merge_keep holds padding slots


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
    decode: Session | None = None  # this forward is a decode step of that session
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
        if mask is not None and (not isinstance(mask, Tensor) or mask.shape != ids.shape):
            raise ValueError(
                "attention_mask must be a 2-D (B, n) padding mask like input_ids "
                f"{tuple(ids.shape)}, got {_describe(mask)}"
                f"{_version_note()}"
            )
        if kwargs.get("pixel_values_videos") is not None:  # fail before the vision tower runs
            video = self.video_call((), kwargs)
            if video.batch != ids.shape[0]:
                raise ValueError(
                    f"{video.batch} videos for {ids.shape[0]} prompts: exactly one video per "
                    "prompt row is supported"
                )
            layout = self.video_layout(kwargs, video)
            if mask is not None:
                columns = layout.starts[:, None] + torch.arange(max(layout.sizes))
                inside = columns < (layout.starts + torch.tensor(layout.sizes))[:, None]
                valid = mask.bool().gather(1, columns.clamp(max=ids.shape[1] - 1).to(mask.device))
                if not bool((valid | ~inside.to(mask.device)).all()):
                    raise ValueError(
                        "attention_mask masks video placeholders: padding must lie outside "
                        "the video of every row"
                    )
        self._fwd.prefill = kwargs

    def _start_decode(self, kwargs: dict[str, Any], session: Session) -> None:
        ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        length = ids.shape[1] if ids is not None else embeds.shape[1]
        batch = ids.shape[0] if ids is not None else embeds.shape[0]
        device = ids.device if ids is not None else embeds.device
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if (
                not isinstance(mask, Tensor)
                or mask.dim() != 2
                or mask.shape[1] != session.seen + length
            ):
                raise ValueError(
                    "decode-step attention_mask must be 2-D and cover the original prompt and "
                    f"every token since: expected (B, {session.seen + length}), got "
                    f"{_describe(mask)}{_version_note()}"
                )
            n = session.prompt_length
            kwargs["attention_mask"] = torch.cat(
                [take_columns(mask[:, :n], session.keep, fill=0), mask[:, n:]], dim=1
            )
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = self.decode_positions(session, length, batch, device)
        session.seen += length
        self._fwd.decode = session
        if session.merge_keep is not None:
            self._fwd.phase = "decode"
            self._fwd.session = session

    # ------------------------------------------------------------------ vision scores
    def _add_scores(self, scores: Tensor) -> None:
        self._scores.append(scores)

    def _take_scores(self, video: VideoCall | None, layout: VideoLayout) -> list[Tensor] | None:
        """The Eq. (1) scores of each prompt row, (F, P) each, or None if the scorer needs none."""
        if not self.needs_scores:
            return None
        if video is None or video.scores is None:
            raise ValueError(
                f"scorer {self.config.scorer!r} needs the vision attention of Eq. (1), but the "
                "video features were not computed by this attached model (precomputed "
                "mm_encoder_outputs, or encoded before attach); pass pixel_values_videos"
            )
        sizes = layout.sizes
        # generate(num_return_sequences=r) repeats each encoded video for r consecutive rows
        repeat = len(sizes) // video.batch if video.batch and len(sizes) % video.batch == 0 else 0
        encoded = sizes[::repeat] if repeat else []
        if not repeat or video.scores.numel() != sum(encoded):
            raise RuntimeError(
                f"captured {video.scores.numel()} vision scores for videos of {sizes} visual "
                "tokens: the vision tower ran on inputs other than these videos"
            )
        per_video = video.scores.split(encoded)
        return [
            per_video[row // repeat].reshape(f, p)
            for row, (f, p) in enumerate(zip(layout.frames, layout.tokens_per_frame, strict=True))
        ]

    # ---------------------------------------------------------------- language model
    def _before_language_model(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        prefill = self._fwd.prefill
        if prefill is None:
            if self._fwd.decode is not None:
                _continue_positions(kwargs, self._fwd.decode)
                return args, kwargs
            return None
        self._fwd.prefill = None
        # not consumed: generate(use_cache=False) reuses one encoding for every step
        video = self._video
        layout = self.video_layout(prefill, video)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or args:
            raise RuntimeError(
                "expected the multimodal model to call its language model with inputs_embeds"
            )
        cache = cache_argument(kwargs)
        if cache is not None:
            _check_cache(cache)
        b, n, _ = embeds.shape
        device = embeds.device
        columns = torch.arange(n, device=device)
        starts = layout.starts.to(device)
        ends = starts + torch.tensor(layout.sizes, device=device)
        mask = kwargs.get("attention_mask")
        valid = (
            torch.ones(b, n, dtype=torch.bool, device=device)
            if mask is None
            else mask.to(device).bool()
        )
        if self.merge_active:
            text = valid & (columns >= (ends + layout.trailing)[:, None])
            if not bool(text.any(dim=1).all()):
                raise ValueError(
                    "in-LLM merging needs text (the question) after the video placeholders; a "
                    "prompt ends with the video"
                )

        scores = self._take_scores(video, layout)
        t0 = clock(embeds)
        kept = valid & ~((columns >= starts[:, None]) & (columns < ends[:, None]))
        source = embeds.clone()
        groups: list[Group] = []
        for rows, (f, p) in _shape_groups(layout.frames, layout.tokens_per_frame, device):
            grid = starts[rows, None] + torch.arange(f * p, device=device)
            features = take_columns(embeds[rows], grid).reshape(len(rows), f, p, -1)
            group_scores = None if scores is None else torch.stack([scores[i] for i in rows])
            result = self.compressor.compress(features, group_scores)
            chosen = starts[rows, None] + result.indices
            kept[rows[:, None], chosen] = True
            source[rows[:, None], chosen] = result.tokens.to(embeds.dtype)
            groups.append(Group(rows, f, p, result))
        visual_counts = [0] * b
        for g in groups:
            for row in g.rows.tolist():
                visual_counts[row] = g.compression.indices.shape[1]
        unchanged = columns.expand(b, n)
        if visual_counts == layout.sizes:  # nothing removed: the prompt passes unchanged
            keep = unchanged
        else:
            keep = packed_columns(kept)
            kwargs["inputs_embeds"] = take_columns(source, keep)
            positions = kwargs.get("position_ids")
            if positions is None:
                positions = default_positions(mask, b, n, device)
            kwargs["position_ids"] = _gather_columns(positions, keep.clamp(min=0), b)
            # gapped positions without a mask read as packed sequences to transformers
            kwargs["attention_mask"] = take_columns(
                valid.to(mask.dtype if mask is not None else torch.long), keep, fill=0
            )
        self.stats.compress_seconds += clock(embeds) - t0

        before = (kept & (columns < starts[:, None])).sum(dim=1)
        pads = (keep < 0).sum(dim=1)
        visual_starts = pads + before
        session = Session(
            keep=keep,
            valid=take_columns(valid, keep, fill=False),
            groups=[g.rows for g in groups],
            prompt_length=n,
            seen=n,
            visual_starts=visual_starts,
            visual_counts=visual_counts,
            text_starts=visual_starts
            + torch.tensor(visual_counts, device=device)
            + layout.trailing,
            next_position=_next_position(
                _first(kwargs.get("position_ids"), lambda: default_positions(mask, b, n, device)),
                keep,
            ),
            right_padded=None if keep is unchanged or mask is None else mask[:, -1] == 0,
        )
        self._fwd.session = session
        self._fwd.new_session = True
        self._fwd.phase = "prefill" if self.merge_active else None
        first = groups[0]
        self.stats.prefills += 1
        self.stats.visual_tokens = max(layout.sizes)
        self.stats.tokens_in = max(visual_counts)
        self.stats.tokens_after_merge = max(visual_counts)
        self.stats.sequence_in = keep.shape[1]
        self.stats.sequence_after_merge = keep.shape[1]
        uniform = len(groups) == 1
        self.last = LastRun(
            first.frames,
            first.tokens_per_frame,
            torch.stack(scores) if scores is not None and uniform else None,
            first.compression,
            keep,
            int(layout.starts[0]),
            groups=groups,
        )
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
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, Tensor):
            raise ValueError(
                f"decoder layer {index} received no hidden_states tensor{_version_note()}"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and not isinstance(mask, Tensor):
            raise ValueError(
                f"decoder layer {index} received an attention mask of type "
                f"{type(mask).__name__}, which cannot be cut to the merged tokens; use sdpa, eager "
                f"or flash attention{_version_note()}"
            )
        if phase == "prefill":
            if index == self.config.layer:
                hidden = self._merge(module, hidden, kwargs, session)
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs["hidden_states"] = hidden
            keep = session.merge_keep
            assert keep is not None
            b = keep.shape[0]
            index_ = keep.clamp(min=0)
            if kwargs.get("position_embeddings") is None:
                raise ValueError(
                    f"decoder layer {index} received no position_embeddings (cos, sin)"
                    f"{_version_note()}"
                )
            kwargs["position_embeddings"] = self._sliced(
                kwargs["position_embeddings"],
                lambda pe: tuple(_gather_columns(x, index_, b, dim=-2) for x in pe),
            )
            kwargs["position_ids"] = self._sliced(
                kwargs.get("position_ids"), lambda pos: _gather_columns(pos, index_, b)
            )
            if mask is not None:
                kwargs["attention_mask"] = self._sliced(mask, lambda m: _slice_mask(m, keep, keep))
            elif session.merge_pads:
                kwargs["attention_mask"] = self._sliced(
                    keep, lambda k: _padding_mask(k, k.shape[1])
                )
        else:  # decode: the cache of this layer holds the n'' prefill columns and what followed
            keep = session.merge_keep
            assert keep is not None
            n_in = session.keep.shape[1]
            width = (
                mask.shape[-1] if mask is not None else n_in + session.seen - session.prompt_length
            )
            later = torch.arange(n_in, width, device=keep.device).expand(keep.shape[0], -1)
            columns = torch.cat([keep, later], dim=1)
            if mask is not None:
                kwargs["attention_mask"] = self._sliced(
                    mask, lambda m: _slice_mask(m, None, columns)
                )
            elif session.merge_pads:
                kwargs["attention_mask"] = self._sliced(
                    session, lambda _: _padding_mask(columns, hidden.shape[1])
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
        """Layer K, prefill: merge the visual hidden states (Eq. 5-10) and cut the sequence.

        Rows are merged in the groups they were compressed in (equal M); each row's text is the
        tokens after its video, right-aligned (the n' sequence is left-padded), with a mask over
        the columns another row's longer text needs.
        """
        t0 = clock(hidden)
        b, n_in, _ = hidden.shape
        device = hidden.device
        columns = torch.arange(n_in, device=device)
        starts, text_starts = session.visual_starts, session.text_starts
        ends = starts + torch.tensor(session.visual_counts, device=device)
        kept = session.valid & ~((columns >= starts[:, None]) & (columns < ends[:, None]))
        source = hidden.clone()
        normed = None
        if self.compressor.merger_needs_attention:
            normed = getattr(layer, self.layer_norm)(hidden)
        results: list[MergeResult] = []
        for rows in session.groups:
            m = session.visual_counts[int(rows[0])]
            visual_columns = starts[rows, None] + torch.arange(m, device=device)
            text_start = int(text_starts[rows].min())
            text_mask = columns[text_start:] >= text_starts[rows, None]
            attention = None
            if normed is not None:
                cos, sin = kwargs["position_embeddings"]
                attention = text_to_visual_attention(
                    getattr(layer, self.layer_attention),
                    normed[rows],
                    _rows(cos, rows),
                    _rows(sin, rows),
                    text_start,
                    visual_columns,
                    session.valid[rows],
                )
            result = self.compressor.merge(
                take_columns(hidden[rows], visual_columns),
                hidden[rows, text_start:],
                attention,
                text_mask=None if bool(text_mask.all()) else text_mask,
            )
            chosen = starts[rows, None] + result.indices
            kept[rows[:, None], chosen] = True
            source[rows[:, None], chosen] = result.tokens.to(hidden.dtype)
            results.append(result)
        session.merge_keep = packed_columns(kept)
        session.merge_pads = bool((session.merge_keep < 0).any())
        merged = take_columns(source, session.merge_keep, fill=0)
        self.stats.merge_seconds += clock(hidden) - t0
        self.stats.tokens_after_merge = max(r.indices.shape[1] for r in results)
        self.stats.sequence_after_merge = merged.shape[1]
        if self.last is not None:
            for group, result in zip(self.last.groups, results, strict=True):
                group.merge = result
            self.last.merge = results[0]
            self.last.merged_positions = take_columns(
                self.last.input_positions, session.merge_keep, fill=-1
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
    visual_columns: Tensor,
    key_mask: Tensor | None = None,
) -> Tensor:
    """A_qv = mean_h softmax(Q_h K_h^T / sqrt(d))[text rows, visual columns]   -- Eq. (1), (5)

    Recomputed from the decoder layer's own q/k projections and RoPE for the text rows only, so
    it works under sdpa/flash attention (which return no weights) in O(N_q * n) memory.  The
    softmax runs over the whole causal key set of each text row (every earlier token that is not
    padding), then the visual columns are taken, as in the attention matrix A of Eq. (5).

    attention:      the layer's self-attention (``q_proj``, ``k_proj``, ``head_dim``, ``scaling``).
    normed:         (B, n, D) the layer input after its input norm.
    cos, sin:       (B or 1, n, d) the layer's rotary embeddings.
    text_start:     first text row (rows of a padded batch may start later: mask them after).
    visual_columns: (B, N_v) the column of each visual token in each row.
    key_mask:       (B, n) bool, False for padding columns (no query attends to them).
    Returns (B, N_q, N_v) float32 with N_q = n - text_start.
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
    allowed = (torch.arange(n, device=normed.device)[None, :] <= rows[:, None])[None]  # (1, N_q, n)
    if key_mask is not None:
        allowed = allowed & key_mask.to(normed.device)[:, None, :]
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1).mean(dim=1)
    index = visual_columns.to(normed.device)[:, None, :].expand(b, n - text_start, -1)
    return probs.gather(2, index)


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


def _slice_mask(mask: Tensor, rows: Tensor | None, columns: Tensor) -> Tensor:
    """Cut a layer's attention mask to the kept query rows and key columns (-1: padding slot).

    4-D (B or 1, 1, q, kv) masks (eager, or sdpa with padding) lose rows and columns; 2-D (B, kv)
    padding masks (flash attention) lose columns.  Padding slots are masked out.
    """
    b = columns.shape[0]
    if mask.dim() == 2:
        return take_columns(mask, columns, fill=0)
    if mask.dim() != 4:
        raise ValueError(f"unexpected attention mask shape {tuple(mask.shape)}{_version_note()}")
    mask = mask.expand(b, *mask.shape[1:])
    _, h, q, kv = mask.shape
    if rows is not None:
        q = rows.shape[1]
        index = rows.clamp(min=0).to(mask.device)[:, None, :, None].expand(b, h, q, kv)
        mask = mask.gather(2, index)
    index = columns.clamp(min=0).to(mask.device)[:, None, None, :].expand(b, h, q, columns.shape[1])
    cut = mask.gather(3, index)
    blocked = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    return cut.masked_fill((columns < 0).to(mask.device)[:, None, None, :], blocked)


def _padding_mask(columns: Tensor, queries: int) -> Tensor:
    """(B, 1, q, kv) bool mask: causal over the last ``queries`` columns, padding slots masked."""
    kv = columns.shape[1]
    rows = torch.arange(kv - queries, kv, device=columns.device)
    causal = torch.arange(kv, device=columns.device)[None, :] <= rows[:, None]
    return (causal[None] & (columns >= 0)[:, None, :])[:, None]


def take_columns(x: Tensor, columns: Tensor, fill: float | bool | None = None) -> Tensor:
    """``x[b, columns[b]]`` for x (B, n) or (B, n, D) and columns (B, m); a -1 column gives
    ``fill`` (padding slots)."""
    index = columns.clamp(min=0).to(x.device)
    if x.dim() == 3:
        out = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    else:
        out = x.gather(1, index)
    if fill is None:
        return out
    pad = (columns < 0).to(x.device)
    return out.masked_fill(pad[..., None] if x.dim() == 3 else pad, fill)


def packed_columns(kept: Tensor) -> Tensor:
    """Each row's kept columns in order, right-aligned to the longest row, -1 on the left.

    kept: (B, n) bool.  Returns (B, max_b count_b) long.  Padding goes to the left, as in a
    left-padded batch, so that every row's last column is its last token (``generate()`` reads
    the next token there), whether the caller padded left or right.
    """
    n = kept.shape[1]
    counts = kept.sum(dim=1)
    width = int(counts.max())
    # a stable sort puts each row's dropped columns first and its kept ones last, both in order
    order = torch.sort(kept.to(torch.uint8), dim=1, stable=True).indices[:, n - width :]
    slot = torch.arange(width, device=kept.device)
    return torch.where(slot >= (width - counts)[:, None], order, -1)


def default_positions(mask: Tensor | None, batch: int, n: int, device: torch.device) -> Tensor:
    """1-D positions of a prompt when the caller gave none: 0..n-1, or counted over the unmasked
    tokens of each row when the batch is padded (the rule of transformers' ``generate()``)."""
    if mask is None or bool(mask.all()):
        return torch.arange(n, device=device).expand(batch, n)
    positions = mask.long().cumsum(dim=-1) - 1
    return positions.masked_fill(mask == 0, 1).to(device)


def _next_position(positions: Tensor, keep: Tensor) -> Tensor:
    """Position after each row's last kept token, per axis: (B,) or (axes, B)."""
    return positions.masked_fill(keep.to(positions.device) < 0, -1).amax(dim=-1) + 1


def _continue_positions(kwargs: dict[str, Any], session: Session) -> None:
    """A decode step at the language model: rows whose padding moved left continue from their
    own last token (transformers' bookkeeping counts their padding columns: it gives right
    padding wrong positions); every other row keeps the positions it was given."""
    embeds = kwargs.get("inputs_embeds")
    if embeds is None or session.next_position is None:
        return
    length = embeds.shape[1]
    ours = session.next_position[..., None] + torch.arange(length, device=embeds.device)
    session.next_position = session.next_position + length
    positions = kwargs.get("position_ids")
    if session.right_padded is None:
        return
    if positions is None or positions.shape != ours.shape:
        raise ValueError(
            f"decode-step position_ids of shape {_describe(positions)} where {tuple(ours.shape)} "
            f"was expected{_version_note()}"
        )
    rows = session.right_padded.to(positions.device)[:, None]
    kwargs["position_ids"] = torch.where(rows, ours.to(positions.device), positions)


def _shape_groups(
    frames: list[int], per_frame: list[int], device: torch.device
) -> list[tuple[Tensor, tuple[int, int]]]:
    """Rows whose videos have the same F x P, in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for row, shape in enumerate(zip(frames, per_frame, strict=True)):
        groups.setdefault(shape, []).append(row)
    return [(torch.tensor(rows, device=device), shape) for shape, rows in groups.items()]


def _first(value: Tensor | None, otherwise: Callable[[], Tensor]) -> Tensor:
    return value if value is not None else otherwise()


def _rows(x: Tensor, rows: Tensor) -> Tensor:
    """Rows of a (B or 1, ...) tensor that broadcasts over the batch."""
    return x if x.shape[0] == 1 else x[rows.to(x.device)]


def placeholder_runs(ids: Tensor, token: int) -> tuple[Tensor, list[int]]:
    """(first column, count) of each row's one contiguous run of ``token``: (B,), [count_b]."""
    hits = ids == token
    counts = hits.sum(dim=1)
    if int(counts.min()) == 0:
        raise ValueError(
            "pixel_values_videos given but a prompt row holds no video placeholder tokens: "
            "exactly one video per prompt row is supported"
        )
    starts = hits.int().argmax(dim=1)
    columns = torch.arange(ids.shape[1], device=ids.device)
    run = (columns >= starts[:, None]) & (columns < (starts + counts)[:, None])
    if not torch.equal(run, hits):
        raise ValueError(
            "every prompt row must hold its video as one contiguous run of video placeholders; "
            "a row holds several runs (one video per prompt row is supported)"
        )
    return starts, counts.tolist()


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else f"a {type(value).__name__}"


#: the transformers releases the adapters are tested with (README, CI)
TESTED_TRANSFORMERS = ("5.17.0", "5.24.0")


def _version_note() -> str:
    import transformers

    low, high = TESTED_TRANSFORMERS
    return (
        f" (transformers {transformers.__version__}; ustc's adapters are tested with "
        f"{low} to {high}: a form this release passes that ustc does not know, please report it)"
    )


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
