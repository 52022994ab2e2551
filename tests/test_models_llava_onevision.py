"""ustc.attach on LLaVA-OneVision / LLaVA-Video (tiny random models of the real transformers class).

What is checked against what:
- compression off -> logits and generated tokens bit-identical to the unpatched model (and after
  remove());
- token counts -> the model's own KV cache sizes per layer;
- every decode step -> a layer-by-layer recompute without KV cache and without hooks;
- Eq. (1) vision scores -> eager attention maps of SigLIP, reduced and pooled by hand;
- the text-to-visual attention of layer K -> eager attention weights of that layer.
"""

import inspect
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models_helpers import (
    VIDEO_TOKEN,
    llava_video_inputs,
    reference_logits,
    tiny_llava_onevision,
    video_features,
)

import ustc
from ustc import MERGERS, CompressionConfig, Compressor
from ustc.models import attach
from ustc.models.attention import text_to_visual_attention
from ustc.models.compat import CACHE_NAMES

torch.set_num_threads(1)

ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)


def generate(model, inputs, steps=5):
    with torch.no_grad():
        return model.generate(
            **inputs.kwargs,
            max_new_tokens=steps,
            return_dict_in_generate=True,
            output_logits=True,
        )


def cache_lengths(cache):
    return [layer.keys.shape[-2] for layer in cache.layers]


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
def test_compression_off_is_bit_identical(config, attn):
    model = tiny_llava_onevision(attn=attn, layers=3)
    inputs = llava_video_inputs(model, batch=2)
    with torch.no_grad():
        before = model(**inputs.kwargs).logits
    plain = generate(model, inputs)
    handle = attach(model, config)
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


def hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_remove_restores_the_instance_and_attach_twice_fails():
    model = tiny_llava_onevision()
    count = hooks(model)
    handle = attach(model, ON)
    assert hooks(model) > count and "get_video_features" in model.model.__dict__
    with pytest.raises(ValueError, match="already attached"):
        attach(model, ON)
    handle.remove()
    handle.remove()  # idempotent
    assert hooks(model) == count
    assert "get_video_features" not in model.model.__dict__
    assert not hasattr(model, "_ustc_handle")
    with attach(model, ON) as again:  # attachable again; detached on exit
        assert again.attached
    assert hooks(model) == count


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_token_counts_come_from_the_kv_cache(attn):
    model = tiny_llava_onevision(attn=attn, layers=3)
    inputs = llava_video_inputs(model, frames=4)
    n = inputs.input_ids.shape[1]
    handle = attach(model, ON)
    out = generate(model, inputs, steps=5)
    f, p = inputs.frames, inputs.tokens_per_frame
    budget = ON.budget(f, p)
    kept = ON.kept_after_merge(budget)
    assert (budget, kept) == (16, 8)
    entering = n - f * p + budget  # text + newline + the budget
    after_k = entering - budget + kept
    decoded = 4  # 5 tokens generated, the last is never fed back
    lengths = cache_lengths(out.past_key_values)
    assert lengths == [entering + decoded] + [after_k + decoded] * 2
    assert handle.stats.tokens_in == budget and handle.stats.tokens_after_merge == kept
    assert handle.stats.sequence_in == entering and handle.stats.sequence_after_merge == after_k
    assert handle.stats.visual_tokens == f * p and handle.stats.total_seconds > 0
    # generate() returns the caller's prompt followed by the new tokens
    assert torch.equal(out.sequences[:, :n], inputs.input_ids)
    handle.remove()


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
    model = tiny_llava_onevision(attn=attn, layers=3)
    inputs = llava_video_inputs(model, batch=batch)
    config = ON.replace(merger=merger)
    handle = attach(model, config)
    out = generate(model, inputs, steps=6)
    handle.remove()
    logits = torch.stack(out.logits, dim=1)
    expected = reference_logits(model, inputs, out.sequences, handle.last, config)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)
    # the check can fail: the same recompute with the kept tokens renumbered 0..n'-1 differs
    if merger == "text-aware" and batch == 1:
        assert (
            logits - _packed_positions_logits(model, inputs, out, handle.last)
        ).abs().max() > 1e-3


def _packed_positions_logits(model, inputs, out, last):
    lm = model.model.language_model
    n = inputs.input_ids.shape[1]
    fed = out.sequences[:, : out.sequences.shape[1] - 1]
    with torch.no_grad():
        x = lm.embed_tokens(fed)
        start, end = inputs.video_start, inputs.video_start + inputs.frames * 16
        x[:, end] = model.model.image_newline
        x = torch.cat([x[:, :start], last.compression.tokens, x[:, end:]], dim=1)
        hidden = lm(inputs_embeds=x, use_cache=False).last_hidden_state
        return model.lm_head(hidden)[:, -(out.sequences.shape[1] - n) :]


def test_external_stage_compresses_the_models_own_video_features():
    model = tiny_llava_onevision()
    inputs = llava_video_inputs(model, batch=2)
    handle = attach(model, ON.replace(merger="none"))
    with torch.no_grad():
        model(**inputs.kwargs)
    handle.remove()
    features = video_features(model, inputs)
    expected = Compressor(ON).compress(features, handle.last.vision_scores)
    assert torch.equal(handle.last.compression.indices, expected.indices)
    torch.testing.assert_close(handle.last.compression.tokens, expected.tokens)
    start = inputs.video_start
    assert handle.last.input_positions[0, :start].tolist() == list(range(start))


def _reference_vision_scores(model, inputs, layer):
    """Eq. (1) from eager SigLIP attention maps, then bilinear pooling by hand."""
    pixels = inputs.kwargs["pixel_values_videos"]
    b, f = pixels.shape[:2]
    with torch.no_grad():
        maps = model.model.vision_tower(pixels.flatten(0, 1), output_attentions=True).attentions
    a = maps[layer].double().mean(dim=1)  # (B*F, N, N), averaged over heads
    n = a.shape[-1]
    received = (a.sum(dim=1) - a.diagonal(dim1=1, dim2=2)) / (n - 1)  # mean over i != j
    grid = int(math.isqrt(n))
    pooled = F.interpolate(
        received.view(b * f, 1, grid, grid),
        size=(math.ceil(grid / 2), math.ceil(grid / 2)),
        mode="bilinear",
        align_corners=False,
    )
    return pooled.reshape(b, f, -1)


@pytest.mark.parametrize(
    "image_size,patch,per_frame", [(28, 4, 16), (52, 2, 169)], ids=["onevision", "llava-video"]
)
def test_vision_scores_equal_eager_attention_maps(image_size, patch, per_frame):
    eager = tiny_llava_onevision(attn="eager", image_size=image_size, patch_size=patch, layers=2)
    model = tiny_llava_onevision(attn="sdpa", image_size=image_size, patch_size=patch, layers=2)
    inputs = llava_video_inputs(model, frames=2, batch=2)
    assert inputs.tokens_per_frame == per_frame
    config = ON.replace(retention=0.05, merger="none")
    handle = attach(model, config)
    with torch.no_grad():
        model(**inputs.kwargs)
    handle.remove()
    scores = handle.last.vision_scores
    assert scores.shape == (2, 2, per_frame)
    expected = _reference_vision_scores(eager, inputs, layer=-1)
    torch.testing.assert_close(scores.double(), expected, atol=1e-5, rtol=0)
    assert handle.stats.tokens_in == config.budget(2, per_frame)


def test_vision_layer_option_selects_another_encoder_layer():
    eager = tiny_llava_onevision(attn="eager")
    model = tiny_llava_onevision()
    inputs = llava_video_inputs(model, frames=2)
    handle = attach(model, ON.replace(merger="none"), vision_layer=0)
    with torch.no_grad():
        model(**inputs.kwargs)
    handle.remove()
    expected = _reference_vision_scores(eager, inputs, layer=0)
    torch.testing.assert_close(handle.last.vision_scores.double(), expected, atol=1e-5, rtol=0)


def test_text_attention_and_merge_at_layer_k_match_eager_weights():
    k = 1
    model = tiny_llava_onevision(attn="eager", layers=3)
    inputs = llava_video_inputs(model, batch=2)
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs["position_embeddings"]

    probe = model.model.language_model.layers[k].register_forward_pre_hook(grab, with_kwargs=True)
    handle = attach(model, ON.replace(merger="none"))
    with torch.no_grad():
        weights = model(**inputs.kwargs, output_attentions=True).attentions[k]
    handle.remove()
    probe.remove()
    m = handle.stats.tokens_in
    start = inputs.video_start
    vs, ve, ts = start, start + m, start + m + 1  # the image_newline is not text
    layer = model.model.language_model.layers[k]
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

    # the merge the hooks perform at layer K is the core merger on exactly these inputs
    config = ON.replace(layer=k)
    merged = attach(model, config)
    with torch.no_grad():
        model(**inputs.kwargs)
    merged.remove()
    want = Compressor(config).merge(hidden[:, vs:ve], hidden[:, ts:], expected)
    assert torch.equal(merged.last.merge.indices, want.indices)
    torch.testing.assert_close(merged.last.merge.tokens, want.tokens)


@pytest.mark.parametrize("merger", MERGERS.names())
def test_generate_end_to_end_with_every_merger(merger):
    model = tiny_llava_onevision(layers=2)
    inputs = llava_video_inputs(model, frames=4)
    config = CompressionConfig(retention=0.2, merger=merger, layer=1, keep_ratio=0.5)
    handle = ustc.attach(model, config)
    out = generate(model, inputs, steps=3)
    budget = config.budget(inputs.frames, inputs.tokens_per_frame)
    assert handle.stats.tokens_in == budget
    assert handle.stats.tokens_after_merge == config.kept_after_merge(budget)
    lengths = cache_lengths(out.past_key_values)
    assert lengths[0] - lengths[1] == budget - config.kept_after_merge(budget)
    assert out.sequences.shape[1] == inputs.input_ids.shape[1] + 3
    handle.remove()


def _cache_keywords(model):
    """The keywords the installed transformers takes the KV cache by: ``cache`` (>= 5.24, which
    still accepts the deprecated ``past_key_values``) or ``past_key_values`` (older releases)."""
    declared = inspect.signature(model.forward).parameters
    return [name for name in CACHE_NAMES if name in declared] + (
        ["past_key_values"] if "past_key_values" not in declared else []
    )


@pytest.mark.parametrize("keyword", CACHE_NAMES)
def test_manual_decoding_without_generate_matches_generate(keyword):
    model = tiny_llava_onevision(layers=3)
    if keyword not in _cache_keywords(model):
        pytest.skip(f"this transformers takes no {keyword}= keyword")
    inputs = llava_video_inputs(model)
    handle = attach(model, ON)
    out = generate(model, inputs, steps=4)
    ids, mask = inputs.input_ids, inputs.kwargs["attention_mask"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values= is deprecated in 5.24
        step = model(**inputs.kwargs, use_cache=True)
        logits = [step.logits[:, -1]]
        cache = step.past_key_values
        for t in range(3):
            token = out.sequences[:, ids.shape[1] + t : ids.shape[1] + t + 1]
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            # alternately with the full-length mask and with no mask and no positions at all
            extra = {"attention_mask": mask} if t % 2 == 0 else {}
            step = model(input_ids=token, use_cache=True, **{keyword: cache}, **extra)
            logits.append(step.logits[:, -1])
    handle.remove()
    torch.testing.assert_close(
        torch.stack(logits, 1), torch.stack(out.logits, 1), atol=1e-5, rtol=0
    )


def test_a_layer_argument_of_unknown_form_fails_naming_the_transformers_release():
    import transformers

    model = tiny_llava_onevision(attn="eager", layers=3)
    inputs = llava_video_inputs(model)
    layer = model.model.language_model.layers[ON.layer]

    def as_mapping(module, args, kwargs):  # a future release passing per-type masks
        return args, dict(kwargs, attention_mask={"full_attention": kwargs["attention_mask"]})

    probe = layer.register_forward_pre_hook(as_mapping, with_kwargs=True)
    handle = attach(model, ON)  # its layer hook runs after the probe
    with pytest.raises(ValueError, match=f"transformers {transformers.__version__}"):
        with torch.no_grad():
            model(**inputs.kwargs)
    handle.remove()
    probe.remove()


def test_text_only_prompts_pass_through_unchanged():
    model = tiny_llava_onevision()
    ids = torch.randint(5, 80, (1, 9))
    plain = model.generate(input_ids=ids, max_new_tokens=3)
    handle = attach(model, ON)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=3), plain)
    assert handle.stats.prefills == 0
    handle.remove()


def test_unsupported_inputs_raise_clear_errors():
    model = tiny_llava_onevision()
    inputs = llava_video_inputs(model, batch=2)
    with pytest.raises(ValueError, match="layer K=9 is past the last decoder layer"):
        attach(model, ON.replace(layer=9))
    with pytest.raises(ValueError, match="no ustc adapter for Qwen2ForCausalLM"):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        text = Qwen2Config(
            num_hidden_layers=1,
            hidden_size=16,
            intermediate_size=16,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=32,
        )
        attach(Qwen2ForCausalLM(text), ON)
    handle = attach(model, ON)
    # padding is supported, but not over the video, and the mask must be a 2-D tensor
    padded = dict(inputs.kwargs, attention_mask=inputs.kwargs["attention_mask"].clone())
    padded["attention_mask"][1, inputs.video_start + 3] = 0
    with pytest.raises(ValueError, match="masks video placeholders"):
        model(**padded)
    as_dict = dict(
        inputs.kwargs, attention_mask={"full_attention": inputs.kwargs["attention_mask"]}
    )
    with pytest.raises(ValueError, match=r"2-D \(B, n\) padding mask.*got a dict"):
        model(**as_dict)
    two_videos = dict(inputs.kwargs, input_ids=inputs.input_ids.clone())
    two_videos["input_ids"][0, inputs.video_start + 5] = 7  # the run is cut in two
    two_videos["input_ids"][0, 0] = VIDEO_TOKEN
    with pytest.raises(ValueError, match="several runs"):
        model(**two_videos)
    one_video = dict(inputs.kwargs, pixel_values_videos=inputs.kwargs["pixel_values_videos"][:1])
    with pytest.raises(ValueError, match="1 videos for 2 prompts"):
        model(**one_video)
    with pytest.raises(ValueError, match="images mixed with a video"):
        model(**inputs.kwargs, pixel_values=torch.zeros(2, 1, 3, 28, 28), image_sizes=None)
    no_text = llava_video_inputs(model, suffix=0)
    with pytest.raises(ValueError, match="needs text"):
        model(**no_text.kwargs)
    with pytest.raises(ValueError, match="only DynamicCache"):
        model.generate(**inputs.kwargs, max_new_tokens=2, cache_implementation="static")
    handle.remove()
    assert int((inputs.input_ids == VIDEO_TOKEN).sum()) == 2 * (4 * 16 + 1)


# ------------------------------------------------- real-video loading (ustc/video.py)
def test_uniform_frame_sampling():
    from ustc.video import sample_frame_indices

    assert sample_frame_indices(20, 5) == [0, 4, 9, 14, 19]
    assert sample_frame_indices(3, 8) == [0, 1, 2]
    with pytest.raises(ValueError, match="no frames"):
        sample_frame_indices(0, 4)


def test_load_video_with_pyav_returns_the_sampled_frames(tmp_path):
    av = pytest.importorskip("av")
    from ustc.video import load_video

    path = tmp_path / "gray.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(20):  # frame i is a flat gray of level 10 * i
            image = np.full((32, 32, 3), 10 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    frames = load_video(path, num_frames=5, backend="pyav")
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    levels = frames.reshape(5, -1).mean(axis=1)
    assert np.abs(levels - 10 * np.array([0, 4, 9, 14, 19])).max() < 4
    with pytest.raises(ValueError, match="no video file"):
        load_video(tmp_path / "missing.mp4")
