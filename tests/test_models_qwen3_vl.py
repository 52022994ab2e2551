"""ustc.attach on Qwen3-VL and Qwen3-VL-MoE: what is this family's own.

The battery every backbone runs is tests/test_backbones.py (the video as one run of placeholders
per frame pair with timestamp text between, M-RoPE positions kept from the uncompressed prompt,
per-head q/k norms in Eq. 5 are covered there).  Here: the DeepStack levels (added after decoder
layers 0 and 1 of the tiny model) follow the compression and the merge at layer K, for K before,
among and after the DeepStack layers; Eq. (1) from a tower that is not window-permuted; the MoE
class through the battery's checks; the errors, and the placeholder columns of several runs.
"""

from dataclasses import replace

import pytest
import torch
from models_helpers import (
    compressed_levels,
    qwen3_video_inputs,
    reference_group_mean,
    reference_logits,
    tiny_qwen3_vl,
    video_features,
)
from test_backbones import (
    BACKBONES,
    check_decode_matches_a_no_cache_recompute,
    check_off_is_bit_identical_and_remove_restores,
    check_token_counts_come_from_the_kv_cache,
)

from ustc import CompressionConfig
from ustc.models import attach

QWEN3_VL = next(b for b in BACKBONES if b.name == "qwen3-vl")
#: Qwen3-VL-MoE: the same spec with the MoE class
QWEN3_VL_MOE = replace(
    QWEN3_VL,
    name="qwen3-vl-moe",
    build=lambda attn="sdpa", **kw: tiny_qwen3_vl(attn=attn, moe=True, **kw),
)

torch.set_num_threads(1)

ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)


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


def test_unsupported_inputs_raise_clear_errors():
    model = tiny_qwen3_vl()
    inputs = qwen3_video_inputs(model, batch=2)
    handle = attach(model, ON)
    small = dict(inputs.kwargs, video_grid_thw=torch.tensor([[2, 8, 4]] * 2))
    with pytest.raises(ValueError, match="32 video placeholders for a grid of 2 x 4 x 2"):
        model(**small)
    handle.remove()
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


@pytest.mark.parametrize(
    "attn,merger,layer,batch",
    [
        ("sdpa", "text-aware", 1, 1),  # K among the DeepStack layers: level 1 is merged
        ("sdpa", "last-token", 0, 2),  # both levels merged
        ("sdpa", "text-aware", 2, 2),  # K after the DeepStack layers
    ],
)
def test_deepstack_levels_reach_the_decode_steps(attn, merger, layer, batch):
    """Every decode step equals the no-cache recompute that adds the compressed (and, from K
    on, merged) DeepStack levels; the recompute without them is far: they were really added."""
    config = ON.replace(merger=merger, layer=layer)
    model = QWEN3_VL.model(attn)
    inputs, out, handle = check_decode_matches_a_no_cache_recompute(
        QWEN3_VL, attn, config, batch, model=model
    )
    plain = reference_logits(model, inputs, out.sequences, handle.last, config)
    assert (torch.stack(out.logits, 1) - plain).abs().max() > 1e-3


def test_moe_class_bit_identical_off_and_decode_matches_recompute():
    assert type(QWEN3_VL_MOE.model()).__name__ == "Qwen3VLMoeForConditionalGeneration"
    check_off_is_bit_identical_and_remove_restores(QWEN3_VL_MOE, "r1-no-merger", "sdpa")
    check_decode_matches_a_no_cache_recompute(QWEN3_VL_MOE, "sdpa", ON, batch=2, steps=4)
    check_token_counts_come_from_the_kv_cache(QWEN3_VL_MOE, "sdpa")
