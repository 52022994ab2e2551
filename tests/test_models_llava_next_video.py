"""ustc.attach on LLaVA-NeXT-Video (tiny random models of the real transformers class).

The battery of tests/test_models_llava_onevision.py; what is specific here: CLIP has a CLS token,
so Eq. (1) is the CLS row of the attention of the layer that gives the features (``hidden_states
[-2]``), checked against CLIP's eager attention maps pushed through the model's own 2 x 2 average
pooling; the prompt holds F*P video placeholders with no newline; the LLM is Llama.
"""

import pytest
import torch
from models_helpers import (
    llava_video_inputs,
    reference_logits,
    tiny_llava_next_video,
    video_features,
)

from ustc import CompressionConfig, Compressor
from ustc.models import LlavaNextVideoHandle, attach
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


def test_prompt_layout_is_f_times_p_placeholders_without_newline():
    model = tiny_llava_next_video()
    inputs = llava_video_inputs(model, frames=3)
    assert (inputs.tokens_per_frame, inputs.newline) == (16, False)
    assert int((inputs.input_ids == model.config.video_token_id).sum()) == 3 * 16
    assert video_features(model, inputs).shape == (1, 3, 16, 64)


@pytest.mark.parametrize(
    "config",
    [
        CompressionConfig(retention=1.0, merger="none"),
        CompressionConfig(retention=1.0, merger="text-aware", layer=3),
        CompressionConfig(retention=1.0, merger="last-token", layer=3, scorer="attn"),
    ],
    ids=["r1-no-merger", "r1-text-aware-K=L", "r1-last-token-K=L"],
)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compression_off_is_bit_identical_and_remove_restores(config, attn):
    model = tiny_llava_next_video(attn=attn, layers=3)
    inputs = llava_video_inputs(model, batch=2)
    with torch.no_grad():
        before = model(**inputs.kwargs).logits
    plain = generate(model, inputs)
    count = hooks(model)  # transformers may add hooks of its own on the first forward
    handle = attach(model, config)
    assert isinstance(handle, LlavaNextVideoHandle) and hooks(model) > count
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
    assert hooks(model) == count and "get_video_features" not in model.model.__dict__


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_token_counts_come_from_the_kv_cache(attn):
    model = tiny_llava_next_video(attn=attn, layers=3)
    inputs = llava_video_inputs(model, frames=4)
    n = inputs.input_ids.shape[1]
    handle = attach(model, ON)
    out = generate(model, inputs, steps=5)
    handle.remove()
    budget = ON.budget(4, 16)
    kept = ON.kept_after_merge(budget)
    entering = n - 4 * 16 + budget  # text + the budget: no newline
    after_k = entering - budget + kept
    assert cache_lengths(out.past_key_values) == [entering + 4] + [after_k + 4] * 2
    assert (handle.stats.tokens_in, handle.stats.tokens_after_merge) == (budget, kept)
    assert handle.stats.sequence_in == entering and handle.stats.sequence_after_merge == after_k
    assert torch.equal(out.sequences[:, :n], inputs.input_ids)


@pytest.mark.parametrize(
    "attn,merger,batch",
    [
        ("sdpa", "text-aware", 1),
        ("eager", "text-aware", 2),
        ("sdpa", "last-token", 2),
        ("eager", "none", 1),
    ],
)
def test_every_decode_step_matches_a_no_cache_recompute(attn, merger, batch):
    model = tiny_llava_next_video(attn=attn, layers=3)
    inputs = llava_video_inputs(model, batch=batch)
    config = ON.replace(merger=merger)
    handle = attach(model, config)
    out = generate(model, inputs, steps=6)
    handle.remove()
    expected = reference_logits(model, inputs, out.sequences, handle.last, config)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=2e-5, rtol=1e-5)


def _reference_vision_scores(model, inputs, layer):
    """Eq. (1) with a CLS token from CLIP's eager attention maps: the head-averaged CLS row
    without its own column, then the 2 x 2 average pooling of the resampler, by hand."""
    pixels = inputs.kwargs["pixel_values_videos"]
    b, f = pixels.shape[:2]
    with torch.no_grad():
        maps = model.model.vision_tower(pixels.flatten(0, 1), output_attentions=True).attentions
    row = maps[layer].double().mean(dim=1)[:, 0, 1:]  # (B*F, g*g)
    grid = int(row.shape[-1] ** 0.5)
    pooled = row.view(b * f, grid // 2, 2, grid // 2, 2).mean(dim=(2, 4))
    return pooled.reshape(b, f, -1)


def test_vision_scores_equal_eager_cls_attention_maps():
    eager = tiny_llava_next_video(attn="eager")
    model = tiny_llava_next_video(attn="sdpa")
    inputs = llava_video_inputs(model, frames=2, batch=2)
    config = ON.replace(retention=0.1, merger="none")
    handle = attach(model, config)
    assert handle.vision_layer == 1  # hidden_states[-2] of 3 layers is the output of layer 1
    with torch.no_grad():
        model(**inputs.kwargs)
    handle.remove()
    scores = handle.last.vision_scores
    assert scores.shape == (2, 2, 16)
    expected = _reference_vision_scores(eager, inputs, layer=1)
    torch.testing.assert_close(scores.double(), expected, atol=1e-6, rtol=0)
    # not the last layer's map, and not the mean attention received (the encoders without CLS)
    assert (scores.double() - _reference_vision_scores(eager, inputs, layer=-1)).abs().max() > 1e-4
    # the external stage compressed the model's own pooled features with these scores
    want = Compressor(config).compress(video_features(model, inputs), scores)
    assert torch.equal(handle.last.compression.indices, want.indices)
    torch.testing.assert_close(handle.last.compression.tokens, want.tokens)


def test_vision_layer_option_selects_another_encoder_layer():
    eager = tiny_llava_next_video(attn="eager")
    model = tiny_llava_next_video()
    inputs = llava_video_inputs(model, frames=2)
    handle = attach(model, ON.replace(merger="none"), vision_layer=0)
    with torch.no_grad():
        model(**inputs.kwargs)
    handle.remove()
    expected = _reference_vision_scores(eager, inputs, layer=0)
    torch.testing.assert_close(handle.last.vision_scores.double(), expected, atol=1e-6, rtol=0)


def test_text_attention_and_merge_at_layer_k_match_eager_weights():
    k = 1
    model = tiny_llava_next_video(attn="eager", layers=3)
    inputs = llava_video_inputs(model, batch=2)
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
    ve = ts = vs + handle.stats.tokens_in  # no newline: the text follows the video
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


def test_unsupported_inputs_raise_clear_errors():
    model = tiny_llava_next_video()
    inputs = llava_video_inputs(model, batch=2)
    with pytest.raises(ValueError, match="vision_layer must be in"):
        attach(model, ON, vision_layer=3)
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="only the 'default' strategy"):
        attach(model, ON)
    model.config.vision_feature_select_strategy = "default"
    handle = attach(model, ON)
    one_video = dict(inputs.kwargs, pixel_values_videos=inputs.kwargs["pixel_values_videos"][:1])
    with pytest.raises(ValueError, match="1 videos for 2 prompts"):
        model(**one_video)
    fewer = dict(inputs.kwargs, pixel_values_videos=inputs.kwargs["pixel_values_videos"][:, :3])
    with pytest.raises(ValueError, match=r"do not make F\*P with F = 3 frames of P = 16"):
        model(**fewer)
    handle.remove()
