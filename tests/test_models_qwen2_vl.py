"""ustc.attach on Qwen2-VL (tiny random models of the real transformers class).

The battery of tests/test_models_qwen2_5_vl.py on Qwen2-VL, whose adapter is Qwen2.5-VL's less
the window permutation: every vision block attends over a whole frame pair and the patches stay
in (t, h, w) order, so the Eq. (1) scores of a merged token are the mean over its 2 x 2 patches
with no reordering (the reference below checks the order against the model's own merger output).
"""

import sys

import pytest
import torch
from models_helpers import qwen_video_inputs, reference_logits, tiny_qwen2_vl, video_features

from ustc import CompressionConfig, Compressor
from ustc.models import Qwen2VLHandle, attach

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
    model = tiny_qwen2_vl(attn=attn, layers=3)
    inputs = qwen_video_inputs(model, batch=2)
    with torch.no_grad():
        before = model(**inputs.kwargs).logits
    plain = generate(model, inputs)
    count = hooks(model)  # transformers may add hooks of its own on the first forward
    handle = attach(model, config)
    assert isinstance(handle, Qwen2VLHandle) and hooks(model) > count
    with torch.no_grad():
        during = model(**inputs.kwargs).logits
    hooked = generate(model, inputs)
    assert handle.stats.prefills == 2 and handle.stats.tokens_in == 32
    handle.remove()
    with torch.no_grad():
        after = model(**inputs.kwargs).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert torch.equal(plain.sequences, hooked.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, hooked.logits, strict=True))
    assert hooks(model) == count and "get_video_features" not in model.model.__dict__


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_token_counts_come_from_the_kv_cache(attn):
    model = tiny_qwen2_vl(attn=attn, layers=3)
    inputs = qwen_video_inputs(model, frames=4)  # 2 temporal patch pairs of 4 x 4 tokens
    assert (inputs.frames, inputs.tokens_per_frame) == (2, 16)
    n = inputs.input_ids.shape[1]
    handle = attach(model, ON)
    out = generate(model, inputs, steps=5)
    handle.remove()
    budget = ON.budget(2, 16)
    kept = ON.kept_after_merge(budget)
    entering = n - 32 + budget
    after_k = entering - budget + kept
    assert cache_lengths(out.past_key_values) == [entering + 4] + [after_k + 4] * 2
    assert (handle.stats.tokens_in, handle.stats.tokens_after_merge) == (budget, kept)
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
    model = tiny_qwen2_vl(attn=attn, layers=3)
    inputs = qwen_video_inputs(model, batch=batch)
    config = ON.replace(merger=merger)
    handle = attach(model, config)
    out = generate(model, inputs, steps=6)
    handle.remove()
    expected = reference_logits(model, inputs, out.sequences, handle.last, config)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=2e-5, rtol=1e-5)


def test_kept_tokens_keep_their_uncompressed_mrope_positions():
    model = tiny_qwen2_vl()
    inputs = qwen_video_inputs(model)
    handle = attach(model, ON.replace(merger="none"))
    seen = []
    probe = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["position_ids"]), with_kwargs=True
    )
    generate(model, inputs, steps=2)
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
    assert torch.equal(seen[1][-3:, 0, 0], full[:, 0, -1] + 1)


def _reference_vision_scores(model, inputs, block_index):
    """Eq. (1) from transformers' eager attention of one vision block, per frame pair, averaged
    over the merger's 2 x 2 groups; the order is checked against the model's own merger output."""
    visual = model.model.visual
    block = visual.blocks[block_index]
    captured = {}
    hooks_ = [
        block.attn.register_forward_pre_hook(
            lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True
        ),
        block.attn.register_forward_hook(lambda m, a, o: captured.update(out=o)),
    ]
    kw = inputs.kwargs
    with torch.no_grad():
        out = visual(kw["pixel_values_videos"], grid_thw=kw["video_grid_thw"])
    for hook in hooks_:
        hook.remove()
    module = sys.modules[type(block.attn).__module__]
    hidden = captured["args"][0] if captured["args"] else captured["kwargs"]["hidden_states"]
    cu = captured["kwargs"]["cu_seqlens"].tolist()
    cos, sin = captured["kwargs"]["position_embeddings"]
    s = hidden.shape[0]
    unit = visual.spatial_merge_size**2
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
        # no window permutation: merged group i of the tower is feature i of the model
        assert torch.equal(out.pooler_output, visual.merger(out.last_hidden_state))
    assert len(cu) - 1 == int(inputs.kwargs["video_grid_thw"][:, 0].sum())  # one per frame pair
    return received.view(-1, unit).mean(dim=-1)


@pytest.mark.parametrize("block", [-1, 0], ids=["last-block", "first-block"])
def test_vision_scores_equal_eager_attention_maps(block):
    eager = tiny_qwen2_vl(attn="eager")
    model = tiny_qwen2_vl(attn="sdpa")
    inputs = qwen_video_inputs(model, frames=4, height=40, width=32, batch=2)
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


def test_unsupported_inputs_raise_clear_errors():
    model = tiny_qwen2_vl()
    inputs = qwen_video_inputs(model, batch=2)
    handle = attach(model, ON)
    no_types = {k: v for k, v in inputs.kwargs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="Qwen2VLForConditionalGeneration needs mm_token_type"):
        model(**no_types)
    grids = dict(inputs.kwargs, video_grid_thw=inputs.kwargs["video_grid_thw"][:1])
    with pytest.raises(ValueError, match="1 videos for 2 prompts"):
        model(**grids)
    handle.remove()
    with pytest.raises(ValueError, match="vision_layer must be in"):
        attach(model, ON, vision_layer=5)
