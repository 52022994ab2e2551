"""ustc.attach on Qwen3.5 and Qwen3.5-MoE (tiny random models of the real transformers classes).

Qwen3.5 keeps Qwen3-VL's video path (timestamps between per-frame placeholder runs, M-RoPE, the
same vision tower without DeepStack) in front of a hybrid LLM: Gated DeltaNet layers with a
recurrent state (no per-token KV cache) and full-attention layers.  What is specific here: only
the full-attention layers hold a KV cache to count, the merge at layer K must be at a
full-attention layer, and the no-cache recompute runs the recurrent layers over the whole
compressed sequence.
"""

import pytest
import torch
from models_helpers import qwen3_video_inputs, reference_logits, tiny_qwen3_5
from test_models_qwen3_vl import _reference_vision_scores

from ustc import CompressionConfig
from ustc.models import attach

torch.set_num_threads(1)

ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)
ATTENTION_LAYERS = [1, 3]


def generate(model, inputs, steps=4):
    with torch.no_grad():
        return model.generate(
            **inputs.kwargs, max_new_tokens=steps, return_dict_in_generate=True, output_logits=True
        )


@pytest.mark.parametrize(
    "config",
    [
        CompressionConfig(retention=1.0, merger="none"),
        CompressionConfig(retention=1.0, merger="text-aware", layer=4),
    ],
    ids=["r1-no-merger", "r1-text-aware-K=L"],
)
def test_compression_off_is_bit_identical(config):
    model = tiny_qwen3_5()
    inputs = qwen3_video_inputs(model, batch=2)
    plain = generate(model, inputs)
    handle = attach(model, config)
    hooked = generate(model, inputs)
    handle.remove()
    after = generate(model, inputs)
    assert torch.equal(plain.sequences, hooked.sequences)
    for a, b, c in zip(plain.logits, hooked.logits, after.logits, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert "get_video_features" not in model.model.__dict__


@pytest.mark.parametrize(
    "attn,config",
    [
        ("sdpa", ON.replace(merger="none")),
        ("sdpa", ON),
        ("eager", ON.replace(merger="last-token", layer=3)),
    ],
    ids=["no-merger", "text-aware-K=1", "last-token-K=3-eager"],
)
def test_every_decode_step_matches_a_no_cache_recompute_and_counts(attn, config):
    model = tiny_qwen3_5(attn=attn)
    inputs = qwen3_video_inputs(model, batch=2)
    handle = attach(model, config)
    out = generate(model, inputs, steps=5)
    handle.remove()
    expected = reference_logits(model, inputs, out.sequences, handle.last, config)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=2e-5, rtol=1e-5)
    # only the full-attention layers hold keys: the budget before K, the kept count after it
    n = inputs.input_ids.shape[1]
    budget = config.budget(inputs.frames, inputs.tokens_per_frame)
    entering = n - inputs.frames * inputs.tokens_per_frame + budget
    kept = entering - budget + handle.stats.tokens_after_merge
    lengths = {
        i: layer.keys.shape[-2]
        for i, layer in enumerate(out.past_key_values.layers)
        if getattr(layer, "keys", None) is not None
    }
    merged = config.merger != "none"
    assert lengths == {
        i: (kept if merged and i >= config.layer else entering) + 4 for i in ATTENTION_LAYERS
    }
    assert handle.stats.tokens_in == budget
    if merged:
        assert handle.stats.tokens_after_merge == config.kept_after_merge(budget)


def test_vision_scores_equal_eager_attention_maps():
    eager = tiny_qwen3_5(attn="eager")
    model = tiny_qwen3_5(attn="sdpa")
    inputs = qwen3_video_inputs(model, batch=2)
    handle = attach(model, ON.replace(merger="none"))
    with torch.no_grad():
        model(**inputs.kwargs)
    handle.remove()
    expected = _reference_vision_scores(eager, inputs, -1).reshape(2, inputs.frames, -1)
    torch.testing.assert_close(handle.last.vision_scores.double(), expected, atol=1e-5, rtol=0)


def test_merge_at_a_recurrent_layer_is_refused():
    model = tiny_qwen3_5()
    with pytest.raises(ValueError, match=r"K=2 is a linear_attention layer.*\[1, 3\] or 4"):
        attach(model, ON.replace(layer=2))
    attach(model, ON.replace(layer=2, merger="none")).remove()  # no merge: any K


def test_moe_class_decode_matches_a_no_cache_recompute():
    model = tiny_qwen3_5(moe=True)
    assert type(model).__name__ == "Qwen3_5MoeForConditionalGeneration"
    inputs = qwen3_video_inputs(model, batch=2)
    handle = attach(model, ON)
    out = generate(model, inputs)
    handle.remove()
    expected = reference_logits(model, inputs, out.sequences, handle.last, ON)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=2e-5, rtol=1e-5)
