"""ustc.attach on LLaVA-NeXT-Video: what is this family's own.

The battery every backbone runs is tests/test_backbones.py.  Here: CLIP has a CLS token, so
Eq. (1) is the CLS row of the attention of the layer that gives the features (``hidden_states
[-2]``), checked against CLIP's eager attention maps pushed through the model's own 2 x 2 average
pooling; the prompt holds F*P video placeholders with no newline; the errors of this layout.
"""

import pytest
import torch
from models_helpers import llava_video_inputs, tiny_llava_next_video, video_features
from test_backbones import BACKBONES, check_vision_scores

from ustc import CompressionConfig
from ustc.models import attach

torch.set_num_threads(1)

LLAVA_NEXT_VIDEO = next(b for b in BACKBONES if b.name == "llava-next-video")

ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)


def test_prompt_layout_is_f_times_p_placeholders_without_newline():
    model = tiny_llava_next_video()
    inputs = llava_video_inputs(model, frames=3)
    assert (inputs.tokens_per_frame, inputs.newline) == (16, False)
    assert int((inputs.input_ids == model.config.video_token_id).sum()) == 3 * 16
    assert video_features(model, inputs).shape == (1, 3, 16, 64)


def _reference_vision_scores(model, inputs, layer):
    """Eq. (1) with a CLS token from CLIP's eager attention maps: the head-averaged CLS row
    without its own column, then the 2 x 2 average pooling of the resampler, by hand."""
    pixels = inputs.kwargs["pixel_values_videos"]
    b, f = pixels.shape[:2]
    with torch.no_grad():
        maps = model.model.vision_tower(pixels.flatten(0, 1), output_attentions=True).attentions
    row = maps[layer].double().mean(dim=1)[:, 0, 1:]  # (B*F, g*g)
    grid = int(row.shape[-1] ** 0.5)
    pooled = row.view(b * f, grid // 2, 2, grid // 2, 2).mean(dim=(2, 4))
    return pooled.reshape(b, f, -1)


def test_vision_scores_equal_eager_cls_attention_maps():
    config = ON.replace(retention=0.1, merger="none")
    handle = check_vision_scores(
        LLAVA_NEXT_VIDEO, _reference_vision_scores, 1, config=config, atol=1e-6, frames=2
    )
    assert handle.vision_layer == 1  # hidden_states[-2] of 3 layers is the output of layer 1
    # not the last layer's map, and not the mean attention received (the encoders without CLS)
    last = _reference_vision_scores(handle.eager, handle.inputs, layer=-1)
    assert (handle.last.vision_scores.double() - last).abs().max() > 1e-4


def test_vision_layer_option_selects_another_encoder_layer():
    check_vision_scores(LLAVA_NEXT_VIDEO, _reference_vision_scores, 0, 0, atol=1e-6, frames=2)


def test_unsupported_inputs_raise_clear_errors():
    model = tiny_llava_next_video()
    inputs = llava_video_inputs(model, batch=2)
    with pytest.raises(ValueError, match="vision_layer must be in"):
        attach(model, ON, vision_layer=3)
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="only the 'default' strategy"):
        attach(model, ON)
    model.config.vision_feature_select_strategy = "default"
    handle = attach(model, ON)
    one_video = dict(inputs.kwargs, pixel_values_videos=inputs.kwargs["pixel_values_videos"][:1])
    with pytest.raises(ValueError, match="1 videos for 2 prompts"):
        model(**one_video)
    fewer = dict(inputs.kwargs, pixel_values_videos=inputs.kwargs["pixel_values_videos"][:, :3])
    with pytest.raises(ValueError, match=r"do not make F\*P with F = 3 frames of P = 16"):
        model(**fewer)
    handle.remove()
