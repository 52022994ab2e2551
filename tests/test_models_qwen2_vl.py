"""ustc.attach on Qwen2-VL: what is this family's own.

The battery every backbone runs is tests/test_backbones.py.  Qwen2-VL's adapter is Qwen2.5-VL's
less the window permutation: every vision block attends over a whole frame pair and the patches
stay in (t, h, w) order, so the Eq. (1) scores of a merged token are the mean over its 2 x 2
patches with no reordering (the reference checks the order against the model's own merger
output); the errors name the class.
"""

import pytest
import torch
from models_helpers import eager_vision_block, qwen_video_inputs, tiny_qwen2_vl
from test_backbones import BACKBONES, check_vision_scores

from ustc import CompressionConfig
from ustc.models import attach

torch.set_num_threads(1)

QWEN2_VL = next(b for b in BACKBONES if b.name == "qwen2-vl")

ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)


@pytest.mark.parametrize("block", [-1, 0], ids=["last-block", "first-block"])
def test_vision_scores_equal_eager_attention_maps(block):
    check_vision_scores(QWEN2_VL, _reference_vision_scores, block, block, height=40, width=32)


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


def _reference_vision_scores(model, inputs, block_index):
    """Eq. (1) from transformers' eager attention of one vision block, per frame pair, averaged
    over the merger's 2 x 2 groups; the order is checked against the model's own merger output."""
    visual = model.model.visual
    received, out, segments = eager_vision_block(model, inputs, block_index)
    with torch.no_grad():  # no window permutation: merged group i of the tower is feature i
        assert torch.equal(out.pooler_output, visual.merger(out.last_hidden_state))
    assert segments == int(inputs.kwargs["video_grid_thw"][:, 0].sum())  # one per frame pair
    return received.view(-1, visual.spatial_merge_size**2).mean(dim=-1)
