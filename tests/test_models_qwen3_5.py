"""ustc.attach on Qwen3.5 and Qwen3.5-MoE: what is this family's own.

Qwen3.5 keeps Qwen3-VL's video path (timestamps between per-frame placeholder runs, M-RoPE, the
same vision tower without DeepStack) in front of a hybrid LLM: Gated DeltaNet layers with a
recurrent state (no per-token KV cache) and full-attention layers with a gated output.  The
battery (tests/test_backbones.py) runs on it (only the full-attention layers hold a KV cache to
count; the gated attention's queries in Eq. 5).  Here: the merge at layer K must be at a
full-attention layer, a merge at the last one decodes as the no-cache recompute (which runs the
recurrent layers over the whole compressed sequence), Eq. (1), and the MoE class.
"""

from dataclasses import replace

import pytest
import torch
from models_helpers import tiny_qwen3_5
from test_backbones import (
    BACKBONES,
    check_decode_matches_a_no_cache_recompute,
    check_token_counts_come_from_the_kv_cache,
)

from ustc import CompressionConfig
from ustc.models import attach

QWEN3_5 = next(b for b in BACKBONES if b.name == "qwen3.5")
#: Qwen3.5-MoE: the same spec with the MoE class
QWEN3_5_MOE = replace(
    QWEN3_5, name="qwen3.5-moe", build=lambda attn="sdpa", **kw: tiny_qwen3_5(attn=attn, moe=True)
)
ATTENTION_LAYERS = [1, 3]

torch.set_num_threads(1)

ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)


def test_merge_at_a_recurrent_layer_is_refused():
    model = tiny_qwen3_5()
    with pytest.raises(ValueError, match=r"K=2 is a linear_attention layer.*\[1, 3\] or 4"):
        attach(model, ON.replace(layer=2))
    attach(model, ON.replace(layer=2, merger="none")).remove()  # no merge: any K


def test_merge_at_the_last_attention_layer_decodes_as_the_recompute_and_counts():
    config = ON.replace(merger="last-token", layer=3)
    inputs, out, handle = check_decode_matches_a_no_cache_recompute(
        QWEN3_5, "eager", config, batch=2, steps=5
    )
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
    assert lengths == {i: (kept if i >= config.layer else entering) + 4 for i in ATTENTION_LAYERS}
    assert handle.stats.tokens_in == budget
    assert handle.stats.tokens_after_merge == config.kept_after_merge(budget)


def test_moe_class_decode_matches_a_no_cache_recompute():
    assert type(QWEN3_5_MOE.model()).__name__ == "Qwen3_5MoeForConditionalGeneration"
    check_decode_matches_a_no_cache_recompute(QWEN3_5_MOE, "sdpa", ON, batch=2, steps=4)
    check_token_counts_come_from_the_kv_cache(QWEN3_5_MOE, "sdpa")
