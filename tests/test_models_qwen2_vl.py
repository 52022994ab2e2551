"""ustc.attach on Qwen2-VL: what is this family's own.

The battery every backbone runs is tests/test_backbones.py.  Qwen2-VL's adapter is Qwen2.5-VL's
less the window permutation: every vision block attends over a whole frame pair and the patches
stay in (t, h, w) order, so the Eq. (1) scores of a merged token are the mean over its 2 x 2
patches with no reordering (``models_helpers.qwen_vision_reference``, which the battery runs,
checks the order against the model's own merger output).  Here: the errors name the class.
"""

import pytest
import torch
from models_helpers import qwen_video_inputs, tiny_qwen2_vl

from ustc import CompressionConfig
from ustc.models import attach

torch.set_num_threads(1)


ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)


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
