"""ustc.attach on Qwen3-VL and Qwen3-VL-MoE (tiny random models of the real transformers classes).

The checks mirror tests/test_models_qwen2_5_vl.py; what is specific here: the video is one run of
placeholders per frame pair with timestamp text between, the M-RoPE positions are kept from the
uncompressed prompt, the vision tower is not window-permuted, the LLM normalises q and k per
head, and the DeepStack levels (added after decoder layers 0 and 1 of the tiny model) follow the
compression and the merge at layer K.
"""

import sys

import pytest
import torch
from models_helpers import (
    qwen3_video_inputs,
    reference_group_mean,
    reference_logits,
    tiny_qwen3_vl,
    video_features,
)

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


def deepstack_levels(model, inputs):
    """The model's own DeepStack features of the video, per level (B, F*P, D)."""
    kw = inputs.kwargs
    with torch.no_grad():
        out = model.model.get_video_features(kw["pixel_values_videos"], kw["video_grid_thw"])
    b = inputs.input_ids.shape[0]
    levels = [  # split per video (newer transformers) or one tensor (older)
        torch.cat(list(level)) if isinstance(level, (list, tuple)) else level
        for level in out.deepstack_features
    ]
    return [level.reshape(b, -1, level.shape[-1]) for level in levels]


def compressed_levels(model, inputs, last):
    """Each DeepStack level with the selection and cluster means of the compression."""
    m = last.compression.indices.shape[1]
    return [
        reference_group_mean(level, last.compression.assignment, m)
        for level in deepstack_levels(model, inputs)
    ]


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
    model = tiny_qwen3_vl(attn=attn, layers=3)
    inputs = qwen3_video_inputs(model, batch=2)
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
    layers = model.model.language_model.layers
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)


def test_deepstack_is_added_by_the_adapter_and_matters():
    """Under the adapter the language model gets no DeepStack inputs (its own loop would index
    a sequence that changes length at layer K): the adapter adds the levels itself, and with
    compression off the logits are those of the model (bit for bit, above), which differ from
    the same model without DeepStack."""
    model = tiny_qwen3_vl()
    inputs = qwen3_video_inputs(model)
    seen = []
    lm = model.model.language_model
    with torch.no_grad():
        alone = model(**inputs.kwargs).logits
        handle = attach(model, CompressionConfig(retention=1.0, merger="none"))
        # registered after attach: sees what the adapter passes on
        probe = lm.register_forward_pre_hook(
            lambda m, a, k: seen.append(k.get("deepstack_visual_embeds")), with_kwargs=True
        )
        hooked = model(**inputs.kwargs).logits
        handle.remove()
        model(**inputs.kwargs)
        probe.remove()
        assert seen[0] is None and len(seen[1]) == 2
        assert torch.equal(hooked, alone)
        model.model.visual.deepstack_visual_indexes = []  # the same model without DeepStack
        without = model(**inputs.kwargs).logits
    assert (without - alone).abs().max() > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_token_counts_come_from_the_kv_cache(attn):
    model = tiny_qwen3_vl(attn=attn, layers=3)
    inputs = qwen3_video_inputs(model, frames=4)  # 2 frame pairs of 4 x 4 tokens
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
    "attn,merger,layer,batch",
    [
        ("sdpa", "text-aware", 1, 1),  # K among the DeepStack layers: level 1 is merged
        ("eager", "text-aware", 1, 2),
        ("sdpa", "last-token", 0, 2),  # both levels merged
        ("sdpa", "text-aware", 2, 2),  # K after the DeepStack layers
    ],
)
def test_every_decode_step_matches_a_no_cache_recompute(attn, merger, layer, batch):
    model = tiny_qwen3_vl(attn=attn, layers=3)
    inputs = qwen3_video_inputs(model, batch=batch)
    config = ON.replace(merger=merger, layer=layer)
    handle = attach(model, config)
    out = generate(model, inputs, steps=6)
    handle.remove()
    levels = compressed_levels(model, inputs, handle.last)
    expected = reference_logits(model, inputs, out.sequences, handle.last, config, levels)
    got = torch.stack(out.logits, 1)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    # the reference without DeepStack is far: the levels were really added
    plain = reference_logits(model, inputs, out.sequences, handle.last, config)
    assert (got - plain).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [1, 0, 3], ids=["K=1", "K=0", "no-merge"])
def test_deepstack_added_at_each_layer_is_the_selection_and_means_of_the_main_tokens(layer):
    """Acceptance (issue 15): what is added after decoder layer l equals group_mean of the
    model's own level-l DeepStack features with the compression's assignment (and, from layer
    K on, the merge's), at exactly the positions of the kept visual tokens."""
    model = tiny_qwen3_vl(layers=3)
    inputs = qwen3_video_inputs(model, batch=2)
    layers = model.model.language_model.layers
    raw, added = {}, {}
    # registered before attach: sees each layer's output before the adapter adds DeepStack
    probes = [
        layers[i].register_forward_hook(lambda m, a, o, i=i: raw.setdefault(i, o)) for i in range(2)
    ]
    config = ON.replace(layer=layer, merger="text-aware" if layer < 3 else "none")
    handle = attach(model, config)
    probes += [
        layers[i].register_forward_hook(lambda m, a, o, i=i: added.setdefault(i, o))
        for i in range(2)
    ]
    with torch.no_grad():
        model(**inputs.kwargs)
    for probe in probes:
        probe.remove()
    handle.remove()
    last = handle.last
    video = inputs.video_columns()
    expected = compressed_levels(model, inputs, last)
    for level in range(2):
        merged = layer <= level
        columns = last.merged_positions if merged else last.input_positions  # original columns
        visual = torch.isin(columns, video)
        want = expected[level]
        if merged:
            count = last.merge.indices.shape[1]
            want = reference_group_mean(want, last.merge.assignment, count)
            assert torch.equal(
                columns[visual].view(2, -1),
                video[last.compression.indices].gather(1, last.merge.indices),
            )
        else:
            assert torch.equal(columns[visual].view(2, -1), video[last.compression.indices])
        delta = added[level] - raw[level]
        assert torch.equal(delta[~visual], torch.zeros_like(delta[~visual]))  # nothing else moved
        torch.testing.assert_close(
            delta[visual].view(2, -1, delta.shape[-1]), want, atol=1e-5, rtol=1e-4
        )
    # and the compression's tokens are the same selection and means of the main features
    features = video_features(model, inputs).flatten(1, 2)
    compression = last.compression
    torch.testing.assert_close(
        compression.tokens,
        reference_group_mean(features, compression.assignment, compression.indices.shape[1]),
        atol=1e-6,
        rtol=1e-5,
    )
    assert bool((compression.sizes > 1).any())  # some tokens are cluster means, not copies


@pytest.mark.parametrize("use_generate", [False, True])
def test_kept_tokens_keep_their_uncompressed_mrope_positions(use_generate):
    model = tiny_qwen3_vl()
    inputs = qwen3_video_inputs(model, frames=6)  # 3 frame pairs, timestamps of 2, 2, 3 tokens
    handle = attach(model, ON.replace(merger="none"))
    seen = []
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
    # every timestamp and vision start/end token between the frames is kept
    other = torch.ones(inputs.input_ids.shape[1], dtype=torch.bool)
    other[inputs.video_columns()] = False
    assert bool(torch.isin(other.nonzero()[:, 0], columns).all())
    if use_generate:  # the next token continues after the uncompressed prompt
        assert torch.equal(seen[1][-3:, 0, 0], full[:, 0, -1] + 1)


def _reference_vision_scores(model, inputs, block_index):
    """Eq. (1) from transformers' eager attention maps of one vision block, per frame pair,
    averaged over the merger's 2 x 2 groups (the tower keeps the processor's order)."""
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
        visual(kw["pixel_values_videos"], grid_thw=kw["video_grid_thw"])
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
    return received.view(-1, visual.spatial_merge_unit).mean(dim=-1)


@pytest.mark.parametrize("block,height", [(-1, 32), (0, 40)], ids=["last-block", "ragged-frames"])
def test_vision_scores_equal_eager_attention_maps(block, height):
    eager = tiny_qwen3_vl(attn="eager")
    model = tiny_qwen3_vl(attn="sdpa")
    inputs = qwen3_video_inputs(model, frames=4, height=height, width=32, batch=2)
    config = ON.replace(merger="none")
    handle = attach(model, config, vision_layer=block)
    with torch.no_grad():
        model(**inputs.kwargs)
    handle.remove()
    f, p = inputs.frames, inputs.tokens_per_frame
    expected = _reference_vision_scores(eager, inputs, block).reshape(2, f, p)
    torch.testing.assert_close(handle.last.vision_scores.double(), expected, atol=1e-5, rtol=0)
    want = Compressor(config).compress(video_features(model, inputs), handle.last.vision_scores)
    assert torch.equal(handle.last.compression.indices, want.indices)


def test_text_attention_at_layer_k_matches_eager_weights():
    """Eq. (5) recomputed with Qwen3's per-head q/k norms equals the eager attention maps."""
    k = 1
    model = tiny_qwen3_vl(attn="eager", layers=3)
    inputs = qwen3_video_inputs(model, batch=2)
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
    columns = handle.last.input_positions
    visual = torch.isin(columns, inputs.video_columns()).nonzero()[:, 1].view(2, -1)
    ts = int(visual[:, -1].max()) + 2  # <|vision_end|> is not text
    with torch.no_grad():
        recomputed = text_to_visual_attention(
            layer.self_attn,
            layer.input_layernorm(captured["hidden"]),
            *captured["rope"],
            ts,
            visual,
        )
    eager = (
        weights[:, :, ts:]
        .mean(dim=1)
        .gather(2, visual[:, None].expand(-1, recomputed.shape[1], -1))
    )
    torch.testing.assert_close(recomputed, eager, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("merger", MERGERS.names())
def test_generate_end_to_end_with_every_merger(merger):
    model = tiny_qwen3_vl(layers=2)
    inputs = qwen3_video_inputs(model)
    config = CompressionConfig(retention=0.2, merger=merger, layer=1, keep_ratio=0.5)
    handle = attach(model, config)
    out = generate(model, inputs, steps=3)
    budget = config.budget(inputs.frames, inputs.tokens_per_frame)
    lengths = cache_lengths(out.past_key_values)
    assert lengths[0] - lengths[1] == budget - config.kept_after_merge(budget)
    assert handle.stats.tokens_in == budget
    handle.remove()


def test_moe_class_bit_identical_off_and_decode_matches_recompute():
    model = tiny_qwen3_vl(layers=3, moe=True)
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    inputs = qwen3_video_inputs(model, batch=2)
    plain = generate(model, inputs, steps=3)
    handle = attach(model, CompressionConfig(retention=1.0, merger="none"))
    hooked = generate(model, inputs, steps=3)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, hooked.logits, strict=True))
    handle = attach(model, ON)
    out = generate(model, inputs, steps=4)
    handle.remove()
    expected = reference_logits(
        model, inputs, out.sequences, handle.last, ON, compressed_levels(model, inputs, handle.last)
    )
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=2e-5, rtol=1e-5)
    budget = ON.budget(inputs.frames, inputs.tokens_per_frame)
    n = inputs.input_ids.shape[1] - inputs.frames * inputs.tokens_per_frame + budget
    kept = n - budget + ON.kept_after_merge(budget)
    assert cache_lengths(out.past_key_values) == [n + 3] + [kept + 3] * 2


def test_beam_search_with_several_returned_sequences():
    model = tiny_qwen3_vl(layers=2)
    inputs = qwen3_video_inputs(model, batch=2)
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
    assert torch.equal(handle.last.vision_scores[0], handle.last.vision_scores[1])


def test_manual_decoding_without_generate_matches_generate():
    model = tiny_qwen3_vl(layers=3)
    inputs = qwen3_video_inputs(model)
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
    model = tiny_qwen3_vl()
    inputs = qwen3_video_inputs(model, batch=2)
    handle = attach(model, ON)
    no_types = {k: v for k, v in inputs.kwargs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**no_types)
    small = dict(inputs.kwargs, video_grid_thw=torch.tensor([[2, 8, 4]] * 2))
    with pytest.raises(ValueError, match="32 video placeholders for a grid of 2 x 4 x 2"):
        model(**small)
    handle.remove()
    with pytest.raises(ValueError, match="vision_layer must be in"):
        attach(model, ON, vision_layer=5)
    # tokens that are not the means of their groups cannot carry the DeepStack levels along
    handle = attach(model, CompressionConfig(retention=0.25, method="fastvid", merger="none"))
    with pytest.raises(ValueError, match="not the means of its groups"):
        with torch.no_grad():
            model(**inputs.kwargs)
    handle.remove()


def test_placeholder_columns_collect_each_rows_runs():
    from ustc.models.sequence import column_mask, placeholder_columns

    ids = torch.tensor([[1, 9, 9, 2, 9, 3], [9, 4, 9, 9, 9, 5]])
    columns, counts = placeholder_columns(ids, 9)
    assert counts == [3, 4]
    assert columns.tolist() == [[1, 2, 4, -1], [0, 2, 3, 4]]
    assert torch.equal(column_mask(columns, ids.shape[1]), ids == 9)
    with pytest.raises(ValueError, match="holds no video placeholder"):
        placeholder_columns(torch.tensor([[1, 9], [1, 2]]), 9)
