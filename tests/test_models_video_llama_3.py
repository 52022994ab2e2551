"""ustc.attach on VideoLLaMA3 (tiny random models of the real transformers class).

The battery (tests/test_backbones.py, spec "videollama3") runs every common check; this file
keeps what is VideoLLaMA3's own.  The video is one run of
placeholders per frame after a ``Time t s:`` label, frames joined by ``,``; the vision tower runs
each frame alone and pools 2 x 2 patches with a bilinear ``pixel_unshuffle``; the LLM (Qwen2)
has 1-D positions; the processor's own differential frame pruning (``video_compression_mask``)
is refused unless it keeps every token.  Inputs come from the real ``VideoLlama3Processor``
(its video processor needs torchvision; without it ``vl3_inputs`` lays them out by hand as the
processor does, and ``test_the_hand_layout_is_the_processors`` checks that where both run).

``tiny_video_llama_3`` and ``vl3_inputs`` live in tests/models_helpers.py; ``vl3_processor``
builds the real processor and ``processor_inputs`` runs it.
"""

import sys

import numpy as np
import pytest
import torch
from models_helpers import (
    IMAGE_TOKEN,
    TEXT_IDS,
    VIDEO_TOKEN,
    check_processor_inputs_decode_as_the_reference,
    tiny_video_llama_3,
    video_features,
    vl3_inputs,
    vl3_layout,
)
from processor_helpers import needs_torchvision, tiny_tokenizer
from transformers import VideoLlama3Config

from ustc import CompressionConfig, Compressor
from ustc.models import attach

torch.set_num_threads(1)

ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)

# ------------------------------------------------------------------------------ the real processor
SPECIALS_VL3 = {"<|image_pad|>": IMAGE_TOKEN, "<|video_pad|>": VIDEO_TOKEN}


def vl3_processor(pruning=False):
    """The real ``VideoLlama3Processor``: its PIL image processor, its video processor (patch 4,
    frames kept at 32 x 32 .. 48 x 48 px; its frame pruning on only with ``pruning``) and the
    tiny tokenizer."""
    from transformers import (
        VideoLlama3ImageProcessorPil,
        VideoLlama3Processor,
        VideoLlama3VideoProcessor,
    )

    video = VideoLlama3VideoProcessor(
        patch_size=4,
        size={"shortest_edge": 32 * 32, "longest_edge": 48 * 48 * 8},
        use_token_compression=pruning,
    )
    return VideoLlama3Processor(
        image_processor=VideoLlama3ImageProcessorPil(patch_size=4),
        tokenizer=tiny_tokenizer(SPECIALS_VL3),
        video_processor=video,
        chat_template=CHAT_TEMPLATE,
    )


#: a minimal chat template (the checkpoint's writes the video marker where the content says)
CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'video' %}"
    "<|video_pad|> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
)


def processor_inputs(processor, frames=4, height=32, width=32, prefix=5, suffix=7, seed=1):
    """One prompt through the real processor (1 fps timestamps): (1, n) inputs and layout."""
    from transformers.video_utils import VideoMetadata

    g = np.random.default_rng(seed)
    words = ["what", "is", "the", "colour", "?"]
    text = f"{' '.join(g.choice(words, prefix))} <|video_pad|> {' '.join(g.choice(words, suffix))}"
    video = (g.random((frames, height, width, 3)) * 255).astype(np.uint8)
    meta = VideoMetadata(total_num_frames=frames, fps=1, frames_indices=list(range(frames)))
    out = processor(text=[text], videos=[video], video_metadata=[meta], return_tensors="pt")
    kwargs = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    return vl3_layout(kwargs)


@needs_torchvision
def test_the_hand_layout_is_the_processors():
    """The real processor's ids, grid, merge sizes and (all-True) mask for a 4-frame 32 x 32
    video with its pruning off are those ``vl3_inputs`` writes."""
    model = tiny_video_llama_3()
    real = processor_inputs(vl3_processor(), prefix=3, suffix=4)
    hand = vl3_inputs(model, prefix=3, suffix=4)
    ids, want = real.input_ids, hand.input_ids
    structure = ~torch.isin(want, torch.arange(*TEXT_IDS))  # labels, commas, placeholders
    assert ids.shape == want.shape and torch.equal(ids[structure], want[structure])
    for key in ("video_grid_thw", "video_merge_sizes", "video_compression_mask"):
        assert torch.equal(real.kwargs[key], hand.kwargs[key]), key
    assert real.kwargs["pixel_values_videos"].shape == hand.kwargs["pixel_values_videos"].shape


@needs_torchvision
def test_real_processor_inputs_compress_and_decode_as_the_reference():
    model = tiny_video_llama_3()
    inputs = processor_inputs(vl3_processor(), frames=4, height=32, width=48)
    check_processor_inputs_decode_as_the_reference(model, inputs, ON, ON.budget(4, 24))


@needs_torchvision
def test_the_processors_own_frame_pruning_is_refused_with_the_switch_named():
    """A static video: the processor's pruning drops the later frames' tokens (fewer
    placeholders, a mask with False); the adapter refuses before the vision tower runs."""
    model = tiny_video_llama_3()
    from transformers.video_utils import VideoMetadata

    video = np.repeat(
        (np.random.default_rng(0).random((1, 32, 32, 3)) * 255).astype(np.uint8), 4, 0
    )
    meta = VideoMetadata(total_num_frames=4, fps=1, frames_indices=[0, 1, 2, 3])
    out = vl3_processor(pruning=True)(
        text=["what <|video_pad|> is"], videos=[video], video_metadata=[meta], return_tensors="pt"
    )
    kwargs = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    assert not bool(kwargs["video_compression_mask"].all())
    handle = attach(model, ON)
    calls = []
    probe = model.model.vision_model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="use_token_compression.*False"):
        with torch.no_grad():
            model(**kwargs)
    probe.remove()
    handle.remove()
    assert not calls


def _reference_vision_scores(model, inputs, layer_index):
    """Eq. (1) from transformers' eager attention maps of one encoder layer, per frame, averaged
    over each 2 x 2 patch group (contiguous in the processor's order)."""
    layer = model.model.vision_model.encoder.layers[layer_index].self_attn
    captured = {}
    hook = layer.register_forward_pre_hook(
        lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True
    )
    video_features(model, inputs)
    hook.remove()
    module = sys.modules[type(layer).__module__]
    hidden = captured["args"][0] if captured["args"] else captured["kwargs"]["hidden_states"]
    cu = captured["kwargs"]["cu_seqlens"].tolist()
    cos, sin = captured["kwargs"]["position_embeddings"]
    s = hidden.shape[0]
    shape = (s, layer.num_heads, layer.head_dim)
    with torch.no_grad():
        q, k = module.apply_rotary_pos_emb_vision(
            layer.q_proj(hidden).view(shape), layer.k_proj(hidden).view(shape), cos, sin
        )
        received = torch.zeros(s, dtype=torch.float64)
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            seg = [x[a:b].transpose(0, 1)[None] for x in (q, k, k)]
            _, w = module.eager_attention_forward(layer, *seg, None, scaling=layer.scaling)
            avg = w[0].double().mean(dim=0)
            received[a:b] = (avg.sum(dim=0) - avg.diagonal()) / (b - a - 1)
    return received.view(-1, 4).mean(dim=-1)


@pytest.mark.parametrize("layer,height", [(-1, 32), (0, 48)], ids=["last-layer", "oblong"])
def test_vision_scores_equal_eager_attention_maps(layer, height):
    eager = tiny_video_llama_3(attn="eager")
    model = tiny_video_llama_3(attn="sdpa")
    inputs = vl3_inputs(model, frames=3, height=height, width=32, batch=2)
    config = ON.replace(merger="none")
    handle = attach(model, config, vision_layer=layer)
    with torch.no_grad():
        model(**inputs.kwargs)
    handle.remove()
    f, p = inputs.frames, inputs.tokens_per_frame
    expected = _reference_vision_scores(eager, inputs, layer).reshape(2, f, p)
    torch.testing.assert_close(handle.last.vision_scores.double(), expected, atol=1e-5, rtol=0)
    want = Compressor(config).compress(video_features(model, inputs), handle.last.vision_scores)
    assert torch.equal(handle.last.compression.indices, want.indices)


def test_unsupported_inputs_raise_clear_errors():
    model = tiny_video_llama_3()
    inputs = vl3_inputs(model, batch=2)
    handle = attach(model, ON)
    pruned = inputs.kwargs["video_compression_mask"].clone()
    pruned[20:30] = False
    with pytest.raises(ValueError, match="drops 10 of 128 video tokens.*use_token_compression"):
        model(**dict(inputs.kwargs, video_compression_mask=pruned))
    no_merges = {k: v for k, v in inputs.kwargs.items() if k != "video_merge_sizes"}
    with pytest.raises(ValueError, match="video_merge_sizes"):
        model(**no_merges)
    small = dict(inputs.kwargs, video_grid_thw=torch.tensor([[4, 8, 4]] * 2))
    with pytest.raises(ValueError, match="64 video placeholders for a grid of 4 x 4 x 2"):
        model(**small)
    grids = dict(inputs.kwargs, video_grid_thw=inputs.kwargs["video_grid_thw"][:1])
    with pytest.raises(ValueError, match="1 videos for 2 prompts"):
        model(**dict(grids, video_merge_sizes=inputs.kwargs["video_merge_sizes"][:1]))
    handle.remove()
    with pytest.raises(ValueError, match="vision_layer must be in"):
        attach(model, ON, vision_layer=5)


# ------------------------------------------------------------------------ FLOPs and lmms-eval
def test_flops_spec_is_the_qwen2_5_7b_llm_and_the_processors_default_sampling():
    from ustc.flops import MODEL_SPECS, ModelSpec

    spec = MODEL_SPECS["videollama3-7b"]
    public = VideoLlama3Config(
        text_config={
            "model_type": "qwen2",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
        }
    )
    assert ModelSpec.from_config(public, name="videollama3-7b", frames=32, tokens_per_frame=16) == (
        spec
    )


@needs_torchvision
def test_flops_spec_tokens_per_frame_is_what_the_video_processor_gives():
    """The default video processor on the spec's frames of 448 x 448 (read from its output:
    the token-count helpers of some releases skip the per-frame share of the pixel budget)."""
    from transformers import VideoLlama3VideoProcessor

    from ustc.flops import MODEL_SPECS

    spec = MODEL_SPECS["videollama3-7b"]
    frames = np.zeros((spec.frames, 448, 448, 3), dtype=np.uint8)
    out = VideoLlama3VideoProcessor()(videos=[frames], use_token_compression=False)
    t, h, w = out["video_grid_thw"][0].tolist()
    assert (t, h * w // 4) == (spec.frames, spec.tokens_per_frame)


def test_lmms_eval_manifest_names_video_llama_3():
    from ustc.lmms_eval import BACKBONES, manifests

    assert BACKBONES["video_llama_3_ustc"].model_class == "VideoLlama3ForConditionalGeneration"
    pytest.importorskip("lmms_eval")
    ids = {m.model_id: m.simple_class_path for m in manifests()}
    assert ids["video_llama_3_ustc"] == "ustc.lmms_eval.more_backbones.VideoLlama3USTC"


@needs_torchvision
def test_lmms_eval_model_turns_the_processors_pruning_off():
    """Through the lmms-eval model with the real processor (pruning on, its default): the plugin
    turns it off, so a static video keeps every token and is compressed by ustc alone."""
    pytest.importorskip("lmms_eval")
    from ustc.lmms_eval import VideoLlama3USTC

    processor = vl3_processor(pruning=True)
    lm = VideoLlama3USTC(
        model=tiny_video_llama_3(), processor=processor, max_frames_num=4, retention=0.25, layer=1
    )
    assert processor.video_processor.use_token_compression is False
    video = np.repeat(
        (np.random.default_rng(0).random((1, 32, 32, 3)) * 255).astype(np.uint8), 4, 0
    )
    inputs = lm._inputs("what is the colour ?", [video])
    assert bool(inputs["video_compression_mask"].all())
    with torch.no_grad():
        lm.model.generate(**lm._to_device(inputs), max_new_tokens=2)
    assert lm.handle.stats.tokens_in == lm.config.budget(4, 16) < 64
    lm.handle.remove()
