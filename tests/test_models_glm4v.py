"""ustc.attach on GLM-4.1V and GLM-4.5V (tiny random models of the real transformers classes).

The checks mirror tests/test_models_qwen3_vl.py; what is specific here: a video's placeholders
are the *image* token, one run per frame pair, each followed by ``<|end_of_image|>`` and its
timestamp; the LLM's rotary embedding is partial and interleaved; GLM-4.5V's LLM is a MoE.  The
inputs come from the real ``Glm4vProcessor`` (its video processor needs torchvision; without it
``glm4v_inputs`` lays them out by hand as the processor does, and ``test_the_hand_layout_is_the
_processors`` checks that where both run).

Per-backbone spec (one place): ``tiny_glm4v`` builds the model, ``glm4v_processor`` the real
processor, ``glm4v_inputs`` / ``processor_inputs`` the inputs of one or several prompts.
"""

import sys

import numpy as np
import pytest
import torch
from models_helpers import (
    IMAGE_TOKEN,
    TEXT_IDS,
    VOCAB,
    VideoInputs,
    pad_batch,
    reference_logits,
    video_features,
)
from processor_helpers import needs_torchvision, tiny_tokenizer
from transformers import (
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vMoeConfig,
    Glm4vMoeForConditionalGeneration,
)

from ustc import MERGERS, CompressionConfig, Compressor
from ustc.models import Glm4vHandle, attach
from ustc.models.attention import text_to_visual_attention

torch.set_num_threads(1)

ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)

# ------------------------------------------------------------------------------ backbone spec
#: GLM-4V's special tokens at the tiny model's ids (the image token is the video placeholder)
SPECIALS = {
    "<|image|>": IMAGE_TOKEN,
    "<|video|>": 91,
    "<|begin_of_image|>": 92,
    "<|end_of_image|>": 93,
    "<|begin_of_video|>": 94,
    "<|end_of_video|>": 95,
}
IMAGE_START, IMAGE_END, VIDEO_START, VIDEO_END = 92, 93, 94, 95


def tiny_glm4v(attn="sdpa", layers=3, seed=0, dtype=torch.float32, moe=False):
    """GLM-4.1V (``moe=True``: GLM-4.5V, 4 experts, 2 per token, layer 0 dense): a 2-block
    vision tower (patch 4, 2 x 2 downsampling + merger), a GLM-4 LLM with partial (0.5),
    interleaved M-RoPE."""
    torch.manual_seed(seed)
    text = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [2, 1, 1],
            "rope_theta": 1e4,
            "partial_rotary_factor": 0.5,
        },
    }
    if moe:
        text.update(
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            head_dim=16,
        )
    config = (Glm4vMoeConfig if moe else Glm4vConfig)(
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 4,
            "image_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        video_token_id=91,
        image_start_token_id=IMAGE_START,
        image_end_token_id=IMAGE_END,
        video_start_token_id=VIDEO_START,
        video_end_token_id=VIDEO_END,
    )
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn
    cls = Glm4vMoeForConditionalGeneration if moe else Glm4vForConditionalGeneration
    model = cls(config).to(dtype).eval()
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


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
        tokenizer=tiny_tokenizer(SPECIALS),
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
    return _layout(kwargs, processor.video_processor.merge_size)


def _layout(kwargs, merge):
    t, h, w = kwargs["video_grid_thw"][0].tolist()
    columns = (kwargs["input_ids"][0] == IMAGE_TOKEN).nonzero()[:, 0]
    return VideoInputs(kwargs, t, h * w // merge**2, int(columns[0]), columns)


def glm4v_inputs(model, frames=4, height=32, width=32, batch=1, prefix=5, suffix=7, seed=1):
    """Laid out as ``Glm4vProcessor`` does: prefix text, <|begin_of_video|>, per frame pair
    <|begin_of_image|> + h*w/4 image placeholders + <|end_of_image|> + its timestamp (one digit
    token: pairs at 0, 1, 2 ... s), <|end_of_video|>, suffix text; ``mm_token_type_ids`` 2 on the
    video's placeholders; patches as ``qwen_video_inputs``."""
    vision = model.config.vision_config
    p, tp, merge = vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size
    t, h, w = frames // tp, height // p, width // p
    per_frame = h * w // merge**2
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(*TEXT_IDS, (batch, prefix), generator=g), torch.full((batch, 1), 94)]
    for i in range(t):
        parts += [
            torch.full((batch, 1), IMAGE_START),
            torch.full((batch, per_frame), IMAGE_TOKEN),
            torch.full((batch, 1), IMAGE_END),
            torch.full((batch, 1), 1 + i),  # the tokenizer's digit i
        ]
    parts += [
        torch.full((batch, 1), VIDEO_END),
        torch.randint(*TEXT_IDS, (batch, suffix), generator=g),
    ]
    ids = torch.cat(parts, dim=1)
    pixels = torch.randn(batch * t * h * w, 3 * tp * p * p, generator=g)
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": pixels.to(model.dtype),
        "video_grid_thw": torch.tensor([[t, h, w]] * batch),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).int() * 2,
    }
    return _layout(kwargs, merge)


# ------------------------------------------------------------------------------- the battery
def generate(model, inputs, steps=5):
    kwargs = inputs.kwargs if isinstance(inputs, VideoInputs) else inputs
    with torch.no_grad():
        return model.generate(
            **kwargs, max_new_tokens=steps, return_dict_in_generate=True, output_logits=True
        )


def cache_lengths(cache):
    return [layer.keys.shape[-2] for layer in cache.layers]


def hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@needs_torchvision
def test_the_hand_layout_is_the_processors():
    """The real processor's ids, token types and grid for a 4-frame 32 x 32 video are those
    ``glm4v_inputs`` writes (its pixels are the processor's normalised patches, not compared)."""
    model = tiny_glm4v()
    real = processor_inputs(glm4v_processor(), prefix=3, suffix=4)
    hand = glm4v_inputs(model, prefix=3, suffix=4)
    ids, want = real.input_ids, hand.input_ids
    text = torch.isin(want, torch.tensor(list(SPECIALS.values()) + [1, 2]))
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
    plain = generate(model, inputs, steps=3)
    handle = attach(model, CompressionConfig(retention=1.0, merger="none"))
    off = generate(model, inputs, steps=3)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, off.logits, strict=True))
    handle = attach(model, ON)
    out = generate(model, inputs, steps=4)
    handle.remove()
    assert handle.stats.tokens_in == ON.budget(2, 24) < inputs.frames * inputs.tokens_per_frame
    expected = reference_logits(model, inputs, out.sequences, handle.last, ON)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        CompressionConfig(retention=1.0, merger="none"),
        CompressionConfig(retention=1.0, merger="text-aware", layer=3),
    ],
    ids=["r1-no-merger", "r1-text-aware-K=L"],
)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compression_off_is_bit_identical_and_remove_restores(config, attn):
    model = tiny_glm4v(attn=attn)
    inputs = glm4v_inputs(model, batch=2)
    with torch.no_grad():
        before = model(**inputs.kwargs).logits
    plain = generate(model, inputs)
    count = hooks(model)
    handle = attach(model, config)
    assert isinstance(handle, Glm4vHandle) and hooks(model) > count
    with torch.no_grad():
        during = model(**inputs.kwargs).logits
    hooked = generate(model, inputs)
    assert handle.stats.prefills == 2 and handle.stats.tokens_in == 32
    handle.remove()
    with torch.no_grad():
        after = model(**inputs.kwargs).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert torch.equal(plain.sequences, hooked.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, hooked.logits, strict=True))
    assert hooks(model) == count and "get_video_features" not in model.model.__dict__


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_token_counts_come_from_the_kv_cache(attn):
    model = tiny_glm4v(attn=attn)
    inputs = glm4v_inputs(model, frames=4)  # 2 frame pairs of 4 x 4 tokens
    assert (inputs.frames, inputs.tokens_per_frame) == (2, 16)
    n = inputs.input_ids.shape[1]
    handle = attach(model, ON)
    out = generate(model, inputs, steps=5)
    handle.remove()
    budget = ON.budget(2, 16)
    kept = ON.kept_after_merge(budget)
    entering = n - 32 + budget
    after_k = entering - budget + kept
    assert cache_lengths(out.past_key_values) == [entering + 4] + [after_k + 4] * 2
    assert (handle.stats.tokens_in, handle.stats.tokens_after_merge) == (budget, kept)
    assert torch.equal(out.sequences[:, :n], inputs.input_ids)


@pytest.mark.parametrize(
    "attn,merger,layer,batch",
    [
        ("sdpa", "text-aware", 1, 1),
        ("eager", "text-aware", 1, 2),
        ("sdpa", "last-token", 0, 2),
        ("sdpa", "text-aware", 2, 2),
    ],
)
def test_every_decode_step_matches_a_no_cache_recompute(attn, merger, layer, batch):
    model = tiny_glm4v(attn=attn)
    inputs = glm4v_inputs(model, batch=batch)
    config = ON.replace(merger=merger, layer=layer)
    handle = attach(model, config)
    out = generate(model, inputs, steps=6)
    handle.remove()
    expected = reference_logits(model, inputs, out.sequences, handle.last, config)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("use_generate", [False, True])
def test_kept_tokens_keep_their_uncompressed_mrope_positions(use_generate):
    model = tiny_glm4v()
    inputs = glm4v_inputs(model, frames=6)  # 3 frame pairs, a timestamp after each
    handle = attach(model, ON.replace(merger="none"))
    seen = []
    probe = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["position_ids"]), with_kwargs=True
    )
    if use_generate:
        generate(model, inputs, steps=2)
    else:
        with torch.no_grad():
            model(**inputs.kwargs)
    probe.remove()
    handle.remove()
    full, _ = model.model.get_rope_index(
        inputs.input_ids,
        mm_token_type_ids=inputs.kwargs["mm_token_type_ids"],
        video_grid_thw=inputs.kwargs["video_grid_thw"],
    )
    columns = handle.last.input_positions[0]
    prefill = seen[0][-3:]  # generate() prepends a 1-D text row
    assert prefill.shape == (3, 1, columns.numel()) and columns.numel() < full.shape[-1]
    assert torch.equal(prefill[:, 0], full[:, 0, columns])
    # every begin/end-of-image and timestamp token between the frame pairs is kept
    other = torch.ones(inputs.input_ids.shape[1], dtype=torch.bool)
    other[inputs.video_columns()] = False
    assert bool(torch.isin(other.nonzero()[:, 0], columns).all())
    if use_generate:  # the next token continues after the uncompressed prompt
        assert torch.equal(seen[1][-3:, 0, 0], full[:, 0, -1] + 1)


def _reference_vision_scores(model, inputs, block_index):
    """Eq. (1) from transformers' eager attention maps of one vision block, per frame pair,
    averaged over the 2 x 2 groups the downsampling joins."""
    visual = model.model.visual
    block = visual.blocks[block_index]
    captured = {}
    hooks_ = [
        block.attn.register_forward_pre_hook(
            lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True
        ),
        block.attn.register_forward_hook(lambda m, a, o: captured.update(out=o)),
    ]
    kw = inputs.kwargs
    with torch.no_grad():
        model.model.get_video_features(kw["pixel_values_videos"], kw["video_grid_thw"])
    for hook in hooks_:
        hook.remove()
    module = sys.modules[type(block.attn).__module__]
    hidden = captured["args"][0] if captured["args"] else captured["kwargs"]["hidden_states"]
    cu = captured["kwargs"]["cu_seqlens"].tolist()
    cos, sin = captured["kwargs"]["position_embeddings"]
    s = hidden.shape[0]
    with torch.no_grad():
        qkv = block.attn.qkv(hidden).reshape(s, 3, block.attn.num_heads, -1).permute(1, 0, 2, 3)
        q, k = module.apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)
        v = qkv[2]
        received = torch.zeros(s, dtype=torch.float64)
        outputs = []
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            seg = [x[a:b].transpose(0, 1)[None] for x in (q, k, v)]
            o, w = module.eager_attention_forward(
                block.attn, *seg, None, scaling=block.attn.scaling
            )
            outputs.append(o)
            avg = w[0].double().mean(dim=0)
            received[a:b] = (avg.sum(dim=0) - avg.diagonal()) / (b - a - 1)
        # these maps are the ones the block used: they reproduce its output
        torch.testing.assert_close(
            block.attn.proj(torch.cat(outputs, dim=1).reshape(s, -1)), captured["out"]
        )
    return received.view(-1, visual.spatial_merge_size**2).mean(dim=-1)


@pytest.mark.parametrize("block,height", [(-1, 32), (0, 40)], ids=["last-block", "ragged"])
def test_vision_scores_equal_eager_attention_maps(block, height):
    eager = tiny_glm4v(attn="eager")
    model = tiny_glm4v(attn="sdpa")
    inputs = glm4v_inputs(model, frames=4, height=height, width=32, batch=2)
    config = ON.replace(merger="none")
    handle = attach(model, config, vision_layer=block)
    with torch.no_grad():
        model(**inputs.kwargs)
    handle.remove()
    f, p = inputs.frames, inputs.tokens_per_frame
    expected = _reference_vision_scores(eager, inputs, block).reshape(2, f, p)
    torch.testing.assert_close(handle.last.vision_scores.double(), expected, atol=1e-5, rtol=0)
    want = Compressor(config).compress(video_features(model, inputs), handle.last.vision_scores)
    assert torch.equal(handle.last.compression.indices, want.indices)


def test_text_attention_at_layer_k_matches_eager_weights():
    """Eq. (5) recomputed with GLM's partial, interleaved rotary embedding equals the eager
    attention maps; the merger's text starts after <|end_of_video|>."""
    k = 1
    model = tiny_glm4v(attn="eager")
    inputs = glm4v_inputs(model, batch=2)
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs["position_embeddings"]

    layer = model.model.language_model.layers[k]
    probe = layer.register_forward_pre_hook(grab, with_kwargs=True)
    handle = attach(model, ON.replace(merger="none"))
    layout = handle.video_layout(inputs.kwargs, None)
    assert layout.trailing == 3  # <|end_of_image|>, the timestamp, <|end_of_video|>
    with torch.no_grad():
        weights = model(**inputs.kwargs, output_attentions=True).attentions[k]
    handle.remove()
    probe.remove()
    columns = handle.last.input_positions
    visual = torch.isin(columns, inputs.video_columns()).nonzero()[:, 1].view(2, -1)
    ts = int(visual[:, -1].max()) + 1 + layout.trailing
    with torch.no_grad():
        recomputed = text_to_visual_attention(
            layer.self_attn,
            layer.input_layernorm(captured["hidden"]),
            *captured["rope"],
            ts,
            visual,
        )
    eager = (
        weights[:, :, ts:]
        .mean(dim=1)
        .gather(2, visual[:, None].expand(-1, recomputed.shape[1], -1))
    )
    torch.testing.assert_close(recomputed, eager, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("merger", MERGERS.names())
def test_generate_end_to_end_with_every_merger(merger):
    model = tiny_glm4v(layers=2)
    inputs = glm4v_inputs(model)
    config = CompressionConfig(retention=0.2, merger=merger, layer=1, keep_ratio=0.5)
    handle = attach(model, config)
    out = generate(model, inputs, steps=3)
    budget = config.budget(inputs.frames, inputs.tokens_per_frame)
    lengths = cache_lengths(out.past_key_values)
    assert lengths[0] - lengths[1] == budget - config.kept_after_merge(budget)
    assert handle.stats.tokens_in == budget
    handle.remove()


def test_moe_class_bit_identical_off_and_decode_matches_recompute():
    model = tiny_glm4v(moe=True)
    assert type(model).__name__ == "Glm4vMoeForConditionalGeneration"
    inputs = glm4v_inputs(model, batch=2)
    plain = generate(model, inputs, steps=3)
    handle = attach(model, CompressionConfig(retention=1.0, merger="none"))
    hooked = generate(model, inputs, steps=3)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, hooked.logits, strict=True))
    handle = attach(model, ON)
    out = generate(model, inputs, steps=4)
    handle.remove()
    expected = reference_logits(model, inputs, out.sequences, handle.last, ON)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=2e-5, rtol=1e-5)
    budget = ON.budget(inputs.frames, inputs.tokens_per_frame)
    n = inputs.input_ids.shape[1] - inputs.frames * inputs.tokens_per_frame + budget
    kept = n - budget + ON.kept_after_merge(budget)
    assert cache_lengths(out.past_key_values) == [n + 3] + [kept + 3] * 2


def test_beam_search_with_several_returned_sequences():
    """Skipped where transformers itself cannot beam-search a GLM-4V video (5.25's
    ``_expand_multimodal_outputs`` counts a video's placeholders by ``video_token_id``, which
    GLM-4V does not write): the unattached model is tried first."""
    import transformers

    model = tiny_glm4v(layers=2)
    inputs = glm4v_inputs(model, batch=2)

    def beams():
        with torch.no_grad():
            return model.generate(
                **inputs.kwargs,
                max_new_tokens=3,
                num_beams=2,
                num_return_sequences=2,
                return_dict_in_generate=True,
            )

    try:
        beams()
    except ValueError as exc:
        pytest.skip(
            f"transformers {transformers.__version__} cannot beam-search a GLM-4V video even "
            f"without ustc ({exc})"
        )
    handle = attach(model, ON)
    out = beams()
    handle.remove()
    n = inputs.input_ids.shape[1]
    assert out.sequences.shape == (4, n + 3)
    assert torch.equal(out.sequences[:, :n], inputs.input_ids.repeat_interleave(2, dim=0))
    budget = ON.budget(inputs.frames, inputs.tokens_per_frame)
    entering = n - inputs.frames * inputs.tokens_per_frame + budget
    assert out.past_key_values.layers[0].keys.shape[-2] == entering + 2
    assert torch.equal(handle.last.vision_scores[0], handle.last.vision_scores[1])


def test_manual_decoding_without_generate_matches_generate():
    model = tiny_glm4v()
    inputs = glm4v_inputs(model)
    handle = attach(model, ON)
    out = generate(model, inputs, steps=4)
    n = inputs.input_ids.shape[1]
    mask = inputs.kwargs["attention_mask"]
    with torch.no_grad():
        step = model(**inputs.kwargs, use_cache=True)
        logits = [step.logits[:, -1]]
        for t in range(3):
            token = out.sequences[:, n + t : n + t + 1]
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            step = model(input_ids=token, attention_mask=mask, past_key_values=step.past_key_values)
            logits.append(step.logits[:, -1])
    handle.remove()
    torch.testing.assert_close(
        torch.stack(logits, 1), torch.stack(out.logits, 1), atol=1e-5, rtol=0
    )


def _rows(model):
    return [
        glm4v_inputs(model, prefix=3, suffix=9, seed=1),
        glm4v_inputs(model, prefix=6, suffix=4, seed=2, height=48, width=32),
        glm4v_inputs(model, prefix=5, suffix=6, seed=3, frames=6),
    ]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("merger", ["text-aware", "none"])
def test_each_row_of_a_padded_batch_equals_its_prompt_alone(side, merger):
    """Rows of different prompt lengths and video sizes (so different budgets), padded left or
    right: each row generates what it generates alone."""
    model = tiny_glm4v()
    rows = _rows(model)
    config = ON.replace(merger=merger)
    handle = attach(model, config)
    alone = [generate(model, row) for row in rows]
    batch = pad_batch(rows, side)
    out = generate(model, batch)
    last = handle.last
    handle.remove()
    n = batch["input_ids"].shape[1]
    for i, (row, single) in enumerate(zip(rows, alone, strict=True)):
        assert torch.equal(out.sequences[i, n:], single.sequences[0, row.input_ids.shape[1] :])
        for got, want in zip(out.logits, single.logits, strict=True):
            torch.testing.assert_close(got[i], want[0], atol=2e-5, rtol=1e-5)
        shift = n - row.input_ids.shape[1] if side == "left" else 0
        kept = torch.isin(last.input_positions[i], row.video_columns() + shift).sum()
        assert int(kept) == config.budget(row.frames, row.tokens_per_frame)


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
