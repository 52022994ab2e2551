"""GLM-4.1V and GLM-4.5V (``Glm4vForConditionalGeneration``, ``Glm4vMoeForConditionalGeneration``).

Video path of the model: as Qwen2-VL, frames are cut into 14 x 14 patches in pairs of frames
(temporal patch 2, so one "frame" of features is a pair of input frames); the vision tower runs
each frame pair on its own (``get_video_features`` gives it a grid of ``[1, h, w]`` per pair, so
every block attends inside one pair, in the processor's patch order with each 2 x 2 merger group
contiguous); a 2 x 2 strided convolution (``downsample``) and the patch merger make one token of
each group.  The LLM (GLM-4, dense for GLM-4.1V, MoE for GLM-4.5V) uses 3-D M-RoPE positions with
a partial rotary dimension.  What differs from Qwen2-VL and matters to ustc:

* The placeholders.  A video's tokens are written with the *image* placeholder
  (``config.image_token_id``); ``mm_token_type_ids`` (2 inside ``<|begin_of_video|>`` ...
  ``<|end_of_video|>``) tells the model they are a video's.
* The prompt.  The processor writes each frame pair as ``<|begin_of_image|>`` + h*w/4
  placeholders + ``<|end_of_image|>`` + its timestamp in seconds (text): a video is F runs of
  placeholders with text between them (``VideoLayout.columns``, as Qwen3-VL).  The tokens after
  the last run up to ``<|end_of_video|>`` (the last ``<|end_of_image|>`` and timestamp) are kept
  and are not question text for the merger; in a batch whose rows' last timestamps tokenize to
  different lengths, the shortest such run counts for every row.
* M-RoPE (``get_rope_index`` splits the video grid into one grid per frame pair, each at its own
  temporal position): positions are computed on the uncompressed prompt and kept tokens keep
  theirs, exactly as for Qwen2.5-VL.

Eq. (1) scores come from the last vision block, as for Qwen2-VL: q and k recomputed from its
input with its own rotary embedding, the attention each patch receives inside its frame pair,
averaged over the 2 x 2 patches the downsampling convolution joins, in the order of the model's
features.  The Eq. (5) attention at layer K is recomputed with GLM's own (partial, interleaved)
``apply_rotary_pos_emb``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ustc.models.qwen2_vl import Qwen2VLHandle


class Glm4vHandle(Qwen2VLHandle):
    """Adapter for ``Glm4vForConditionalGeneration`` (GLM-4.1V) and
    ``Glm4vMoeForConditionalGeneration`` (GLM-4.5V).

    vision_layer: index of the vision block whose attention gives Eq. (1); by default the last
    block, whose output the downsampling convolution and the merger turn into the LLM's visual
    tokens.  Eq. (1), the grid check and the positions are Qwen2-VL's (``Qwen2VLHandle``); what
    differs is the placeholder (the image token) and the prompt (one run per frame pair, each
    followed by its timestamp).
    """

    video_in_runs = True
    placeholder_token = "image_token_id"
    placeholder_note = (
        " (the processor writes one run of h*w/4 image placeholders per frame pair, each followed "
        "by its timestamp)"
    )

    def trailing(self, ids: Tensor, last: Tensor) -> int:
        """Tokens after the last frame pair's placeholders up to ``<|end_of_video|>`` (its
        ``<|end_of_image|>`` and timestamp), the fewest over the rows; 0 for a row without
        ``<|end_of_video|>`` after its video."""
        end = getattr(self.model.config, "video_end_token_id", None)
        columns = torch.arange(ids.shape[1], device=ids.device)
        after = (ids == end) & (columns > last[:, None])
        # first <|end_of_video|> after each row's video (argmax: the first True), if any
        found = after.any(dim=1)
        counts = torch.where(found, after.int().argmax(dim=1) - last, 0)
        return int(counts.min())
