"""Compress once, ask many: several questions about one video without paying the pipeline again.

    session = ustc.prepare(model, video_inputs, config)      # vision, compression, prefix < K
    out = session.ask(question_ids, max_new_tokens=32)       # = generate() on prefix + question
    out = session.ask(other_ids, do_sample=True, top_p=0.9)  # every generate() option
    out = session.ask_batch([q1, q2, q3], max_new_tokens=32)  # one generate(), left-padded rows

``video_inputs`` are a processor's outputs for the prompt up to and including the video (one
row: ``input_ids`` (1, n_p), ``pixel_values_videos``, and the backbone's grid / token types); a
question is the tokens that follow it (its text, the chat template's end of turn and the
assistant header).  ``session.ask(q)`` returns what ``model.generate(**session.prompt(q))`` returns
on the attached model: the sequences start with the whole prompt.

What is shared, and why exactly this (B = 1, n' prompt tokens entering the LLM, K merge layer):

* the vision encoding and the Eq. (1) scores: they read the frames only;
* the compression before the LLM (Eq. 1-4): the retention pool and recycling read the visual
  tokens and their scores, never the text;
* layers 0..K-1 of the prefix: attention is causal, so a prefix token's keys, values and hidden
  states below K never see the question.  The session keeps the KV cache of layers < K for the
  prefix and the prefix's hidden states entering layer K.

What is not shared: the question's tokens through layers 0..K-1 (they attend to the cached
prefix), and everything from layer K on.  The text-aware merge at K (Eq. 5-10) reads the
question's hidden states and its attention to the visual tokens at K, so which visual tokens
survive K depends on the question; layers >= K therefore run, per question, on the merged prefix
and the question together.  Without a merge (``merger="none"`` or K = the number of layers) every
layer of the prefix is shared.

So a question costs its own tokens below K plus the merged prompt above K, instead of the vision
tower, the compression and the whole prompt: per extra question about the compression and
K/L of the prefix's prefill are saved (L decoder layers); ``benchmarks/ask_many.py`` measures it.
Each question's tokens equal those of asking it alone (float32, eager and sdpa; tests in
``tests/test_session.py``): the prefix's keys are the same numbers, only the question rows'
attention below K runs as a q x (n_p' + q) masked product instead of inside the full causal one.

A batch of questions (``ask_batch``) runs in one ``generate()`` on the left-padded rows
[padding, prefix, question i] that ``session.prompts(questions)`` builds, and returns what
``generate()`` returns on them.  The prefix is the same video and text in every row, so it
enters the LLM with the same n_p' tokens everywhere: the prepared encoding, compression, KV of
layers < K and hidden states at K are repeated per row, not recomputed.  Only the
padding's place differs from a plain padded batch: inside the LLM each row is reordered to
[prefix', padding, question i], so that the cached prefix sits in the same columns of every row;
the padding slots between prefix and question are masked below K and dropped at the merge, which
packs rows as it packs any padded batch.  Each row's tokens equal its question asked alone and
the padded batch's (tests in ``tests/test_session.py``).  ``ask_many`` asks one at a time.

Models with recurrent (linear-attention) layers, e.g. Qwen3.5, are refused at ``prepare``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from ustc.compressor import CompressionResult
from ustc.config import CompressionConfig
from ustc.models import attach
from ustc.models.base import Handle, Session, VideoCall
from ustc.models.compat import cache_argument
from ustc.models.masks import rebuilt_layer_mask
from ustc.models.sequence import gather_columns, take_columns

#: per-token arguments of a prompt, extended by a question: name -> the question's value
_PER_TOKEN = {"attention_mask": 1, "mm_token_type_ids": 0}


class _PrefixReady(Exception):
    """Stops the prefix's forward at layer K: what is above K depends on the question."""


@dataclass
class _Prefix:
    """What one prepared video keeps (B = 1, n_p' prefix tokens entering the LLM)."""

    keep: Tensor  # (1, n_p') columns of the prefix that entered the LLM
    kv: list[tuple[Tensor, Tensor]]  # layers < K: (1, H, n_p', d) keys and values
    hidden: Tensor | None = None  # (1, n_p', D) the prefix entering layer K
    position_embeddings: tuple[Tensor, ...] | None = None  # (cos, sin) (1, n_p', d) at layer K
    position_ids: Tensor | None = None  # the prefix's position ids at layer K


class VideoSession:
    """One video prepared on an attached model; ``ask`` runs a question from the shared state.

    Built by :func:`prepare`.  ``close()`` drops the state (and detaches the compressor when
    ``prepare`` attached it).
    """

    def __init__(self, handle: Handle, inputs: dict[str, Any], owns_handle: bool) -> None:
        self.handle = handle
        self.model = handle.model
        self.config = handle.config
        self.inputs = inputs
        self.owns_handle = owns_handle
        self.preparing = False
        self.asking = False
        self.prefix: _Prefix | None = None
        self._encoding: tuple[Any, VideoCall] | None = None
        self._compressions: list[tuple[tuple[int, ...], CompressionResult]] = []
        self._cache: Any = None  # the cache of the preparing forward
        #: layers whose prefix KV is shared: K with a merge, all of them without
        self.shared_layers = (
            handle.config.layer if handle.merge_active else len(handle.decoder_layers())
        )

    # ------------------------------------------------------------------------ public
    @property
    def prefix_length(self) -> int:
        """n_p: tokens of the prepared prompt (before compression)."""
        return int(self.inputs["input_ids"].shape[1])

    def prompt(self, question_ids: Tensor) -> dict[str, Any]:
        """The keyword arguments of ``generate()`` for the prefix followed by the question: what
        asking it alone means."""
        question = _as_row(question_ids, self.inputs["input_ids"])
        kwargs = dict(self.inputs)
        kwargs["input_ids"] = torch.cat([self.inputs["input_ids"], question], dim=1)
        for name, value in _PER_TOKEN.items():
            if name in self.inputs:
                prefix = self.inputs[name]
                kwargs[name] = torch.cat([prefix, torch.full_like(question, value)], dim=1)
        return kwargs

    def prompts(self, questions: list[Tensor], pad_token_id: int | None = None) -> dict[str, Any]:
        """The keyword arguments of ``generate()`` for a left-padded batch, row i = [padding,
        prefix, question i] (B = len(questions) rows of n_p + max q_i tokens): what a
        transformers user passes for these prompts (a tokenizer with ``padding_side="left"``).

        ``input_ids`` are padded with ``pad_token_id`` (default: the model's generation
        config's, else its first end-of-sequence id), ``attention_mask`` with 0 and
        ``mm_token_type_ids`` with 0; every other tensor of the prepared inputs belongs to the
        video (``pixel_values_videos``, ``video_grid_thw``) and is repeated for each row (dim 0),
        one video per row as a batch of prompts takes it.
        """
        if isinstance(questions, Tensor) or not isinstance(questions, (list, tuple)):
            raise ValueError(
                "questions must be a list of token-id tensors, one (q,) or (1, q) per question, "
                f"got {type(questions).__name__}"
            )
        if not questions:
            raise ValueError("questions is empty: give at least one question to ask")
        ids = self.inputs["input_ids"]
        rows = [_as_row(q, ids) for q in questions]
        pad = self._pad_token(pad_token_id)
        width = max(r.shape[1] for r in rows)
        b = len(rows)

        def padded(prefix: Tensor, fill: int, value: int | None) -> Tensor:
            """(B, n_p + width): [fill * (width - q_i), prefix, question i (or value)]."""
            out = torch.full(
                (b, prefix.shape[1] + width), fill, dtype=prefix.dtype, device=prefix.device
            )
            for i, row in enumerate(rows):
                q = row.shape[1]
                out[i, width - q : width - q + prefix.shape[1]] = prefix[0]
                out[i, out.shape[1] - q :] = row[0] if value is None else value
            return out

        kwargs: dict[str, Any] = {}
        for name, value in self.inputs.items():
            if name == "input_ids":
                kwargs[name] = padded(value, pad, None)
            elif name in _PER_TOKEN:
                kwargs[name] = padded(value, 0, _PER_TOKEN[name])
            else:  # the video's: one copy per row
                kwargs[name] = _repeat_videos(value, b)
        if "attention_mask" not in kwargs:
            kwargs["attention_mask"] = padded(torch.ones_like(ids), 0, 1)
        return kwargs

    def ask(self, question_ids: Tensor, **generate_kwargs: Any) -> Any:
        """``model.generate()`` on the prefix followed by ``question_ids`` ((q,) or (1, q)),
        reusing the prepared vision encoding, compression and prefix below K.

        Every ``generate()`` option is accepted (greedy, sampling, ``return_dict_in_generate``)
        except inputs that would change the prepared video or prefix.
        """
        self._check_usable()
        return self._generate(self.prompt(question_ids), generate_kwargs)

    def ask_batch(self, questions: list[Tensor], **generate_kwargs: Any) -> Any:
        """Several questions in one ``generate()`` call: returns what
        ``model.generate(**session.prompts(questions), **generate_kwargs)`` returns on the
        attached model (sequences (B, n_p + max q_i + new tokens), row i's answer after the
        padded prompt), reusing the prepared vision encoding, compression and prefix below K
        for every row.

        questions: token ids, one (q_i,) or (1, q_i) tensor per question, of any lengths.
        ``pad_token_id`` (a ``generate()`` option) also pads the prompts; see ``prompts``.
        """
        self._check_usable()
        kwargs = self.prompts(questions, generate_kwargs.get("pad_token_id"))
        return self._generate(kwargs, generate_kwargs)

    def ask_many(self, questions: list[Tensor], **generate_kwargs: Any) -> list[Any]:
        """``ask`` each question in turn (one ``generate()`` each; ``ask_batch`` asks them in
        one call)."""
        return [self.ask(q, **generate_kwargs) for q in questions]

    def _generate(self, kwargs: dict[str, Any], generate_kwargs: dict[str, Any]) -> Any:
        """``model.generate(**kwargs, **generate_kwargs)`` with the hooks told to reuse the
        prepared state; refuses, before generating, what would change the prepared video."""
        prompt = {*self.inputs, "attention_mask", "inputs_embeds", "mm_encoder_outputs"}
        given = sorted(set(generate_kwargs) & prompt)
        if given:
            raise ValueError(
                f"ask() takes the question only; {', '.join(given)} belong to the prepared "
                "video: prepare a new session for another video or prompt"
            )
        if generate_kwargs.get("use_cache") is False:
            raise ValueError("ask() reuses the prefix's KV cache: use_cache=False is not supported")
        self._check_context(kwargs["input_ids"].shape[1], generate_kwargs)
        self.asking = True
        self.handle.resume = self
        try:
            with torch.no_grad():
                return self.model.generate(**kwargs, **generate_kwargs)
        finally:
            self.handle.resume = None
            self.asking = False

    def close(self) -> None:
        """Drop the prepared state; detach the compressor if ``prepare`` attached it."""
        self.prefix = None
        self._encoding = None
        self._compressions = []
        if self.owns_handle:
            self.handle.remove()

    def nbytes(self) -> int:
        """Bytes of tensors the session holds (prefix KV, hidden states, video features)."""
        tensors: list[Tensor] = [v for v in self.inputs.values() if isinstance(v, Tensor)]
        if self.prefix is not None:
            tensors += [t for kv in self.prefix.kv for t in kv]
            if self.prefix.hidden is not None:
                tensors.append(self.prefix.hidden)
        if self._encoding is not None:
            tensors += _tensors(self._encoding[0])
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ preparation
    def _prepare(self) -> None:
        """Run the prefix through ``generate()`` (the same argument forms as ``ask``: positions,
        cache keyword, encoder route) and stop it at layer K; without a merge, one greedy token
        is generated and every layer's cache is kept."""
        handle = self.handle
        # the prefix alone is no prompt: stats and last keep describing the last full prefill,
        # only the time spent scoring and compressing is added
        stats, last = replace(handle.stats), handle.last
        self.preparing = True
        handle.resume = self
        try:
            with torch.no_grad():
                self.model.generate(**self.inputs, max_new_tokens=1, do_sample=False)
        except _PrefixReady:
            pass
        finally:
            handle.resume = None
            self.preparing = False
            stats.score_seconds = handle.stats.score_seconds
            stats.compress_seconds = handle.stats.compress_seconds
            handle.stats, handle.last = stats, last
        prefix = self.prefix
        if prefix is None or self._encoding is None or self._cache is None:
            raise RuntimeError(
                "the prepared forward did not reach the language model with the video: the "
                "inputs hold no video the attached compressor saw"
            )
        if self.handle.merge_active and prefix.hidden is None:
            raise RuntimeError(
                f"the prepared forward never reached decoder layer {self.config.layer}"
            )
        length = prefix.keep.shape[1]
        prefix.kv = [
            (layer.keys[..., :length, :], layer.values[..., :length, :])
            for layer in self._cache.layers[: self.shared_layers]
        ]
        self._cache = None

    # ---------------------------------------------------- called by the Handle's hooks
    def keep_encoding(self, output: Any, video: VideoCall) -> None:
        """``get_video_features`` ran while preparing: keep its output and scores."""
        if self.preparing:
            self._encoding = (output, video)

    def encoded_video(
        self, handle: Handle, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, VideoCall]:
        """Asking: the prepared encoding, once per prompt row, after checking the call is for
        the prepared video (once per row: a batch of questions, or ``num_return_sequences``)."""
        assert self._encoding is not None
        pixels = args[0] if args else kwargs.get(handle.video_argument, kwargs.get("pixel_values"))
        copies = _copies(pixels, self.inputs[handle.video_argument])
        if copies is None:
            raise ValueError(
                "the video given to a prepared session differs from the one it prepared: "
                "prepare a new session for another video"
            )
        output, video = self._encoding
        return _repeated_encoding(output, copies), replace(
            video,
            batch=video.batch * copies,
            grid=None if video.grid is None else video.grid.repeat(copies, 1),
            scores=None if video.scores is None else video.scores.repeat(copies),
        )

    def compress(
        self, handle: Handle, group: int, features: Tensor, scores: Tensor | None
    ) -> CompressionResult:
        """The external compression (Eq. 1-4): computed while preparing, reused when asking
        (the same for every row: each row's video is the prepared one)."""
        if self.preparing:
            result = handle.compressor.compress(features, scores)
            self._compressions.append((tuple(features.shape), result))
            return result
        shape, result = self._compressions[group]
        if tuple(features.shape[1:]) != shape[1:]:
            raise RuntimeError(
                f"the asked prompt's video features have shape {tuple(features.shape)}, the "
                f"prepared ones {shape}"
            )
        rows = features.shape[0]
        return replace(
            result, **{f.name: _repeated(getattr(result, f.name), rows) for f in fields(result)}
        )

    def enter_language_model(
        self, handle: Handle, kwargs: dict[str, Any], session: Session
    ) -> None:
        """Preparing: remember the prefix's kept columns.  Asking: the language model runs the
        questions' tokens only, on a cache whose layers < K hold the prefix.

        A left-padded batch enters compressed as [padding, prefix', question i] (B, n'); the
        cache of layers < K holds the prefix in the first n_p' columns of every row, so each
        row is reordered to [prefix', padding, question i]: the new tokens below K are then a
        left-padded batch of questions, and the padding slots, now between the prefix and the
        question, stay masked (False in ``session.valid``; -1 in ``session.keep`` where the
        compression dropped them, the padding's own columns where nothing was removed).
        """
        if self.preparing:
            if session.keep.shape[0] != 1:
                raise ValueError("a session prepares one prompt row")
            self.prefix = _Prefix(keep=session.keep.clone(), kv=[])
            self._cache = cache_argument(kwargs)
            return
        assert self.prefix is not None
        n_p = self.prefix.keep.shape[1]
        keep, valid = session.keep, session.valid
        b, width = keep.shape
        # padding slots in front of each row: -1 columns of a compressed prompt, the padding
        # itself where nothing was removed before the LLM (FastV)
        lead = (~valid).sum(dim=1)
        slots = torch.arange(width, device=keep.device)
        order = torch.where(
            slots < n_p,
            slots + lead[:, None],
            torch.where(slots < n_p + lead[:, None], slots - n_p, slots),
        )
        prefix = keep.gather(1, order[:, :n_p])
        shift = prefix[:, :1] - self.prefix.keep[:, :1]  # where each row's prefix starts
        layout = (slots < n_p) | (slots >= n_p + lead[:, None])  # real: prefix', question i
        if not torch.equal(prefix - shift, self.prefix.keep.expand(b, -1)) or not torch.equal(
            valid.gather(1, order), layout
        ):
            raise RuntimeError("the asked prompt does not start with the prepared prefix")
        cache = cache_argument(kwargs)
        if cache is None:
            raise ValueError("ask() reuses the prefix's KV cache: the model was called without one")
        if bool(lead.any()):
            session.keep = keep.gather(1, order)
            session.valid = layout
            session.visual_columns = torch.where(
                session.visual_columns >= 0, session.visual_columns - lead[:, None], -1
            )
            session.text_starts = session.text_starts - lead
            if handle.last is not None and handle.last.input_positions is keep:
                handle.last.input_positions = session.keep
            kwargs["inputs_embeds"] = take_columns(kwargs["inputs_embeds"], order)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = gather_columns(kwargs["position_ids"], order, b)
            mask = kwargs.get("attention_mask")
            if isinstance(mask, Tensor) and mask.dim() == 2:
                kwargs["attention_mask"] = mask.gather(1, order.to(mask.device))
        for index, (keys, values) in enumerate(self.prefix.kv):
            cache.update(
                keys.expand(b, *keys.shape[1:]), values.expand(b, *values.shape[1:]), index
            )
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"][:, n_p:]
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"][..., n_p:]

    def at_layer(
        self,
        handle: Handle,
        index: int,
        hidden: Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[Tensor, tuple[Any, ...], dict[str, Any]]:
        """A decoder layer >= K in a prefill.  Preparing: keep the prefix entering layer K, then
        stop.  Asking: put the prefix back in front of the question (hidden states at K, the
        position embeddings and ids, a causal mask over the whole sequence)."""
        prefix = self.prefix
        assert prefix is not None
        if self.preparing:
            if index == self.config.layer:
                prefix.hidden = hidden.detach()
                prefix.position_embeddings = tuple(kwargs["position_embeddings"])
                prefix.position_ids = kwargs.get("position_ids")
                raise _PrefixReady
            return hidden, args, kwargs
        assert prefix.hidden is not None and prefix.position_embeddings is not None
        session = handle._fwd.session
        assert session is not None
        b, width = session.keep.shape
        if index == self.config.layer:
            shared = prefix.hidden.to(hidden.dtype).expand(b, *prefix.hidden.shape[1:])
            hidden = torch.cat([shared, hidden], dim=1)
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden

        def before(prefix_part: Tensor, part: Tensor, dim: int) -> Tensor:
            """The prefix's (.., 1, n_p', ..) part, one per row, in front of ``part``'s."""
            shape = list(part.shape)
            shape[dim] = prefix_part.shape[dim]
            return torch.cat([prefix_part.to(part.dtype).expand(*shape), part], dim=dim)

        kwargs["position_embeddings"] = handle._sliced(
            kwargs["position_embeddings"],
            lambda pe: tuple(
                before(p, x, x.dim() - 2)
                for p, x in zip(prefix.position_embeddings, pe, strict=True)
            ),
        )
        if kwargs.get("position_ids") is not None and prefix.position_ids is not None:
            kwargs["position_ids"] = handle._sliced(
                kwargs["position_ids"], lambda pos: before(prefix.position_ids, pos, pos.dim() - 1)
            )
        mask = kwargs.get("attention_mask")
        kwargs["attention_mask"] = handle._sliced(
            mask if mask is not None else self,
            lambda _: rebuilt_layer_mask(
                handle,
                index,
                hidden.new_zeros(1, width, 1).expand(b, width, hidden.shape[-1]),
                session.valid,  # the padding slots between the prefix and each question
                {},
            ),
        )
        return hidden, args, kwargs

    def skips_layer(self, index: int) -> bool:
        """Asking: layers < K run the question only (DeepStack's visual positions are all in
        the prefix, whose states below K are cached)."""
        return self.asking and index < self.shared_layers

    # ---------------------------------------------------------------------- checks
    def _check_usable(self) -> None:
        handle = self.handle
        if self.prefix is None:
            raise ValueError("this prepared session was closed; prepare the video again")
        if getattr(self.model, "_ustc_handle", None) is not handle or not handle.attached:
            raise ValueError(
                "the compressor this session was prepared with is no longer attached to the "
                "model; prepare the video again with the attached one"
            )
        if handle.config != self.config:
            raise ValueError(
                f"the attached compressor's config changed since prepare ({self.config!r} -> "
                f"{handle.config!r}); prepare the video again"
            )

    def _pad_token(self, given: int | None) -> int:
        """The id that pads a batch of questions: ``given``, the generation config's
        ``pad_token_id``, else its first ``eos_token_id`` (what ``generate()`` pads with); never
        a video or image placeholder, which the model counts."""
        config = self.model.generation_config
        pad = given
        if pad is None:
            pad = config.pad_token_id
        if pad is None:
            eos = config.eos_token_id
            pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        if isinstance(pad, Tensor) and pad.numel() == 1:
            pad = int(pad)
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(
                f"a batch of questions is padded with pad_token_id, got {pad!r}: pass "
                "pad_token_id=<the tokenizer's pad id> (the model's generation config has none)"
            )
        placeholders = {
            name: getattr(self.model.config, name, None)
            for name in (
                "video_token_id",
                "image_token_id",
                "video_token_index",
                "image_token_index",
            )
        }
        clash = [name for name, value in placeholders.items() if value == pad]
        if clash:
            raise ValueError(
                f"pad_token_id={pad} is the model's {clash[0]}: padding would read as video "
                "placeholders; pass pad_token_id=<the tokenizer's pad id>"
            )
        return pad

    def _check_context(self, length: int, generate_kwargs: dict[str, Any]) -> None:
        config = self.handle.language_model().config
        limit = getattr(config, "max_position_embeddings", None)
        new = generate_kwargs.get("max_new_tokens") or self.model.generation_config.max_new_tokens
        if limit is None or new is None:
            return
        question = length - self.prefix_length
        if length + int(new) > int(limit):
            raise ValueError(
                f"the (longest) question ({question} tokens) and max_new_tokens={new} do not fit the "
                f"context left after the prepared prefix: {int(limit)} positions - "
                f"{self.prefix_length} prefix tokens = {int(limit) - self.prefix_length}; ask "
                "a shorter question or fewer new tokens"
            )


def prepare(
    model: nn.Module, video_inputs: dict[str, Any], config: CompressionConfig | None = None
) -> VideoSession:
    """Encode, compress and run the prefix of one video prompt through layers < K, once.

    model:        a supported Video-LLM; the attached compressor is used (``config``, if given,
                  must equal its config), or ``config`` (default ``CompressionConfig()``) is
                  attached for the session's lifetime (``close()`` detaches it).
    video_inputs: the processor's outputs for the prompt up to and including the video, one row:
                  ``input_ids`` (1, n_p) and the video (``pixel_values_videos``, grids, token
                  types); no padding.
    Returns a :class:`VideoSession`; ``session.ask(question_ids, **generate_kwargs)``.
    """
    handle = getattr(model, "_ustc_handle", None)
    owns = handle is None
    if handle is not None and config is not None and handle.config != config:
        raise ValueError(
            f"the model's attached compressor has {handle.config!r}, prepare() was given "
            f"{config!r}: remove it first, or pass no config"
        )
    inputs = dict(video_inputs)
    ids = inputs.get("input_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(
            "video_inputs must hold input_ids of shape (1, n): one prompt, up to the video, got "
            f"{getattr(ids, 'shape', type(ids).__name__)}"
        )
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("video_inputs must not be padded (attention_mask holds zeros)")
    if handle is None:
        handle = attach(model, config if config is not None else CompressionConfig())
    try:
        if handle._recurrent:
            raise ValueError(
                f"prepare() is not supported on {type(model).__name__}: its layers "
                f"{sorted(handle._recurrent)} keep a recurrent state (linear attention), not a "
                "per-token KV cache that a question can continue"
            )
        if inputs.get(handle.video_argument) is None:
            raise ValueError(f"video_inputs must hold the video ({handle.video_argument})")
        session = VideoSession(handle, inputs, owns)
        session._prepare()
    except Exception:
        if owns:
            handle.remove()
        raise
    return session


def _as_row(question: Tensor, like: Tensor) -> Tensor:
    if not isinstance(question, Tensor) or question.dim() not in (1, 2):
        raise ValueError(
            "a question is a tensor of token ids, (q,) or (1, q), got "
            f"{getattr(question, 'shape', type(question).__name__)}"
        )
    question = question.reshape(1, -1) if question.dim() == 1 else question
    if question.shape[0] != 1 or question.shape[1] == 0:
        raise ValueError(
            f"a question is one non-empty row of token ids, got shape {tuple(question.shape)}; "
            "use ask_many for several questions"
        )
    return question.to(device=like.device, dtype=like.dtype)


def _copies(pixels: Any, ours: Tensor) -> int | None:
    """How many copies of the prepared video ``ours`` the pixels of a call are (one per prompt
    row, concatenated along dim 0), or None if they are anything else."""
    if pixels is ours:
        return 1
    if (
        not isinstance(pixels, Tensor)
        or pixels.dim() != ours.dim()
        or pixels.shape[1:] != ours.shape[1:]
        or ours.shape[0] == 0
        or pixels.shape[0] == 0
        or pixels.shape[0] % ours.shape[0]
    ):
        return None
    copies = pixels.shape[0] // ours.shape[0]
    same = pixels.reshape(copies, *ours.shape) == ours.to(pixels.device)
    return copies if bool(same.all()) else None


def _repeated(x: Tensor, copies: int) -> Tensor:
    """``copies`` copies of ``x`` one after the other along dim 0."""
    return x.repeat(copies, *[1] * (x.dim() - 1))


def _repeat_videos(value: Any, copies: int) -> Any:
    """One video's encoder output repeated for ``copies`` videos, as a batch of them encodes:
    a tensor along dim 0 (LLaVA-OV's (1, L, D); a flat (L, D) of one video), a tuple or list of
    per-video tensors (Qwen's split outputs) as that many more entries."""
    if isinstance(value, Tensor):
        return _repeated(value, copies)
    if isinstance(value, (list, tuple)):
        return type(value)(list(value) * copies)
    return value


def _repeated_encoding(output: Any, copies: int) -> Any:
    """A new ``get_video_features`` output for ``copies`` copies of the prepared video (always a
    new object: generate(num_return_sequences=...) expands the encoding it is given in place,
    which must not reach the prepared one)."""
    if isinstance(output, Tensor):
        return _repeat_videos(output, copies)
    if not hasattr(output, "pooler_output"):
        raise ValueError(
            f"cannot repeat a prepared video encoding of type {type(output).__name__} for a "
            "batch of questions; ask them one at a time (ask_many)"
        )
    fields = dict(output.items())
    fields["pooler_output"] = _repeat_videos(output.pooler_output, copies)
    stack = fields.get("deepstack_features")
    if isinstance(stack, (list, tuple)):  # Qwen3-VL: one entry per DeepStack level
        fields["deepstack_features"] = [_repeat_videos(level, copies) for level in stack]
    return type(output)(**fields)


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if hasattr(value, "values") and callable(value.values):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class SessionCache:
    """Prepared videos kept for the next questions: at most ``size`` sessions, least recently
    used evicted first (logged), keyed by the video's identity and the compression config.

    ``ask(inputs, settings)`` splits one prompt (1, n) after its video, prepares the prefix or
    reuses it, and asks the rest.  ``size=0`` turns reuse off (every call prepares afresh and
    keeps nothing).
    """

    def __init__(self, size: int, log: Any = None) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"session cache size must be an integer >= 0, got {size!r}")
        self.size = size
        self.log = log
        self.sessions: dict[tuple[str, str], VideoSession] = {}
        self.hits = 0
        self.misses = 0

    def ask(
        self, model: nn.Module, handle: Handle, inputs: dict[str, Any], **generate_kwargs: Any
    ) -> Any:
        """``model.generate(**inputs, **generate_kwargs)`` through a prepared session of the
        prompt's video (one row, no padding)."""
        prefix, question = split_after_video(handle, inputs)
        key = (repr(handle.config), video_key(prefix))
        session = self.sessions.pop(key, None)
        if session is not None and session.handle is not handle:
            session = None  # prepared under another compressor
        if session is None:
            self.misses += 1
            session = prepare(model, prefix, handle.config)
        else:
            self.hits += 1
        if self.size:
            self.sessions[key] = session  # most recently used last
            while len(self.sessions) > self.size:
                old_key, old = next(iter(self.sessions.items()))
                del self.sessions[old_key]
                freed = old.nbytes()
                old.close()
                if self.log is not None:
                    self.log(
                        f"ustc session cache: evicted the prepared video {old_key[1][:12]} "
                        f"({freed / 2**20:.1f} MiB freed; at most {self.size} kept)"
                    )
        try:
            return session.ask(question, **generate_kwargs)
        finally:
            if not self.size:
                session.close()

    def clear(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()


def split_after_video(handle: Handle, inputs: dict[str, Any]) -> tuple[dict[str, Any], Tensor]:
    """(prefix inputs, question ids): one prompt (1, n) cut after its video (and the token that
    closes it: LLaVA-OV's newline, Qwen's <|vision_end|>)."""
    ids = inputs["input_ids"]
    layout = handle.video_layout(inputs, None)
    cut = int(layout.grid_columns().amax()) + 1 + layout.trailing
    if cut >= ids.shape[1]:
        raise ValueError("the prompt ends with its video: there is no question to ask")
    prefix = {
        k: v[:, :cut] if isinstance(v, Tensor) and v.dim() == 2 and v.shape == ids.shape else v
        for k, v in inputs.items()
    }
    return prefix, ids[:, cut:]


def video_key(prefix: dict[str, Any]) -> str:
    """A digest of the prefix's tensors (the video's pixels, grid, the tokens before it)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(prefix):
        value = prefix[name]
        if isinstance(value, Tensor):
            data = value.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()
