"""ustc.attach on GLM-4.1V and GLM-4.5V (tiny random models of the real transformers classes).

The battery (tests/test_backbones.py, specs "glm4.1v" and "glm4.5v-moe") runs every common
check; this file keeps what is GLM's own.  A video's placeholders
are the *image* token, one run per frame pair, each followed by ``<|end_of_image|>`` and its
timestamp; the LLM's rotary embedding is partial and interleaved; GLM-4.5V's LLM is a MoE.  The
inputs come from the real ``Glm4vProcessor`` (its video processor needs torchvision; without it
``glm4v_inputs`` lays them out by hand as the processor does, and ``test_the_hand_layout_is_the
_processors`` checks that where both run).

``tiny_glm4v`` and ``glm4v_inputs`` live in tests/models_helpers.py; ``glm4v_processor`` builds
the real processor and ``processor_inputs`` runs it.
"""

import numpy as np
import pytest
import torch
from models_helpers import (
    IMAGE_END,
    IMAGE_TOKEN,
    SPECIALS_GLM4V,
    VIDEO_END,
    check_processor_inputs_decode_as_the_reference,
    glm4v_inputs,
    glm4v_layout,
    tiny_glm4v,
)
from processor_helpers import needs_torchvision, tiny_tokenizer
from transformers import Glm4vConfig, Glm4vForConditionalGeneration

from ustc import CompressionConfig
from ustc.models import attach

torch.set_num_threads(1)

ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)

# ------------------------------------------------------------------------------ the real processor


def glm4v_processor(sample_frames=False):
    """The real ``Glm4vProcessor``: its PIL image processor, its video processor (patch 4, frames
    kept at 32 x 32 .. 48 x 48 px; its own sampling by fps, on in the checkpoints, only with
    ``sample_frames``) and the tiny tokenizer."""
    from transformers import Glm4vImageProcessorPil, Glm4vProcessor, Glm4vVideoProcessor

    pixels = 48 * 48 * 8
    video = Glm4vVideoProcessor(
        patch_size=4,
        size={"shortest_edge": 32 * 32, "longest_edge": pixels},
        max_image_size={"longest_edge": pixels},
        do_sample_frames=sample_frames,
    )
    return Glm4vProcessor(
        image_processor=Glm4vImageProcessorPil(patch_size=4),
        tokenizer=tiny_tokenizer(SPECIALS_GLM4V),
        video_processor=video,
        chat_template=CHAT_TEMPLATE,
    )


#: a minimal chat template (the checkpoint's wraps the video marker the same way)
CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'video' %}"
    "<|begin_of_video|><|video|><|end_of_video|> {% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endfor %}"
)


def _prompt(prefix, suffix, seed):
    """Question words around the processor's video marker."""
    g = np.random.default_rng(seed)
    words = ["what", "is", "the", "colour", "?"]
    before = " ".join(g.choice(words, prefix))
    after = " ".join(g.choice(words, suffix))
    return f"{before} <|begin_of_video|><|video|><|end_of_video|> {after}"


def _frames(frames, height, width, seed):
    return (np.random.default_rng(seed).random((frames, height, width, 3)) * 255).astype(np.uint8)


def processor_inputs(processor, frames=4, height=32, width=32, prefix=5, suffix=7, seed=1):
    """One prompt through the real processor: (1, n) inputs and the layout the tests read."""
    from transformers.video_utils import VideoMetadata

    meta = VideoMetadata(total_num_frames=frames, fps=2, frames_indices=list(range(frames)))
    out = processor(
        text=[_prompt(prefix, suffix, seed)],
        videos=[_frames(frames, height, width, seed)],
        video_metadata=[meta],
        return_tensors="pt",
    )
    kwargs = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    return glm4v_layout(kwargs, processor.video_processor.merge_size)


@needs_torchvision
def test_the_hand_layout_is_the_processors():
    """The real processor's ids, token types and grid for a 4-frame 32 x 32 video are those
    ``glm4v_inputs`` writes (its pixels are the processor's normalised patches, not compared)."""
    model = tiny_glm4v()
    real = processor_inputs(glm4v_processor(), prefix=3, suffix=4)
    hand = glm4v_inputs(model, prefix=3, suffix=4)
    ids, want = real.input_ids, hand.input_ids
    text = torch.isin(want, torch.tensor(list(SPECIALS_GLM4V.values()) + [1, 2]))
    assert ids.shape == want.shape and torch.equal(ids[text], want[text])
    for key in ("video_grid_thw", "mm_token_type_ids"):
        assert torch.equal(real.kwargs[key], hand.kwargs[key])
    assert real.kwargs["pixel_values_videos"].shape == hand.kwargs["pixel_values_videos"].shape
    assert (real.frames, real.tokens_per_frame) == (2, 16)


@needs_torchvision
@pytest.mark.parametrize("moe", [False, True], ids=["glm4.1v", "glm4.5v-moe"])
def test_real_processor_inputs_compress_and_decode_as_the_reference(moe):
    """The battery's core on the real processor's output: compression off is bit-identical,
    and with compression every decode step equals a no-cache recompute."""
    model = tiny_glm4v(moe=moe)
    inputs = processor_inputs(glm4v_processor(), frames=4, height=32, width=48)
    check_processor_inputs_decode_as_the_reference(model, inputs, ON, ON.budget(2, 24))


def test_trailing_tokens_are_the_fewest_over_the_rows():
    """After the last run: <|end_of_image|>, the timestamp's digits, <|end_of_video|>; rows
    whose timestamps differ in length count the shortest; a row without <|end_of_video|>: 0."""
    model = tiny_glm4v(layers=1)
    handle = attach(model, ON.replace(merger="none"))
    v, e, end = IMAGE_TOKEN, IMAGE_END, VIDEO_END
    ids = torch.tensor([[7, v, v, e, 2, 3, end, 8], [7, v, v, e, 2, end, 8, 8]])
    last = torch.tensor([2, 2])
    assert handle.trailing(ids, last) == 3
    assert handle.trailing(ids[:1], last[:1]) == 4
    assert handle.trailing(torch.tensor([[7, v, v, e, 2, 8]]), last[:1]) == 0
    handle.remove()


def test_unsupported_inputs_raise_clear_errors():
    model = tiny_glm4v()
    inputs = glm4v_inputs(model, batch=2)
    handle = attach(model, ON)
    no_types = {k: v for k, v in inputs.kwargs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**no_types)
    small = dict(inputs.kwargs, video_grid_thw=torch.tensor([[2, 8, 4]] * 2))
    with pytest.raises(ValueError, match="32 video placeholders for a grid of 2 x 4 x 2.*image"):
        model(**small)
    handle.remove()
    with pytest.raises(ValueError, match="vision_layer must be in"):
        attach(model, ON, vision_layer=5)


# ------------------------------------------------------------------------ FLOPs and lmms-eval
def test_flops_spec_is_the_glm4v_text_config_and_counts_what_is_measured():
    """The built-in ``glm-4.1v-9b`` spec is transformers' Glm4vTextConfig defaults (GLM-4-9B),
    and on a tiny GLM-4V language model the exact count equals fvcore and FlopCounterMode."""
    from test_flops import GENERATED, TINY_TEXT, FullRun, _assert_close, _measure

    from ustc.flops import MODEL_SPECS, ModelSpec, TokenSchedule, exact

    spec = MODEL_SPECS["glm-4.1v-9b"]
    public = ModelSpec.from_config(
        Glm4vConfig(), name="glm-4.1v-9b", frames=16, tokens_per_frame=256
    )
    assert public == spec and (spec.head_dim, spec.kv_dim) == (128, 256)
    torch.manual_seed(0)
    config = Glm4vConfig(
        text_config=dict(
            **TINY_TEXT,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [2, 1, 1],
                "partial_rotary_factor": 0.5,
            },
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64
        ),
    )
    config._attn_implementation = config.text_config._attn_implementation = "eager"
    lm = Glm4vForConditionalGeneration(config).eval().model.language_model
    tiny = ModelSpec.from_config(config, frames=4, tokens_per_frame=24)
    schedule = TokenSchedule.from_config(
        CompressionConfig(retention=1.0, merger="none"), tiny, text_tokens=6
    )
    expected = exact(tiny, schedule, GENERATED).total
    fv, tc = _measure(FullRun(lm, GENERATED), torch.randn(1, schedule.tokens[0], 64))
    _assert_close(fv, expected, "fvcore")
    _assert_close(tc, expected, "FlopCounterMode")


def test_lmms_eval_manifest_names_both_glm_classes():
    from ustc.lmms_eval import BACKBONES, manifests

    assert BACKBONES["glm4v_ustc"].model_class == "Glm4vForConditionalGeneration"
    assert BACKBONES["glm4v_moe_ustc"].model_class == "Glm4vMoeForConditionalGeneration"
    pytest.importorskip("lmms_eval")
    ids = {m.model_id: m.simple_class_path for m in manifests()}
    assert ids["glm4v_ustc"] == "ustc.lmms_eval.more_backbones.Glm4vUSTC"
    assert ids["glm4v_moe_ustc"] == "ustc.lmms_eval.more_backbones.Glm4vMoeUSTC"


@needs_torchvision
def test_lmms_eval_model_answers_through_the_real_processor():
    """Through the lmms-eval model with the real processor (sampling by fps on, as the
    checkpoints ship it): the plugin turns that sampling off (lmms-eval gives sampled frames,
    without metadata), and the prompt it builds is compressed as the adapter's tests check."""
    pytest.importorskip("lmms_eval")
    from ustc.lmms_eval import Glm4vUSTC

    processor = glm4v_processor(sample_frames=True)
    lm = Glm4vUSTC(
        model=tiny_glm4v(), processor=processor, max_frames_num=4, retention=0.25, layer=1
    )
    assert processor.video_processor.do_sample_frames is False
    video = (np.random.default_rng(0).random((4, 32, 32, 3)) * 255).astype(np.uint8)
    inputs = lm._inputs("what is the colour ?", [video])
    assert inputs["video_grid_thw"].tolist() == [[2, 8, 8]]
    with torch.no_grad():
        lm.model.generate(**lm._to_device(inputs), max_new_tokens=2)
    assert lm.handle.stats.tokens_in == lm.config.budget(2, 16) < 32
    lm.handle.remove()
