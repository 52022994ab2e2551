"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``).

Video path of the model: as Qwen2.5-VL, frames are cut into patches in pairs of frames (temporal
patch 2, so one "frame" of features is a pair of input frames) and the merger joins each 2 x 2
group of patches into one token, but the vision tower has no window attention: every block
attends over one frame pair, in the order the processor gives the patches (each merger group
contiguous), so no permutation is undone.  Three differences matter to ustc:

* Timestamps in the prompt.  The processor writes each frame pair as ``<t seconds>
  <|vision_start|> P placeholders <|vision_end|>``: a video is F runs of placeholders with text
  between them.  ``video_layout`` gives the columns of all F*P placeholders
  (``VideoLayout.columns``); the timestamp and vision start/end tokens between frames stay,
  and are not text for the merger (the question after the video is).
* M-RoPE with one temporal position per frame run (``get_rope_index`` splits the grid per frame):
  positions are computed on the uncompressed prompt, and kept tokens keep theirs.
* DeepStack.  The vision tower also returns the features of ``deepstack_visual_indexes`` blocks
  (each through its own merger); the language model adds level l to its hidden states at the
  visual positions after decoder layer l (``_deepstack_process``).  The adapter gives the
  language model no DeepStack inputs and adds them itself, in post-hooks on the first decoder
  layers, with the model's own ``_deepstack_process``: each level is compressed with the
  selection and cluster means of the main visual tokens (``group_mean`` with the
  ``CompressionResult``'s assignment), and merged at layer K with the ``MergeResult``'s when
  K falls among those layers.

Qwen3.5 (``Qwen3_5Handle``) has the same video path without DeepStack in front of a hybrid LLM
(Gated DeltaNet layers with a recurrent state, and full-attention layers): the merge at layer K
must be at a full-attention layer.

Eq. (1) scores come from the last vision block: q and k are recomputed from its input with its
own rotary embedding, the attention each patch receives is reduced inside each frame pair, and
averaged over the 2 x 2 patches the merger joins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ustc.config import CompressionConfig
from ustc.merging import MergeResult
from ustc.models.base import Group, Session, VideoLayout, clock
from ustc.models.compat import describe, version_note
from ustc.models.qwen2_vl import Qwen2VLHandle
from ustc.models.sequence import column_mask, take_columns
from ustc.ops import group_mean


@dataclass
class DeepStack:
    """The DeepStack levels of one compressed prefill, as the next layers must add them.

    levels: per level, per group of rows, (G, M, D) features (after layer K: (G, M_K, D)).
    mask:   (B, n) bool, the visual positions of the sequence the next layers see.
    """

    session: Session
    levels: list[list[Tensor]]
    mask: Tensor


class Qwen3VLHandle(Qwen2VLHandle):
    """Adapter for ``Qwen3VLForConditionalGeneration`` and its MoE twin.

    vision_layer: index of the vision block whose attention gives Eq. (1); by default the last
    block, whose output the patch merger turns into the LLM's visual tokens.  Eq. (1), the grid,
    the positions are Qwen2-VL's (``Qwen2VLHandle``: no windows); what differs is the prompt (one
    placeholder run per frame pair, after its timestamp) and DeepStack.
    """

    video_in_runs = True
    placeholder_note = " (the processor writes one run of h*w/4 placeholders per frame pair)"

    def __init__(self, model: nn.Module, config: CompressionConfig, vision_layer: int = -1) -> None:
        self._stack: DeepStack | None = None
        super().__init__(model, config, vision_layer)

    # ----------------------------------------------------------------------- DeepStack
    def stream_hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        levels = len(getattr(self.model.config.vision_config, "deepstack_visual_indexes", ()))
        layers = self.decoder_layers()
        return [
            layers[index].register_forward_hook(self._deepstack_hook(index))
            for index in range(min(levels, len(layers)))
        ]

    def compress_streams(
        self,
        kwargs: dict[str, Any],
        session: Session,
        groups: list[Group],
        layout: VideoLayout,
        features: list[Tensor],
    ) -> None:
        """Take the DeepStack levels away from the language model and compress each one with
        the selection and cluster means of the main visual tokens."""
        self._stack = None
        # the language model's own loop would index the uncut prompt's visual positions
        levels = kwargs.pop("deepstack_visual_embeds", None)
        positions = kwargs.pop("visual_pos_masks", None)
        if not levels:
            return
        t0 = clock(levels[0])
        sizes = layout.sizes
        expected = column_mask(layout.grid_columns(), session.prompt_length)
        if (
            not isinstance(positions, Tensor)
            or positions.shape != expected.shape
            or not torch.equal(positions.to(expected.device), expected)
        ):
            raise ValueError(
                "the language model's visual_pos_masks are not the video placeholders of the "
                f"prompt (got {describe(positions)}){version_note()}"
            )
        for g, group in zip(groups, features, strict=True):
            result = g.compression
            _check_means(result.tokens, group, result.assignment, result.indices, "compression")
        compressed: list[list[Tensor]] = []
        for level in levels:
            if level.shape[0] != sum(sizes):
                raise ValueError(
                    f"a DeepStack level holds {level.shape[0]} features for {sum(sizes)} video "
                    f"placeholders{version_note()}"
                )
            per_row = level.split(sizes)
            compressed.append(
                [
                    group_mean(
                        torch.stack([per_row[int(r)] for r in g.rows]),
                        g.compression.assignment,
                        g.compression.indices,
                    )
                    for g in groups
                ]
            )
        mask = column_mask(session.visual_columns, session.keep.shape[1])
        self._stack = DeepStack(session, compressed, mask)
        self.stats.compress_seconds += clock(levels[0]) - t0

    def merge_streams(
        self, session: Session, results: list[MergeResult], visual: list[Tensor]
    ) -> None:
        """Layer K: merge the levels not yet added as the visual hidden states were merged."""
        stack = self._stack
        if stack is None or stack.session is not session:
            return
        for result, hidden in zip(results, visual, strict=True):
            _check_means(result.tokens, hidden, result.assignment, result.indices, "merge")
        for index in range(self.config.layer, len(stack.levels)):
            stack.levels[index] = [
                group_mean(level, r.assignment, r.indices)
                for level, r in zip(stack.levels[index], results, strict=True)
            ]
        n_in = session.keep.shape[1]
        chosen = torch.full_like(session.visual_columns, -1)
        for rows, r in zip(session.groups, results, strict=True):
            m = session.visual_counts[int(rows[0])]
            kept = session.visual_columns[rows, :m].gather(1, r.indices)
            chosen[rows[:, None], torch.arange(kept.shape[1], device=kept.device)] = kept
        assert session.merge_keep is not None
        stack.mask = take_columns(column_mask(chosen, n_in), session.merge_keep, fill=False)

    def _deepstack_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            stack = self._stack
            if stack is None or not self._fwd.new_session or self._fwd.session is not stack.session:
                return None
            if self.resume is not None and self.resume.skips_layer(index):
                return None  # a prepared prefix: its visual tokens below K are cached
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[:2] != stack.mask.shape:
                raise RuntimeError(
                    f"decoder layer {index} returned hidden states of shape "
                    f"{tuple(hidden.shape)} where the DeepStack positions cover "
                    f"{tuple(stack.mask.shape)}{version_note()}"
                )
            features = _row_major(stack.levels[index], stack.session.groups, hidden.shape[0])
            added = self.language_model()._deepstack_process(hidden, stack.mask, features)
            return (added, *output[1:]) if isinstance(output, tuple) else added

        return hook


class Qwen3_5Handle(Qwen3VLHandle):
    """Adapter for ``Qwen3_5ForConditionalGeneration`` (and its MoE twin): the Qwen3-VL video
    path (timestamps, M-RoPE, no DeepStack) in front of a hybrid LLM whose ``linear_attention``
    layers (Gated DeltaNet) keep a recurrent state instead of a per-token KV cache.

    Tokens removed before the LLM never enter that state, and layers >= K, recurrent ones
    included, run on the merged sequence; only the ``full_attention`` layers hold a KV cache to
    count.  The merge at layer K reads layer K's attention (Eq. 5, or the last token's), so K
    must be a full-attention layer: a recurrent layer has no attention map to read.
    """

    def __init__(self, model: nn.Module, config: CompressionConfig, vision_layer: int = -1) -> None:
        types = list(model.config.text_config.layer_types)
        if config.merger != "none" and config.layer < len(types):
            if types[config.layer] != "full_attention":
                allowed = [i for i, kind in enumerate(types) if kind == "full_attention"]
                raise ValueError(
                    f"layer K={config.layer} is a {types[config.layer]} layer of this Qwen3.5 "
                    "model, which has no attention for the in-LLM merge to read; K must be a "
                    f"full-attention layer {allowed} or {len(types)} (no merge)"
                )
        super().__init__(model, config, vision_layer)

    @staticmethod
    def attention_queries(attention: nn.Module, x: Tensor) -> Tensor:
        """(B, q, H, d): Qwen3.5's gated attention projects each head's query and its output
        gate side by side (``q_proj`` gives H x 2d); the query is the first half."""
        both = attention.q_proj(x).view(*x.shape[:2], -1, 2 * attention.head_dim)
        return both[..., : attention.head_dim]


def _row_major(groups: list[Tensor], rows: list[Tensor], batch: int) -> Tensor:
    """(sum of each row's tokens, D): the groups' (G, M, D) features in row order, the order
    ``_deepstack_process`` reads the visual positions of a (B, n) mask in."""
    per_row: list[Tensor | None] = [None] * batch
    for features, members in zip(groups, rows, strict=True):
        for i, row in enumerate(members.tolist()):
            per_row[row] = features[i]
    return torch.cat([x for x in per_row if x is not None])


def _check_means(
    tokens: Tensor, x: Tensor, assignment: Tensor, indices: Tensor, stage: str
) -> None:
    """The DeepStack levels follow a stage only if its tokens are the means of its groups:
    tokens == group_mean(x, assignment, indices), up to rounding (CUDA's index_add sums in no
    fixed order: float32 sums of long groups, then one rounding to a 16-bit dtype)."""
    expected = group_mean(x, assignment, indices)
    eps = torch.finfo(tokens.dtype).eps
    bound = (2 * eps + 1e-4) * (1.0 + x.detach().abs().amax().float())
    if not bool(((tokens.float() - expected.float()).abs() <= bound).all()):
        raise ValueError(
            f"the {stage} stage produced visual tokens that are not the means of its groups "
            "(group_mean with its assignment); Qwen3-VL's DeepStack features can only follow "
            "a selection and cluster means (method 'ustc' and the baselines built on them; "
            "not FastVID's weighted anchors)"
        )
