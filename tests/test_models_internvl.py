"""ustc.attach on InternVL: what is this family's own.

The battery every backbone runs is tests/test_backbones.py (InternVL3, a Qwen2 LLM); here it
also runs decoding and the Eq. (5) attention on InternVL3.5's Qwen3 LLM (per-head q/k norms).
What is specific: InternVL takes a video's frames as images (``pixel_values`` through
``get_image_features``), InternViT has a CLS token (Eq. 1 is the CLS row), and the pixel-shuffle
projector joins each 2 x 2 block of patches into one token, so a token's score is the mean of its
block's four CLS-attention scores -- checked against the eager attention maps pushed through the
model's own ``pixel_shuffle`` and against a slow loop over the blocks; the processor's per-frame
layout ('Frame{i}: <img>...</img>' per frame).
"""

from dataclasses import replace

import pytest
import torch
from models_helpers import internvl_video_inputs, reference_logits, tiny_internvl, video_features
from test_backbones import (
    BACKBONES,
    check_decode_matches_a_no_cache_recompute,
    check_text_attention_and_merge_at_layer_k,
)

from ustc import CompressionConfig, Compressor
from ustc.models import attach

#: InternVL3.5: the battery's InternVL spec with a Qwen3 LLM
INTERNVL3_5 = replace(
    next(b for b in BACKBONES if b.name == "internvl"),
    name="internvl3.5",
    build=lambda attn="sdpa", **kw: tiny_internvl(attn=attn, text="qwen3", **kw),
)

torch.set_num_threads(1)

ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)


def _eager_cls_rows(model, inputs, layer):
    """(B*F, g, g) head-averaged CLS row of InternViT's eager attention map, CLS column dropped."""
    pixels = inputs.kwargs["pixel_values"]
    with torch.no_grad():
        maps = model.model.vision_tower(pixels, output_attentions=True).attentions
    row = maps[layer].double().mean(dim=1)[:, 0, 1:]
    grid = int(row.shape[-1] ** 0.5)
    return row.view(-1, grid, grid)


def test_vision_scores_equal_eager_attention_maps_through_the_pixel_shuffle():
    eager = tiny_internvl(attn="eager")
    model = tiny_internvl(attn="sdpa")
    inputs = internvl_video_inputs(model, frames=2, batch=2)
    config = ON.replace(retention=0.1, merger="none")
    handle = attach(model, config)
    assert handle.vision_layer == 1  # vision_feature_layer -1: the last of 2 layers
    with torch.no_grad():
        model(**inputs.kwargs)
    handle.remove()
    scores = handle.last.vision_scores
    assert scores.shape == (2, 2, 16)
    rows = _eager_cls_rows(eager, inputs, layer=-1)  # (B*F, 8, 8)
    # the eager map pushed through the model's own shuffle, as a one-channel feature map
    shuffled = eager.model.pixel_shuffle(rows[..., None], scale_factor=0.5).mean(dim=-1)
    torch.testing.assert_close(scores.double(), shuffled.reshape(2, 2, 16), atol=1e-6, rtol=0)
    # and that shuffle groups 2 x 2 blocks: token (i, j) is the mean of patches (2j.., 2i..)
    # (pixel_shuffle transposes the grid: its token (i, j) holds the block at column 2i, row 2j)
    loop = torch.zeros(4, 4, 4, dtype=torch.float64)
    for frame in range(4):
        for i in range(4):
            for j in range(4):
                loop[frame, i, j] = rows[frame, 2 * j : 2 * j + 2, 2 * i : 2 * i + 2].mean()
    torch.testing.assert_close(shuffled.reshape(4, 4, 4).transpose(1, 2), loop)
    # the features are shuffled the same way: token t's channels are the same 4 patches
    hidden = eager.model.vision_tower(inputs.kwargs["pixel_values"]).last_hidden_state[:, 1:]
    index = torch.arange(64, dtype=torch.float64).view(1, 8, 8, 1)
    groups = eager.model.pixel_shuffle(index, scale_factor=0.5).reshape(16, 4).long()
    shuffled_features = eager.model.pixel_shuffle(hidden.reshape(4, 8, 8, -1), scale_factor=0.5)
    torch.testing.assert_close(
        shuffled_features.reshape(4, 16, 4, -1), hidden[:, groups.flatten()].reshape(4, 16, 4, -1)
    )
    torch.testing.assert_close(
        shuffled.reshape(4, 16), rows.reshape(4, 64)[:, groups.flatten()].view(4, 16, 4).mean(-1)
    )
    # the external stage compressed the model's own features with these scores
    want = Compressor(config).compress(video_features(model, inputs), scores)
    assert torch.equal(handle.last.compression.indices, want.indices)
    torch.testing.assert_close(handle.last.compression.tokens, want.tokens)


def test_unsupported_inputs_raise_clear_errors():
    model = tiny_internvl()
    inputs = internvl_video_inputs(model, batch=2, frames=2)
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="only the 'default' strategy"):
        attach(model, ON)
    model.config.vision_feature_select_strategy = "default"
    handle = attach(model, ON)
    short = dict(inputs.kwargs, input_ids=inputs.input_ids.clone())
    short["input_ids"][1, inputs.video_start + 16] = 7  # one row's video lost a token
    with pytest.raises(ValueError, match=r"image placeholders per prompt row \[32, 31\]"):
        model(**short)
    three = dict(inputs.kwargs, pixel_values=inputs.kwargs["pixel_values"][:3])
    with pytest.raises(ValueError, match="3 frames in pixel_values for prompts of 2 frames"):
        model(**three)
    handle.remove()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_processors_per_frame_layout_compresses_one_video(attn):
    # 'Frame{i}: <img>' + P <IMG_CONTEXT> + '</img>' per frame: the labels and image tags between
    # the frames stay in the sequence, and every decode step equals the no-cache recompute
    model = tiny_internvl(attn=attn, layers=3)
    inputs = internvl_video_inputs(model, frames=4, batch=2, per_frame_runs=True)
    config = ON.replace(merger="text-aware")
    handle = attach(model, config)
    with torch.no_grad():
        out = model.generate(
            **inputs.kwargs, max_new_tokens=4, return_dict_in_generate=True, output_logits=True
        )
    handle.remove()
    budget = config.budget(inputs.frames, inputs.tokens_per_frame)
    assert handle.stats.tokens_in == budget
    # all text tokens (labels and tags between the frames too) entered the LLM
    n = inputs.input_ids.shape[1]
    assert handle.stats.sequence_in == n - inputs.frames * inputs.tokens_per_frame + budget
    expected = reference_logits(model, inputs, out.sequences, handle.last, config)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=2e-5, rtol=1e-5)


def test_internvl3_5_decode_matches_a_no_cache_recompute():
    check_decode_matches_a_no_cache_recompute(INTERNVL3_5, "sdpa", ON, batch=2)


def test_internvl3_5_text_attention_and_merge_at_layer_k_match_eager_weights():
    check_text_attention_and_merge_at_layer_k(INTERNVL3_5)
