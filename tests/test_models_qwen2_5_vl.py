"""ustc.attach on Qwen2.5-VL: what is this family's own.

The battery every backbone runs is tests/test_backbones.py.  Here: Eq. (1) scores read in the
vision tower's window-permuted order, per attention segment, over the 2 x 2 patch groups of the
merger, against eager attention maps; rows of a padded batch whose videos differ in size keep
different numbers of tokens; the errors of M-RoPE inputs.
"""

import pytest
import torch
from models_helpers import (
    pad_batch,
    qwen_video_inputs,
    tiny_qwen2_5_vl,
)
from test_backbones import QWEN_ROWS, generate

from ustc import CompressionConfig
from ustc.models import attach

torch.set_num_threads(1)


ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)


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


def test_rows_with_videos_of_different_sizes_keep_different_numbers_of_tokens():
    model = tiny_qwen2_5_vl(layers=3)
    rows = [qwen_video_inputs(model, **row) for row in QWEN_ROWS]
    handle = attach(model, ON)
    generate(model, pad_batch(rows, "left"))
    groups = handle.last.groups
    handle.remove()
    sizes = {(g.frames, g.tokens_per_frame): g.rows.tolist() for g in groups}
    assert sizes == {(2, 16): [0], (2, 24): [1], (1, 16): [2]}
    counts = [int((handle.last.input_positions[i] >= 0).sum()) for i in range(3)]
    assert len(set(counts)) > 1  # padded to the longest, masked
