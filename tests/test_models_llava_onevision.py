"""ustc.attach on LLaVA-OneVision / LLaVA-Video: what is this family's own.

The battery every backbone runs is tests/test_backbones.py.  Here: Eq. (1) vision scores against
the eager attention maps of SigLIP (mean attention received, no CLS), pooled by hand with the
model's bilinear interpolation, at LLaVA-OneVision's and LLaVA-Video's grids; the recompute
check failing when the kept tokens are renumbered; decoding by hand under either cache keyword
with and without masks; and the errors of this layout (one video run, an image_newline).
"""

import inspect
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from models_helpers import (
    VIDEO_TOKEN,
    llava_video_inputs,
    reference_logits,
    tiny_llava_onevision,
)
from test_backbones import BACKBONES, check_vision_scores, generate

from ustc import CompressionConfig
from ustc.models import attach
from ustc.models.compat import CACHE_NAMES

torch.set_num_threads(1)

LLAVA_ONEVISION = next(b for b in BACKBONES if b.name == "llava-onevision")

ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)


def _reference_vision_scores(model, inputs, layer):
    """Eq. (1) from eager SigLIP attention maps, then bilinear pooling by hand."""
    pixels = inputs.kwargs["pixel_values_videos"]
    b, f = pixels.shape[:2]
    with torch.no_grad():
        maps = model.model.vision_tower(pixels.flatten(0, 1), output_attentions=True).attentions
    a = maps[layer].double().mean(dim=1)  # (B*F, N, N), averaged over heads
    n = a.shape[-1]
    received = (a.sum(dim=1) - a.diagonal(dim1=1, dim2=2)) / (n - 1)  # mean over i != j
    grid = int(math.isqrt(n))
    pooled = F.interpolate(
        received.view(b * f, 1, grid, grid),
        size=(math.ceil(grid / 2), math.ceil(grid / 2)),
        mode="bilinear",
        align_corners=False,
    )
    return pooled.reshape(b, f, -1)


@pytest.mark.parametrize(
    "image_size,patch,per_frame", [(28, 4, 16), (52, 2, 169)], ids=["onevision", "llava-video"]
)
def test_vision_scores_equal_eager_attention_maps(image_size, patch, per_frame):
    config = ON.replace(retention=0.05, merger="none")
    build = {"image_size": image_size, "patch_size": patch, "layers": 2}
    handle = check_vision_scores(
        LLAVA_ONEVISION, _reference_vision_scores, -1, config=config, build=build, frames=2
    )
    assert handle.inputs.tokens_per_frame == per_frame
    assert handle.stats.tokens_in == config.budget(2, per_frame)


def test_vision_layer_option_selects_another_encoder_layer():
    check_vision_scores(LLAVA_ONEVISION, _reference_vision_scores, 0, 0, frames=2)


def _packed_positions_logits(model, inputs, out, last):
    lm = model.model.language_model
    n = inputs.input_ids.shape[1]
    fed = out.sequences[:, : out.sequences.shape[1] - 1]
    with torch.no_grad():
        x = lm.embed_tokens(fed)
        start, end = inputs.video_start, inputs.video_start + inputs.frames * 16
        x[:, end] = model.model.image_newline
        x = torch.cat([x[:, :start], last.compression.tokens, x[:, end:]], dim=1)
        hidden = lm(inputs_embeds=x, use_cache=False).last_hidden_state
        return model.lm_head(hidden)[:, -(out.sequences.shape[1] - n) :]


def _cache_keywords(model):
    """The keywords the installed transformers takes the KV cache by: ``cache`` (>= 5.24, which
    still accepts the deprecated ``past_key_values``) or ``past_key_values`` (older releases)."""
    declared = inspect.signature(model.forward).parameters
    return [name for name in CACHE_NAMES if name in declared] + (
        ["past_key_values"] if "past_key_values" not in declared else []
    )


@pytest.mark.parametrize("keyword", CACHE_NAMES)
def test_manual_decoding_without_generate_matches_generate(keyword):
    model = tiny_llava_onevision(layers=3)
    if keyword not in _cache_keywords(model):
        pytest.skip(f"this transformers takes no {keyword}= keyword")
    inputs = llava_video_inputs(model)
    handle = attach(model, ON)
    out = generate(model, inputs.kwargs, steps=4)
    ids, mask = inputs.input_ids, inputs.kwargs["attention_mask"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # past_key_values= is deprecated in 5.24
        step = model(**inputs.kwargs, use_cache=True)
        logits = [step.logits[:, -1]]
        cache = step.past_key_values
        for t in range(3):
            token = out.sequences[:, ids.shape[1] + t : ids.shape[1] + t + 1]
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            # alternately with the full-length mask and with no mask and no positions at all
            extra = {"attention_mask": mask} if t % 2 == 0 else {}
            step = model(input_ids=token, use_cache=True, **{keyword: cache}, **extra)
            logits.append(step.logits[:, -1])
    handle.remove()
    torch.testing.assert_close(
        torch.stack(logits, 1), torch.stack(out.logits, 1), atol=1e-5, rtol=0
    )


def test_a_layer_argument_of_unknown_form_fails_naming_the_transformers_release():
    import transformers

    model = tiny_llava_onevision(attn="eager", layers=3)
    inputs = llava_video_inputs(model)
    layer = model.model.language_model.layers[ON.layer]

    def as_mapping(module, args, kwargs):  # a future release passing per-type masks
        return args, dict(kwargs, attention_mask={"full_attention": kwargs["attention_mask"]})

    probe = layer.register_forward_pre_hook(as_mapping, with_kwargs=True)
    handle = attach(model, ON)  # its layer hook runs after the probe
    with pytest.raises(ValueError, match=f"transformers {transformers.__version__}"):
        with torch.no_grad():
            model(**inputs.kwargs)
    handle.remove()
    probe.remove()


def test_unsupported_inputs_raise_clear_errors():
    model = tiny_llava_onevision()
    inputs = llava_video_inputs(model, batch=2)
    with pytest.raises(ValueError, match="layer K=9 is past the last decoder layer"):
        attach(model, ON.replace(layer=9))
    with pytest.raises(ValueError, match="no ustc adapter for Qwen2ForCausalLM"):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        text = Qwen2Config(
            num_hidden_layers=1,
            hidden_size=16,
            intermediate_size=16,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=32,
        )
        attach(Qwen2ForCausalLM(text), ON)
    handle = attach(model, ON)
    # padding is supported, but not over the video, and the mask must be a 2-D tensor
    padded = dict(inputs.kwargs, attention_mask=inputs.kwargs["attention_mask"].clone())
    padded["attention_mask"][1, inputs.video_start + 3] = 0
    with pytest.raises(ValueError, match="masks video placeholders"):
        model(**padded)
    as_dict = dict(
        inputs.kwargs, attention_mask={"full_attention": inputs.kwargs["attention_mask"]}
    )
    with pytest.raises(ValueError, match=r"2-D \(B, n\) padding mask.*got a dict"):
        model(**as_dict)
    two_videos = dict(inputs.kwargs, input_ids=inputs.input_ids.clone())
    two_videos["input_ids"][0, inputs.video_start + 5] = 7  # the run is cut in two
    two_videos["input_ids"][0, 0] = VIDEO_TOKEN
    with pytest.raises(ValueError, match="several runs"):
        model(**two_videos)
    one_video = dict(inputs.kwargs, pixel_values_videos=inputs.kwargs["pixel_values_videos"][:1])
    with pytest.raises(ValueError, match="1 videos for 2 prompts"):
        model(**one_video)
    with pytest.raises(ValueError, match="images mixed with a video"):
        model(**inputs.kwargs, pixel_values=torch.zeros(2, 1, 3, 28, 28), image_sizes=None)
    no_text = llava_video_inputs(model, suffix=0)
    with pytest.raises(ValueError, match="needs text"):
        model(**no_text.kwargs)
    with pytest.raises(ValueError, match="only DynamicCache"):
        model.generate(**inputs.kwargs, max_new_tokens=2, cache_implementation="static")
    handle.remove()
    assert int((inputs.input_ids == VIDEO_TOKEN).sum()) == 2 * (4 * 16 + 1)


def test_a_recompute_with_the_kept_tokens_renumbered_differs():
    """The decode check of the battery can fail: the same recompute with the kept tokens
    renumbered 0..n'-1 (positions packed instead of kept) is far from what the model generated."""
    model = tiny_llava_onevision(layers=3)
    inputs = llava_video_inputs(model)
    handle = attach(model, ON)
    out = generate(model, inputs.kwargs, steps=6)
    handle.remove()
    logits = torch.stack(out.logits, dim=1)
    expected = reference_logits(model, inputs, out.sequences, handle.last, ON)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-5)
    assert (logits - _packed_positions_logits(model, inputs, out, handle.last)).abs().max() > 1e-3
