"""The adapter protocol: the named hooks of ``ustc.models.base.Handle`` that a backbone's adapter
may override, grouped by what backbone families differ in.

The shared machinery (``base.py``, ``sequence.py``, ``attention.py``) names no family; all it
knows of one is what these hooks return.  A backbone is one file with one ``Handle`` subclass
that overrides some of them (and its ``__init__``, to validate its config), plus one line in
``ustc.models.ADAPTERS``.  A family that needs something none of them gives adds a hook here,
with its default in ``Handle`` and a test, never a special case in the shared modules
(``tests/test_architecture.py`` checks both: no family name in those modules, and no adapter
overriding a public name that is not listed here).

Hook -> (what families differ in, the default).
"""

from __future__ import annotations

#: hook name -> (what families differ in, what Handle does by default)
HOOKS: dict[str, tuple[str, str]] = {
    # where the model's parts are
    "base_model": ("where the parts are", "model.model"),
    "language_model": ("where the parts are", "base_model().language_model"),
    "decoder_layers": ("where the parts are", "language_model().layers"),
    "layer_attention": ("where the parts are", '"self_attn" of a decoder layer'),
    "layer_norm": ("where the parts are", '"input_layernorm" of a decoder layer'),
    # how the video reaches the model (image-as-frames layouts)
    "video_method": (
        "image-as-frames layouts: the encoder method the video goes through",
        '"get_video_features" ("get_image_features" for frames taken as images)',
    ),
    "video_argument": ("image-as-frames layouts: the pixels' argument", '"pixel_values_videos"'),
    "video_output": ("image-as-frames layouts: the mm_encoder_outputs key", '"video"'),
    "video_call": (
        "what one encoder call encoded: F of (B, F, C, H, W) pixels, or a (t, h, w) grid",
        "none: every adapter says",
    ),
    "video_layout": (
        "where the video sits in the prompt: one run of placeholders, or one run per frame "
        "with timestamps / frame labels between (VideoLayout.columns), trailing tokens",
        "none: every adapter says",
    ),
    # Eq. (1): which vision layer, and how its scores align with the LLM's tokens
    "vision_hooks": ("which vision attention gives Eq. (1)", "none: every adapter says"),
    "vision_scores": (
        "Eq. (1) from that attention, aligned through the model's own pooling / merger / "
        "pixel shuffle, in feature order",
        "none: every adapter says",
    ),
    "score_hook": ("how the scores are captured", "a forward pre-hook calling vision_scores"),
    "tower_hook": (
        "how the vision tower's call is seen, for adapters whose alignment needs it",
        "a forward pre-hook calling vision_tower_call",
    ),
    "vision_tower_call": (
        "what the alignment needs of the vision tower's call (a window permutation, a grid and "
        "merge sizes)",
        "nothing",
    ),
    # positions
    "decode_positions": (
        "positions of decode steps without position_ids: 1-D RoPE, or M-RoPE's rope_deltas",
        "each row's next 1-D position",
    ),
    # extra per-token streams (DeepStack injection)
    "stream_hooks": ("DeepStack injection: hooks that add the streams", "none"),
    "compress_streams": ("DeepStack injection: cut the streams like the tokens", "nothing"),
    "merge_streams": ("DeepStack injection: merge the streams at layer K", "nothing"),
    # the LLM's layers
    "attention_queries": (
        "how a decoder attention makes its queries for Eq. (5): plain, or gated (query and "
        "output gate projected together)",
        "q_proj split into heads (attention.plain_queries)",
    ),
    "recurrent_layers": (
        "hybrid / linear-attention layers: a recurrent state instead of a KV cache",
        'the text config\'s "linear_attention" layer_types',
    ),
}

#: names of Handle's public API that are not hooks (adapters do not override them)
API = ("attached", "remove", "reset_stats")
