"""ustc.attach on Qwen2.5-VL: what is this family's own.

The battery every backbone runs is tests/test_backbones.py.  Here: Eq. (1) scores read in the
vision tower's window-permuted order, per attention segment, over the 2 x 2 patch groups of the
merger, against eager attention maps; rows of a padded batch whose videos differ in size keep
different numbers of tokens; the errors of M-RoPE inputs.
"""

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
