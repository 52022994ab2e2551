"""ustc.attach on InternVL (tiny random models of the real transformers class).

The battery of the other adapters; what is specific here: InternVL takes a video's frames as
images (``pixel_values`` through ``get_image_features``), InternViT has a CLS token (Eq. 1 is the
CLS row), and the pixel-shuffle projector joins each 2 x 2 block of patches into one token, so a
token's score is the mean of its block's four CLS-attention scores -- checked against the eager
attention maps pushed through the model's own ``pixel_shuffle`` and against a slow loop over
the blocks.
"""

import pytest
import torch
from models_helpers import (
    internvl_video_inputs,
    reference_logits,
    tiny_internvl,
    video_features,
)

from ustc import CompressionConfig, Compressor
from ustc.models import InternVLHandle, attach
from ustc.models.attention import text_to_visual_attention

torch.set_num_threads(1)

ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)


def generate(model, inputs, steps=5):
    with torch.no_grad():
        return model.generate(
            **inputs.kwargs, max_new_tokens=steps, return_dict_in_generate=True, output_logits=True
        )


def cache_lengths(cache):
    return [layer.keys.shape[-2] for layer in cache.layers]


def hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize(
    "config",
    [
        CompressionConfig(retention=1.0, merger="none"),
        CompressionConfig(retention=1.0, merger="text-aware", layer=3),
    ],
    ids=["r1-no-merger", "r1-text-aware-K=L"],
)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compression_off_is_bit_identical_and_remove_restores(config, attn):
    model = tiny_internvl(attn=attn, layers=3)
    inputs = internvl_video_inputs(model, batch=2)
    with torch.no_grad():
        before = model(**inputs.kwargs).logits
    plain = generate(model, inputs)
    count = hooks(model)  # transformers may add hooks of its own on the first forward
    handle = attach(model, config)
    assert isinstance(handle, InternVLHandle) and hooks(model) > count
    assert "get_image_features" in model.model.__dict__
    with torch.no_grad():
        during = model(**inputs.kwargs).logits
    hooked = generate(model, inputs)
    assert handle.stats.prefills == 2 and handle.stats.tokens_in == inputs.frames * 16
    handle.remove()
    with torch.no_grad():
        after = model(**inputs.kwargs).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert torch.equal(plain.sequences, hooked.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, hooked.logits, strict=True))
    assert hooks(model) == count and "get_image_features" not in model.model.__dict__


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_token_counts_come_from_the_kv_cache(attn):
    model = tiny_internvl(attn=attn, layers=3)
    inputs = internvl_video_inputs(model, frames=4)
    n = inputs.input_ids.shape[1]
    handle = attach(model, ON)
    out = generate(model, inputs, steps=5)
    handle.remove()
    budget = ON.budget(4, 16)
    kept = ON.kept_after_merge(budget)
    entering = n - 4 * 16 + budget
    after_k = entering - budget + kept
    assert cache_lengths(out.past_key_values) == [entering + 4] + [after_k + 4] * 2
    assert (handle.stats.tokens_in, handle.stats.tokens_after_merge) == (budget, kept)
    assert torch.equal(out.sequences[:, :n], inputs.input_ids)


@pytest.mark.parametrize(
    "attn,merger,batch,text",
    [
        ("sdpa", "text-aware", 1, "qwen2"),
        ("eager", "text-aware", 2, "qwen2"),
        ("sdpa", "last-token", 2, "qwen2"),
        ("eager", "none", 1, "qwen2"),
        ("sdpa", "text-aware", 2, "qwen3"),
    ],
)
def test_every_decode_step_matches_a_no_cache_recompute(attn, merger, batch, text):
    model = tiny_internvl(attn=attn, layers=3, text=text)
    inputs = internvl_video_inputs(model, batch=batch)
    config = ON.replace(merger=merger)
    handle = attach(model, config)
    out = generate(model, inputs, steps=6)
    handle.remove()
    expected = reference_logits(model, inputs, out.sequences, handle.last, config)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=2e-5, rtol=1e-5)


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


@pytest.mark.parametrize("text", ["qwen2", "qwen3"], ids=["internvl3", "internvl3.5"])
def test_text_attention_and_merge_at_layer_k_match_eager_weights(text):
    k = 1
    model = tiny_internvl(attn="eager", layers=3, text=text)
    inputs = internvl_video_inputs(model, batch=2)
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs["position_embeddings"]

    layer = model.model.language_model.layers[k]
    probe = layer.register_forward_pre_hook(grab, with_kwargs=True)
    handle = attach(model, ON.replace(merger="none"))
    with torch.no_grad():
        weights = model(**inputs.kwargs, output_attentions=True).attentions[k]
    handle.remove()
    probe.remove()
    vs = inputs.video_start
    ve = ts = vs + handle.stats.tokens_in  # </img> counts as text here (trailing=0)
    hidden = captured["hidden"]
    with torch.no_grad():
        recomputed = text_to_visual_attention(
            layer.self_attn,
            layer.input_layernorm(hidden),
            *captured["rope"],
            ts,
            torch.arange(vs, ve).expand(hidden.shape[0], -1),
        )
    expected = weights[:, :, ts:, vs:ve].mean(dim=1)
    torch.testing.assert_close(recomputed, expected, atol=1e-6, rtol=1e-5)
    config = ON.replace(layer=k)
    merged = attach(model, config)
    with torch.no_grad():
        model(**inputs.kwargs)
    merged.remove()
    want = Compressor(config).merge(hidden[:, vs:ve], hidden[:, ts:], expected)
    assert torch.equal(merged.last.merge.indices, want.indices)


def test_text_only_prompts_pass_through_unchanged():
    model = tiny_internvl()
    ids = torch.randint(5, 80, (1, 9))
    plain = model.generate(input_ids=ids, max_new_tokens=3)
    handle = attach(model, ON)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=3), plain)
    assert handle.stats.prefills == 0
    handle.remove()


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
