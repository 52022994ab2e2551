"""Shared machinery of the model adapters: the ``Handle``, the hooks, the in-LLM merge at layer K.

What every decoder-only Video-LLM shares lives here and in three helper modules
(``ustc.models.sequence``: kept columns, padding slots, masks and positions;
``ustc.models.attention``: Eq. (1) and Eq. (5) recomputed from a layer's projections;
``ustc.models.compat``: what differs between transformers releases).  What a backbone declares
is a ``Handle`` subclass in a file of its own (see ``docs/adding-a-backbone.md``): where its video
features and their grid come from (``video_call``, ``video_layout``), which vision layer gives
the Eq. (1) scores and how they align with the LLM tokens (``vision_hooks``), its positions
(``decode_positions``) and, where it has them, extra per-token streams (``stream_hooks``,
``compress_streams``, ``merge_streams``); a video laid out in several runs of placeholders gives
their columns (``VideoLayout.columns``).

How a compressed ``generate()`` flows through an attached model (every hook is on the instance,
removable, and nothing in transformers is patched):

1. ``model.model`` forward pre-hook (prefill with a video): checks the inputs (one video per
   row, a 2-D padding mask, no images) before anything runs.
2. ``get_video_features``, wrapped on the instance (``generate()`` of transformers >= 5.2x calls
   it before the first forward, older versions inside it): while it runs, a pre-hook on one
   vision-encoder attention recomputes q and k from the layer's input and reduces them, frame by
   frame, to one Eq. (1) score per token, aligned with the tokens the projector/pooling produce.
   No attention map outlives the hook.
3. ``language_model`` forward pre-hook: the model has placed the video features in
   ``inputs_embeds``; they are compressed to ``config.budget(F, P)`` tokens, and
   ``inputs_embeds``, ``attention_mask`` and ``position_ids`` are cut to the kept columns, so the
   kept tokens keep their original (RoPE / M-RoPE) positions.  Rows of a padded batch are cut
   independently and left-padded to the longest (``ustc.models.sequence.packed_columns``).
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
from ustc.models.attention import plain_queries, text_to_visual_attention
from ustc.models.compat import (
    CACHE_NAMES,
    cache_argument,
    cache_length,
    check_cache,
    describe,
    version_note,
)
from ustc.models.masks import check_attention, is_block_mask, rebuilt_layer_mask
from ustc.models.sequence import (
    batch_rows,
    column_mask,
    default_positions,
    first_given,
    gather_columns,
    marked_columns,
    next_position_after,
    packed_columns,
    padding_mask,
    rebuilt_mask,
    shape_groups,
    slice_mask,
    take_columns,
)

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
                      compressed nor text for the merger (a newline embedding after the
                      grid, or a vision-end token).
    columns:          (B, max F*P) column of each visual token in feature order, -1 past a
                      row's F*P, for a video laid out in several runs (one run per frame,
                      with timestamps or frame labels between); None: one run of F*P columns from
                      ``starts``.  Tokens between the runs stay, and are not text for the merger.
    """

    starts: Tensor
    frames: list[int]
    tokens_per_frame: list[int]
    trailing: int
    columns: Tensor | None = None

    @property
    def sizes(self) -> list[int]:
        """F*P of each row."""
        return [f * p for f, p in zip(self.frames, self.tokens_per_frame, strict=True)]

    def grid_columns(self) -> Tensor:
        """(B, max F*P) column of each visual token of each row, -1 past the row's F*P."""
        if self.columns is not None:
            return self.columns
        sizes = torch.tensor(self.sizes, device=self.starts.device)
        offsets = torch.arange(int(sizes.max()), device=self.starts.device)
        return torch.where(offsets < sizes[:, None], self.starts[:, None] + offsets, -1)


@dataclass
class Session:
    """What the hooks must remember about one KV cache between prefill and decode steps.

    Columns are per row: ``keep`` and ``merge_keep`` hold -1 in padding slots.
    """

    keep: Tensor  # (B, n') original columns held by the cache layers < K
    prompt_length: int  # n
    seen: int  # tokens generate() has accounted for, at the original length
    #: (B, max M) columns of each row's visual tokens in the n' sequence, in order; -1 past M
    visual_columns: Tensor
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
    frames: F of (B, F, C, H, W) pixels, for backbones that take frames as such.
    grid:   (B, 3) ``video_grid_thw`` (t, h, w) of each video, for backbones that patchify a
            video into a flat sequence.
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
    mask: Tensor | None = None  # a decode step's 2-D padding mask over the cached columns
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
    #: how the video reaches the model: the base model's encoder method, the forward argument
    #: holding its pixels and the key of its output in ``mm_encoder_outputs`` (a backbone with no
    #: video path of its own takes the frames as images: ``get_image_features``)
    video_method = "get_video_features"
    video_argument = "pixel_values_videos"
    video_output = "video"
    #: (attention, x (B, q, D)) -> (B, q, H, d): how a decoder layer's attention makes its heads'
    #: queries, for the text-to-visual attention the merge at layer K reads (a gated attention
    #: projects queries and gates together)
    attention_queries = staticmethod(plain_queries)

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
        #: a prepared video being built or asked (``ustc.session``): shares the vision encoding,
        #: the compression and the prefix's layers < K between questions; None otherwise
        self.resume: Any = None
        self._recurrent = self.recurrent_layers()
        layers = self.decoder_layers()
        if self.compressor.has_merger and config.layer > len(layers):
            raise ValueError(
                f"layer K={config.layer} is past the last decoder layer: the language model has "
                f"{len(layers)} layers, so K must be in [0, {len(layers)}] (K = {len(layers)} "
                "turns the in-LLM merge off)"
            )
        self.merge_active = self.compressor.has_merger and config.layer < len(layers)
        check_attention(self)
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

    def recurrent_layers(self) -> frozenset[int]:
        """Decoder layers that keep a recurrent state instead of a KV cache (the linear-attention
        layers of a hybrid LLM): they take a 2-D (B, n) padding mask, or none, and no positions
        of cached keys.  Default: the layers the text config's ``layer_types`` calls
        ``linear_attention``."""
        text = self.model.config.get_text_config()
        kinds = getattr(text, "layer_types", None) or []
        return frozenset(i for i, kind in enumerate(kinds) if kind == "linear_attention")

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
        """Position ids of ``length`` new tokens when the caller passed none (manual decoding):
        (B, length) 1-D positions continuing each row's next position (M-RoPE adapters
        override this with the model's rope_deltas)."""
        steps = torch.arange(length, device=device)
        if session.next_position is None:
            return (session.seen + steps).expand(batch, length)
        return session.next_position.to(device)[:, None] + steps  # 1-D positions: (B,)

    def stream_hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Install what applies the extra per-token streams (DeepStack: visual features of
        several vision layers added after the first decoder layers); removed by ``remove()``.
        None by default."""
        return []

    def compress_streams(
        self,
        kwargs: dict[str, Any],
        session: Session,
        groups: list[Group],
        layout: VideoLayout,
        features: list[Tensor],
    ) -> None:
        """Cut the language model's extra per-token inputs (``kwargs``, e.g. DeepStack
        features) with the selection just made: ``groups`` hold each group's
        ``CompressionResult``, ``features`` each group's (G, F*P, D) visual tokens it was
        computed from, ``layout.grid_columns()`` their columns in the prompt,
        ``session.visual_columns`` where the kept ones now sit.  None by default."""

    def merge_streams(
        self, session: Session, results: list[MergeResult], visual: list[Tensor]
    ) -> None:
        """Layer K: cut the extra streams as the visual hidden states were merged (one
        ``MergeResult`` per group of ``session.groups``, computed from that group's (G, M, D)
        ``visual`` hidden states; ``session.merge_keep`` holds the columns left).  None by
        default."""

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
        self._hooks.extend(self.stream_hooks())
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
        name = self.video_method
        previous = base.__dict__.get(name, missing)
        original = getattr(base, name)

        @functools.wraps(original)
        def get_video_features(*args: Any, **kwargs: Any) -> Any:
            if self.resume is not None and self.resume.asking:  # the prepared encoding
                output, self._video = self.resume.encoded_video(self, args, kwargs)
                return output
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
            if self.resume is not None:
                self.resume.keep_encoding(output, video)
            return output

        setattr(base, name, get_video_features)

        def restore() -> None:
            if previous is missing:
                base.__dict__.pop(name, None)
            else:
                setattr(base, name, previous)

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
        if kwargs.get(self.video_argument) is not None:
            self._video = None  # encoded inside this forward
            self._start_prefill(kwargs, cache, session)
        elif encoded.get(self.video_output) is not None:
            self._start_prefill(kwargs, cache, session)
        elif session is not None:
            self._start_decode(kwargs, session)
        return args, kwargs

    def _after_model(self, module: nn.Module, args: Any, output: Any) -> None:
        self._fwd = _Forward()

    def _start_prefill(self, kwargs: dict[str, Any], cache: Any, session: Session | None) -> None:
        encoded = kwargs.get("mm_encoder_outputs") or {}
        if self.video_output != "image" and (
            kwargs.get("pixel_values") is not None or encoded.get("image") is not None
        ):
            raise ValueError(
                "images mixed with a video in one call are not supported by ustc: the compressor "
                "allocates one budget over the frames of a single video; pass the video alone"
            )
        if session is not None or (cache is not None and cache_length(cache, 0) > 0):
            raise ValueError(
                "a new video on top of a non-empty KV cache is not supported: start a new "
                "conversation (fresh cache) for each video"
            )
        if cache is not None:
            check_cache(cache)
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
                f"{tuple(ids.shape)}, got {describe(mask)}"
                f"{version_note()}"
            )
        if kwargs.get(self.video_argument) is not None:  # fail before the vision tower runs
            video = self.video_call((), kwargs)
            if video.batch != ids.shape[0]:
                raise ValueError(
                    f"{video.batch} videos for {ids.shape[0]} prompts: exactly one video per "
                    "prompt row is supported"
                )
            layout = self.video_layout(kwargs, video)
            if mask is not None:
                columns = layout.grid_columns().to(mask.device)
                valid = mask.bool().gather(1, columns.clamp(min=0))
                if not bool((valid | (columns < 0)).all()):
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
                    f"{describe(mask)}{version_note()}"
                )
            n = session.prompt_length
            kwargs["attention_mask"] = torch.cat(
                [take_columns(mask[:, :n], session.keep, fill=0), mask[:, n:]], dim=1
            )
            self._fwd.mask = kwargs["attention_mask"]
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = self.decode_positions(session, length, batch, device)
        session.seen += length
        self._fwd.decode = session
        if session.merge_keep is not None:
            self._fwd.phase = "decode"
            self._fwd.session = session

    # ------------------------------------------------------------------ vision scores
    def vision_scores(
        self, attention: nn.Module, hidden: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Tensor:
        """Eq. (1) from one call of the hooked vision attention module (its input ``hidden`` and
        call arguments): one score per LLM visual token, in the order of the model's features,
        (B*F, P).  Each adapter aligns the patch scores with its tokens through the model's own
        pooling (the step a backbone must get right)."""
        raise NotImplementedError

    def score_hook(self, attention: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """The pre-hook on a vision attention module that records ``vision_scores`` (timed)
        while the video is encoded."""
        return attention.register_forward_pre_hook(self._on_vision_attention, with_kwargs=True)

    def tower_hook(self, tower: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """The pre-hook on a vision tower that passes the arguments of each call made while the
        video is encoded to ``vision_tower_call`` (before the scored attention runs)."""
        return tower.register_forward_pre_hook(self._on_vision_tower, with_kwargs=True)

    def vision_tower_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """What ``vision_scores`` needs of the vision tower's call (its arguments), kept on the
        adapter: nothing by default; only adapters that install ``tower_hook`` are called."""

    def _on_vision_tower(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if self._capturing:
            self.vision_tower_call(args, kwargs)

    def _on_vision_attention(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if not self._capturing:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        t0 = clock(hidden)
        self._add_scores(self.vision_scores(module, hidden, args, kwargs))
        self.stats.score_seconds += clock(hidden) - t0

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
                f"mm_encoder_outputs, or encoded before attach); pass {self.video_argument}"
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
            check_cache(cache)
        b, n, _ = embeds.shape
        device = embeds.device
        columns = torch.arange(n, device=device)
        video_columns = layout.grid_columns().to(device)
        in_video = column_mask(video_columns, n)
        mask = kwargs.get("attention_mask")
        valid = (
            torch.ones(b, n, dtype=torch.bool, device=device)
            if mask is None
            else mask.to(device).bool()
        )
        if self.merge_active and not (self.resume is not None and self.resume.preparing):
            text = valid & (columns > (video_columns.amax(dim=1) + layout.trailing)[:, None])
            if not bool(text.any(dim=1).all()):
                raise ValueError(
                    "in-LLM merging needs text (the question) after the video placeholders; a "
                    "prompt ends with the video"
                )

        scores = self._take_scores(video, layout)
        t0 = clock(embeds)
        groups: list[Group] = []
        group_features: list[Tensor] = []
        visual_counts = list(layout.sizes)
        for rows, (f, p) in shape_groups(layout.frames, layout.tokens_per_frame, device):
            grid = video_columns[rows, : f * p]
            features = take_columns(embeds[rows], grid).reshape(len(rows), f, p, -1)
            group_scores = None if scores is None else torch.stack([scores[i] for i in rows])
            if self.resume is not None:
                result = self.resume.compress(self, len(groups), features, group_scores)
            else:
                result = self.compressor.compress(features, group_scores)
            groups.append(Group(rows, f, p, result))
            group_features.append(features.reshape(len(rows), f * p, -1))
            for row in rows.tolist():
                visual_counts[row] = groups[-1].compression.indices.shape[1]
        compressed = visual_counts != layout.sizes
        if not compressed:  # nothing removed: the prompt passes unchanged
            keep = columns.expand(b, n)
        else:
            kept = valid & ~in_video
            source = embeds.clone()
            for group in groups:
                grid = video_columns[group.rows, : group.frames * group.tokens_per_frame]
                chosen = grid.gather(1, group.compression.indices)
                kept[group.rows[:, None], chosen] = True
                source[group.rows[:, None], chosen] = group.compression.tokens.to(embeds.dtype)
            keep = packed_columns(kept)
            kwargs["inputs_embeds"] = take_columns(source, keep, fill=0)
            positions = kwargs.get("position_ids")
            if positions is None:
                positions = default_positions(mask, b, n, device)
            kwargs["position_ids"] = gather_columns(positions, keep.clamp(min=0), b)
            # gapped positions without a mask read as packed sequences to transformers
            kwargs["attention_mask"] = take_columns(
                valid.to(mask.dtype if mask is not None else torch.long), keep, fill=0
            )
        self.stats.compress_seconds += clock(embeds) - t0

        counts = torch.tensor(visual_counts, device=device)
        visual_columns = marked_columns(
            take_columns(in_video, keep, fill=False), max(visual_counts)
        ).masked_fill(torch.arange(max(visual_counts), device=device) >= counts[:, None], -1)
        session = Session(
            keep=keep,
            valid=take_columns(valid, keep, fill=False),
            groups=[g.rows for g in groups],
            prompt_length=n,
            seen=n,
            visual_columns=visual_columns,
            visual_counts=visual_counts,
            text_starts=visual_columns.gather(1, (counts - 1)[:, None])[:, 0] + 1 + layout.trailing,
            next_position=next_position_after(
                first_given(
                    kwargs.get("position_ids"), lambda: default_positions(mask, b, n, device)
                ),
                keep,
            ),
            # the sequence is packed (padding moved left) here or at layer K
            right_padded=(
                mask[:, -1] == 0 if (compressed or self.merge_active) and mask is not None else None
            ),
        )
        self.compress_streams(kwargs, session, groups, layout, group_features)
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
        if self.resume is not None:  # a prepared prefix: only what follows it runs below K
            self.resume.enter_language_model(self, kwargs, session)
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
                f"decoder layer {index} received no hidden_states tensor{version_note()}"
            )
        if phase == "prefill" and self.resume is not None:
            # preparing: stops the forward at layer K; asking: puts the prefix back in front
            hidden, args, kwargs = self.resume.at_layer(self, index, hidden, args, kwargs)
        mask = kwargs.get("attention_mask")
        # flex_attention's BlockMask cannot be cut: it is rebuilt for the kept columns
        rebuild = mask if is_block_mask(mask) else None
        if rebuild is not None:
            mask = None
        elif mask is not None and not isinstance(mask, Tensor):
            raise ValueError(
                f"decoder layer {index} received an attention mask of type "
                f"{type(mask).__name__}, which cannot be cut to the merged tokens{version_note()}"
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
                    f"{version_note()}"
                )
            kwargs["position_embeddings"] = self._sliced(
                kwargs["position_embeddings"],
                lambda pe: tuple(gather_columns(x, index_, b, dim=-2) for x in pe),
            )
            kwargs["position_ids"] = self._sliced(
                kwargs.get("position_ids"), lambda pos: gather_columns(pos, index_, b)
            )
            if rebuild is not None:
                kwargs["attention_mask"] = self._sliced(
                    rebuild, lambda _: rebuilt_layer_mask(self, index, hidden, keep >= 0, kwargs)
                )
            elif mask is not None:
                kwargs["attention_mask"] = self._sliced(mask, lambda m: slice_mask(m, keep, keep))
            elif session.merge_pads and index in self._recurrent:
                kwargs["attention_mask"] = self._sliced(session, lambda _: (keep >= 0).long())
            elif session.merge_pads:
                kwargs["attention_mask"] = self._sliced(keep, lambda k: padding_mask(k, k.shape[1]))
        else:  # decode: the cache of this layer holds the n'' prefill columns and what followed
            keep = session.merge_keep
            assert keep is not None
            if index in self._recurrent:  # one new token on a recurrent state: nothing to cut
                return args, kwargs
            n_in = session.keep.shape[1]
            full = n_in + session.seen - session.prompt_length
            if mask is not None and mask.shape[-1] != full:
                # the model built this mask over a cache that is already merged (a hybrid LLM
                # whose first attention layer is >= K): build it again over the merged columns
                later = torch.arange(n_in, full, device=keep.device).expand(keep.shape[0], -1)
                columns = torch.cat([keep, later], dim=1)
                kwargs["attention_mask"] = self._sliced(
                    mask, lambda m: rebuilt_mask(m, columns, session.valid, hidden.shape[1])
                )
                return args, kwargs
            width = mask.shape[-1] if mask is not None else full
            later = torch.arange(n_in, width, device=keep.device).expand(keep.shape[0], -1)
            columns = torch.cat([keep, later], dim=1)
            if rebuild is not None:
                valid = columns >= 0
                if self._fwd.mask is not None:
                    valid = valid & take_columns(self._fwd.mask, columns, fill=0).bool()
                kwargs["attention_mask"] = self._sliced(
                    rebuild, lambda _: rebuilt_layer_mask(self, index, hidden, valid, kwargs)
                )
            elif mask is not None:
                kwargs["attention_mask"] = self._sliced(
                    mask, lambda m: slice_mask(m, None, columns)
                )
            elif session.merge_pads:
                kwargs["attention_mask"] = self._sliced(
                    session, lambda _: padding_mask(columns, hidden.shape[1])
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

        Rows are merged in the groups they were compressed in (equal M); each row's text is its
        unpadded tokens after its video, right-aligned, with a mask over the columns another
        row's longer text needs.
        """
        t0 = clock(hidden)
        b, n_in, _ = hidden.shape
        device = hidden.device
        columns = torch.arange(n_in, device=device)
        text_starts, visual = session.text_starts, session.visual_columns
        kept = session.valid & ~column_mask(visual, n_in)
        source = hidden.clone()
        normed = None
        if self.compressor.merger_needs_attention:
            normed = getattr(layer, self.layer_norm)(hidden)
        results: list[MergeResult] = []
        visuals: list[Tensor] = []
        for rows in session.groups:
            m = session.visual_counts[int(rows[0])]
            visual_columns = visual[rows, :m]
            # each row's text: its unpadded columns after its video, right-aligned
            text_columns = packed_columns(
                session.valid[rows] & (columns >= text_starts[rows, None])
            )
            text_mask = text_columns >= 0
            attention = None
            if normed is not None:
                text_start = int(text_starts[rows].min())
                cos, sin = kwargs["position_embeddings"]
                attention = text_to_visual_attention(
                    getattr(layer, self.layer_attention),
                    normed[rows],
                    batch_rows(cos, rows),
                    batch_rows(sin, rows),
                    text_start,
                    visual_columns,
                    session.valid[rows],
                    queries=self.attention_queries,
                )
                attention = take_columns(attention, (text_columns - text_start).clamp(min=-1))
            visuals.append(take_columns(hidden[rows], visual_columns))
            result = self.compressor.merge(
                visuals[-1],
                take_columns(hidden[rows], text_columns),
                attention,
                text_mask=None if bool(text_mask.all()) else text_mask,
            )
            chosen = visual_columns.gather(1, result.indices)
            kept[rows[:, None], chosen] = True
            source[rows[:, None], chosen] = result.tokens.to(hidden.dtype)
            results.append(result)
        session.merge_keep = packed_columns(kept)
        session.merge_pads = bool((session.merge_keep < 0).any())
        self.merge_streams(session, results, visuals)
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
            f"decode-step position_ids of shape {describe(positions)} where {tuple(ours.shape)} "
            f"was expected{version_note()}"
        )
    rows = session.right_padded.to(positions.device)[:, None]
    kwargs["position_ids"] = torch.where(rows, ours.to(positions.device), positions)


def vision_layer_index(vision_layer: int, count: int) -> int:
    """``vision_layer`` (negative counts from the end) as an index into ``count`` vision layers;
    ValueError naming the allowed range otherwise."""
    if not -count <= vision_layer < count:
        raise ValueError(f"vision_layer must be in [{-count}, {count}), got {vision_layer}")
    return vision_layer % count


def clock(tensor: Tensor) -> float:
    """Wall time; waits for the GPU first so that the compression time is not a launch time."""
    if tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()
