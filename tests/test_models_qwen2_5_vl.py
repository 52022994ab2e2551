"""ustc.attach on Qwen2.5-VL (tiny random models of the real transformers class).

The checks mirror tests/test_models_llava_onevision.py; what is specific here: M-RoPE positions
(3-D, kept from the uncompressed prompt), frames = temporal patch pairs, and Eq. (1) scores read
in the vision tower's window-permuted order, over the 2 x 2 patch groups of the merger.
"""

import sys

import pytest
import torch
from models_helpers import qwen_video_inputs, reference_logits, tiny_qwen2_5_vl, video_features

from ustc import MERGERS, CompressionConfig, Compressor
from ustc.models import attach
from ustc.models.attention import text_to_visual_attention

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
    ],
    ids=["r1-no-merger", "r1-text-aware-K=L"],
)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compression_off_is_bit_identical(config, attn):
    model = tiny_qwen2_5_vl(attn=attn, layers=3)
    inputs = qwen_video_inputs(model, batch=2)
    with torch.no_grad():
        before = model(**inputs.kwargs).logits
    plain = generate(model, inputs)
    handle = attach(model, config)
    with torch.no_grad():
        during = model(**inputs.kwargs).logits
    hooked = generate(model, inputs)
    assert handle.stats.prefills == 2
    handle.remove()
    with torch.no_grad():
        after = model(**inputs.kwargs).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert torch.equal(plain.sequences, hooked.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, hooked.logits, strict=True))
    assert "get_video_features" not in model.model.__dict__


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_token_counts_come_from_the_kv_cache(attn):
    model = tiny_qwen2_5_vl(attn=attn, layers=3)
    inputs = qwen_video_inputs(model, frames=4)  # 2 temporal patch pairs of 4 x 4 tokens
    assert (inputs.frames, inputs.tokens_per_frame) == (2, 16)
    n = inputs.input_ids.shape[1]
    handle = attach(model, ON)
    out = generate(model, inputs, steps=5)
    budget = ON.budget(2, 16)
    kept = ON.kept_after_merge(budget)
    entering = n - 32 + budget
    after_k = entering - budget + kept
    assert cache_lengths(out.past_key_values) == [entering + 4] + [after_k + 4] * 2
    assert (handle.stats.tokens_in, handle.stats.tokens_after_merge) == (budget, kept)
    assert torch.equal(out.sequences[:, :n], inputs.input_ids)
    handle.remove()


@pytest.mark.parametrize(
    "attn,merger,batch",
    [("sdpa", "text-aware", 1), ("eager", "text-aware", 2), ("sdpa", "last-token", 2)],
)
def test_every_decode_step_matches_a_no_cache_recompute(attn, merger, batch):
    model = tiny_qwen2_5_vl(attn=attn, layers=3)
    inputs = qwen_video_inputs(model, batch=batch)
    config = ON.replace(merger=merger)
    handle = attach(model, config)
    out = generate(model, inputs, steps=6)
    handle.remove()
    expected = reference_logits(model, inputs, out.sequences, handle.last, config)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("use_generate", [False, True])
def test_kept_tokens_keep_their_uncompressed_mrope_positions(use_generate):
    model = tiny_qwen2_5_vl()
    inputs = qwen_video_inputs(model)
    handle = attach(model, ON.replace(merger="none"))
    seen = []
    # registered after attach, so it runs after the compression hook of the language model
    probe = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["position_ids"]), with_kwargs=True
    )
    if use_generate:
        generate(model, inputs, steps=2)
    else:
        with torch.no_grad():
            model(**inputs.kwargs)
    probe.remove()
    handle.remove()
    full, _ = model.model.get_rope_index(
        inputs.input_ids,
        mm_token_type_ids=inputs.kwargs["mm_token_type_ids"],
        video_grid_thw=inputs.kwargs["video_grid_thw"],
    )
    columns = handle.last.input_positions[0]
    prefill = seen[0][-3:]  # generate() prepends a 1-D text row
    assert prefill.shape == (3, 1, columns.numel()) and columns.numel() < full.shape[-1]
    assert torch.equal(prefill[:, 0], full[:, 0, columns])
    if use_generate:  # the next token continues after the uncompressed prompt
        assert torch.equal(seen[1][-3:, 0, 0], full[:, 0, -1] + 1)


def _reference_vision_scores(model, inputs, block_index):
    """Eq. (1) from transformers' eager attention maps of one vision block, per attention
    segment, averaged over the merger's 2 x 2 groups, un-permuted by matching the model's own
    merged outputs."""
    visual = model.model.visual
    block = visual.blocks[block_index]
    captured = {}
    hooks = [
        block.attn.register_forward_pre_hook(
            lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True
        ),
        block.attn.register_forward_hook(lambda m, a, o: captured.update(out=o)),
    ]
    kw = inputs.kwargs
    with torch.no_grad():
        out = visual(kw["pixel_values_videos"], grid_thw=kw["video_grid_thw"])
    for hook in hooks:
        hook.remove()
    module = sys.modules[type(block.attn).__module__]
    hidden = captured["args"][0] if captured["args"] else captured["kwargs"]["hidden_states"]
    cu = captured["kwargs"]["cu_seqlens"].tolist()
    cos, sin = captured["kwargs"]["position_embeddings"]
    s = hidden.shape[0]
    with torch.no_grad():
        qkv = block.attn.qkv(hidden).reshape(s, 3, block.attn.num_heads, -1).permute(1, 0, 2, 3)
        q, k = module.apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)
        v = qkv[2]
        received = torch.zeros(s, dtype=torch.float64)
        outputs = []
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            seg = [x[a:b].transpose(0, 1)[None] for x in (q, k, v)]
            o, w = module.eager_attention_forward(
                block.attn, *seg, None, scaling=block.attn.scaling
            )
            outputs.append(o)
            avg = w[0].double().mean(dim=0)
            received[a:b] = (avg.sum(dim=0) - avg.diagonal()) / (b - a - 1)
        # these maps are the ones the block used: they reproduce its output
        torch.testing.assert_close(
            block.attn.proj(torch.cat(outputs, dim=1).reshape(s, -1)), captured["out"]
        )
        groups = received.view(-1, visual.spatial_merge_unit).mean(dim=-1)
        permuted = visual.merger(out.last_hidden_state)
    match = (out.pooler_output[:, None] == permuted[None]).all(dim=-1)
    assert bool(match.sum(dim=1).eq(1).all())
    return groups[match.float().argmax(dim=1)]


@pytest.mark.parametrize(
    "block,height", [(-1, 32), (0, 40)], ids=["full-attention-block", "windowed-ragged"]
)
def test_vision_scores_equal_eager_attention_maps(block, height):
    eager = tiny_qwen2_5_vl(attn="eager")
    model = tiny_qwen2_5_vl(attn="sdpa")
    inputs = qwen_video_inputs(model, frames=4, height=height, width=32, batch=2)
    config = ON.replace(merger="none")
    handle = attach(model, config, vision_layer=block)
    with torch.no_grad():
        model(**inputs.kwargs)
    handle.remove()
    f, p = inputs.frames, inputs.tokens_per_frame
    expected = _reference_vision_scores(eager, inputs, block).reshape(2, f, p)
    torch.testing.assert_close(handle.last.vision_scores.double(), expected, atol=1e-5, rtol=0)
    # and the external stage compressed the model's own features with these scores
    want = Compressor(config).compress(video_features(model, inputs), handle.last.vision_scores)
    assert torch.equal(handle.last.compression.indices, want.indices)


def test_text_attention_at_layer_k_matches_eager_weights():
    k = 1
    model = tiny_qwen2_5_vl(attn="eager", layers=3)
    inputs = qwen_video_inputs(model, batch=2)
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
    ve = vs + handle.stats.tokens_in
    ts = ve + 1  # <|vision_end|> is not text
    with torch.no_grad():
        recomputed = text_to_visual_attention(
            layer.self_attn,
            layer.input_layernorm(captured["hidden"]),
            *captured["rope"],
            ts,
            torch.arange(vs, ve).expand(captured["hidden"].shape[0], -1),
        )
    torch.testing.assert_close(
        recomputed, weights[:, :, ts:, vs:ve].mean(dim=1), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("merger", MERGERS.names())
def test_generate_end_to_end_with_every_merger(merger):
    model = tiny_qwen2_5_vl(layers=2)
    inputs = qwen_video_inputs(model)
    config = CompressionConfig(retention=0.2, merger=merger, layer=1, keep_ratio=0.5)
    handle = attach(model, config)
    out = generate(model, inputs, steps=3)
    budget = config.budget(inputs.frames, inputs.tokens_per_frame)
    lengths = cache_lengths(out.past_key_values)
    assert lengths[0] - lengths[1] == budget - config.kept_after_merge(budget)
    assert handle.stats.tokens_in == budget
    handle.remove()


def test_beam_search_with_several_returned_sequences():
    model = tiny_qwen2_5_vl(layers=2)
    inputs = qwen_video_inputs(model, batch=2)
    handle = attach(model, ON)
    with torch.no_grad():
        out = model.generate(
            **inputs.kwargs,
            max_new_tokens=3,
            num_beams=2,
            num_return_sequences=2,
            return_dict_in_generate=True,
        )
    handle.remove()
    n = inputs.input_ids.shape[1]
    assert out.sequences.shape == (4, n + 3)
    assert torch.equal(out.sequences[:, :n], inputs.input_ids.repeat_interleave(2, dim=0))
    budget = ON.budget(inputs.frames, inputs.tokens_per_frame)
    entering = n - inputs.frames * inputs.tokens_per_frame + budget
    assert out.past_key_values.layers[0].keys.shape[-2] == entering + 2
    # the 2 videos' scores were repeated for the 4 expanded rows, in order
    assert handle.last.vision_scores.shape[0] == 4
    assert torch.equal(handle.last.vision_scores[0], handle.last.vision_scores[1])


def test_manual_decoding_without_generate_matches_generate():
    model = tiny_qwen2_5_vl(layers=3)
    inputs = qwen_video_inputs(model)
    handle = attach(model, ON)
    out = generate(model, inputs, steps=4)
    n = inputs.input_ids.shape[1]
    mask = inputs.kwargs["attention_mask"]
    with torch.no_grad():
        step = model(**inputs.kwargs, use_cache=True)
        logits = [step.logits[:, -1]]
        for t in range(3):
            token = out.sequences[:, n + t : n + t + 1]
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            step = model(input_ids=token, attention_mask=mask, past_key_values=step.past_key_values)
            logits.append(step.logits[:, -1])
    handle.remove()
    torch.testing.assert_close(
        torch.stack(logits, 1), torch.stack(out.logits, 1), atol=1e-5, rtol=0
    )


def test_unsupported_inputs_raise_clear_errors():
    model = tiny_qwen2_5_vl()
    inputs = qwen_video_inputs(model, batch=2)
    handle = attach(model, ON)
    no_types = {k: v for k, v in inputs.kwargs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**no_types)
    grids = dict(inputs.kwargs, video_grid_thw=inputs.kwargs["video_grid_thw"][:1])
    with pytest.raises(ValueError, match="1 videos for 2 prompts"):
        model(**grids)
    no_grid = {k: v for k, v in inputs.kwargs.items() if k != "video_grid_thw"}
    with pytest.raises(ValueError, match="need video_grid_thw"):
        model(**no_grid)
    handle.remove()
    with pytest.raises(ValueError, match="vision_layer must be in"):
        attach(model, ON, vision_layer=5)
