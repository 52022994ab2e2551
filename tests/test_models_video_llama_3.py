"""ustc.attach on VideoLLaMA3 (tiny random models of the real transformers class).

The checks mirror tests/test_models_qwen3_vl.py; what is specific here: the video is one run of
placeholders per frame after a ``Time t s:`` label, frames joined by ``,``; the vision tower runs
each frame alone and pools 2 x 2 patches with a bilinear ``pixel_unshuffle``; the LLM (Qwen2)
has 1-D positions; the processor's own differential frame pruning (``video_compression_mask``)
is refused unless it keeps every token.  Inputs come from the real ``VideoLlama3Processor``
(its video processor needs torchvision; without it ``vl3_inputs`` lays them out by hand as the
processor does, and ``test_the_hand_layout_is_the_processors`` checks that where both run).

Per-backbone spec (one place): ``tiny_video_llama_3`` builds the model, ``vl3_processor`` the
real processor, ``vl3_inputs`` / ``processor_inputs`` the inputs of one or several prompts.
"""

import sys

import numpy as np
import pytest
import torch
from models_helpers import IMAGE_TOKEN, TEXT_IDS, VIDEO_TOKEN, VOCAB, VideoInputs
from models_helpers import reference_logits as _reference_logits
from processor_helpers import needs_torchvision, tiny_tokenizer
from transformers import VideoLlama3Config, VideoLlama3ForConditionalGeneration

from ustc import MERGERS, CompressionConfig, Compressor
from ustc.models import VideoLlama3Handle, attach
from ustc.models.attention import text_to_visual_attention

torch.set_num_threads(1)

ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)

# ------------------------------------------------------------------------------ backbone spec
SPECIALS = {"<|image_pad|>": IMAGE_TOKEN, "<|video_pad|>": VIDEO_TOKEN}
#: the tiny tokenizer's ids of "Time", "s:", "," and "." (processor_helpers.WORDS), digit d: 1 + d
TIME, SECONDS, COMMA, DOT = 11, 12, 13, 14


def tiny_video_llama_3(attn="sdpa", layers=3, seed=0, dtype=torch.float32):
    """VideoLLaMA3: a 2-layer NaViT vision encoder (patch 4, axial 2-D RoPE), 2 x 2 bilinear
    pooling for videos, a Qwen2 LLM with 1-D RoPE."""
    torch.manual_seed(seed)
    config = VideoLlama3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 4,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
        },
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
    )
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attn
    model = VideoLlama3ForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


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
        tokenizer=tiny_tokenizer(SPECIALS),
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
    return _layout(kwargs)


def _layout(kwargs):
    t, h, w = kwargs["video_grid_thw"][0].tolist()
    m = int(kwargs["video_merge_sizes"][0])
    columns = (kwargs["input_ids"][0] == VIDEO_TOKEN).nonzero()[:, 0]
    return VideoInputs(kwargs, t, (h // m) * (w // m), int(columns[0]), columns)


def vl3_inputs(model, frames=4, height=32, width=32, batch=1, prefix=5, suffix=7, seed=1):
    """Laid out as ``VideoLlama3Processor`` does with its pruning off: prefix text, then per
    frame i 'Time i.0s:' (5 tokens: Time, i, ., 0, s:) + (h/2)*(w/2) placeholders, frames joined
    by ',', suffix text; patches (F*h*w, 3*p*p) in the processor's order (each 2 x 2 group
    contiguous), merge size 2, a compression mask keeping every token."""
    p = model.config.vision_config.patch_size
    h, w = height // p, width // p
    per_frame = h * w // 4
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(*TEXT_IDS, (batch, prefix), generator=g)]
    for i in range(frames):
        label = [TIME, 1 + i, DOT, 1, SECONDS] if i < 10 else None
        parts += [
            torch.tensor(label).expand(batch, -1),
            torch.full((batch, per_frame), VIDEO_TOKEN),
        ]
        if i < frames - 1:
            parts.append(torch.full((batch, 1), COMMA))
    parts.append(torch.randint(*TEXT_IDS, (batch, suffix), generator=g))
    ids = torch.cat(parts, dim=1)
    kwargs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": torch.randn(batch * frames * h * w, 3 * p * p, generator=g).to(
            model.dtype
        ),
        "video_grid_thw": torch.tensor([[frames, h, w]] * batch),
        "video_merge_sizes": torch.full((batch,), 2),
        "video_compression_mask": torch.ones(batch * frames * per_frame, dtype=torch.bool),
    }
    return _layout(kwargs)


def reference_logits(model, inputs, sequences, last, config):
    """models_helpers.reference_logits with 1-D positions (no M-RoPE grid to read)."""
    plain = VideoInputs(
        {"input_ids": inputs.input_ids}, inputs.frames, inputs.tokens_per_frame, 0, inputs.columns
    )
    return _reference_logits(model, plain, sequences, last, config)


def video_features(model, inputs):
    """(B, F, P, D) the model's own video tokens."""
    kw = inputs.kwargs
    with torch.no_grad():
        out = model.model.get_video_features(
            kw["pixel_values_videos"], kw["video_grid_thw"], kw["video_merge_sizes"]
        )
    b = inputs.input_ids.shape[0]
    return torch.cat(list(out.pooler_output)).reshape(b, inputs.frames, inputs.tokens_per_frame, -1)


def pad_batch(rows, side):
    """Single-prompt inputs padded to the longest with id 0 on ``side``, videos concatenated."""
    n = max(r.input_ids.shape[1] for r in rows)

    def pad(x):
        fill = torch.zeros(x.shape[0], n - x.shape[1], dtype=x.dtype)
        return torch.cat([fill, x] if side == "left" else [x, fill], dim=1)

    batch = {
        k: torch.cat([pad(r.kwargs[k]) for r in rows]) for k in ("input_ids", "attention_mask")
    }
    for key in (
        "pixel_values_videos",
        "video_grid_thw",
        "video_merge_sizes",
        "video_compression_mask",
    ):
        batch[key] = torch.cat([r.kwargs[key] for r in rows])
    return batch


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
    plain = generate(model, inputs, steps=3)
    handle = attach(model, CompressionConfig(retention=1.0, merger="none"))
    off = generate(model, inputs, steps=3)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, off.logits, strict=True))
    handle = attach(model, ON)
    out = generate(model, inputs, steps=4)
    handle.remove()
    assert handle.stats.tokens_in == ON.budget(4, 24)
    expected = reference_logits(model, inputs, out.sequences, handle.last, ON)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=2e-5, rtol=1e-5)


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
    model = tiny_video_llama_3(attn=attn)
    inputs = vl3_inputs(model, batch=2)
    with torch.no_grad():
        before = model(**inputs.kwargs).logits
    plain = generate(model, inputs)
    count = hooks(model)
    handle = attach(model, config)
    assert isinstance(handle, VideoLlama3Handle) and hooks(model) > count
    with torch.no_grad():
        during = model(**inputs.kwargs).logits
    hooked = generate(model, inputs)
    assert handle.stats.prefills == 2 and handle.stats.tokens_in == 64
    handle.remove()
    with torch.no_grad():
        after = model(**inputs.kwargs).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert torch.equal(plain.sequences, hooked.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, hooked.logits, strict=True))
    assert hooks(model) == count and "get_video_features" not in model.model.__dict__


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_token_counts_come_from_the_kv_cache(attn):
    model = tiny_video_llama_3(attn=attn)
    inputs = vl3_inputs(model, frames=4)  # 4 frames of 4 x 4 tokens
    assert (inputs.frames, inputs.tokens_per_frame) == (4, 16)
    n = inputs.input_ids.shape[1]
    handle = attach(model, ON)
    out = generate(model, inputs, steps=5)
    handle.remove()
    budget = ON.budget(4, 16)
    kept = ON.kept_after_merge(budget)
    entering = n - 64 + budget
    after_k = entering - budget + kept
    assert cache_lengths(out.past_key_values) == [entering + 4] + [after_k + 4] * 2
    assert (handle.stats.tokens_in, handle.stats.tokens_after_merge) == (budget, kept)
    assert torch.equal(out.sequences[:, :n], inputs.input_ids)


@pytest.mark.parametrize(
    "attn,merger,layer,batch",
    [("sdpa", "text-aware", 1, 1), ("eager", "text-aware", 1, 2), ("sdpa", "last-token", 0, 2)],
)
def test_every_decode_step_matches_a_no_cache_recompute(attn, merger, layer, batch):
    model = tiny_video_llama_3(attn=attn)
    inputs = vl3_inputs(model, batch=batch)
    config = ON.replace(merger=merger, layer=layer)
    handle = attach(model, config)
    out = generate(model, inputs, steps=6)
    handle.remove()
    expected = reference_logits(model, inputs, out.sequences, handle.last, config)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=2e-5, rtol=1e-5)
    # the frame labels and commas between the frames are all kept
    other = torch.ones(inputs.input_ids.shape[1], dtype=torch.bool)
    other[inputs.video_columns()] = False
    assert bool(torch.isin(other.nonzero()[:, 0], handle.last.input_positions[0]).all())


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


def test_text_attention_at_layer_k_matches_eager_weights():
    k = 1
    model = tiny_video_llama_3(attn="eager")
    inputs = vl3_inputs(model, batch=2)
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs["position_embeddings"]

    layer = model.model.language_model.layers[k]
    probe = layer.register_forward_pre_hook(grab, with_kwargs=True)
    handle = attach(model, ON.replace(merger="none"))
    with torch.no_grad():
        weights = model(**inputs.kwargs, output_attentions=True).attentions[k]
    handle.remove()
    probe.remove()
    columns = handle.last.input_positions
    visual = torch.isin(columns, inputs.video_columns()).nonzero()[:, 1].view(2, -1)
    ts = int(visual[:, -1].max()) + 1  # the question follows the last frame's placeholders
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


def test_beam_search_with_several_returned_sequences():
    model = tiny_video_llama_3(layers=2)
    inputs = vl3_inputs(model, batch=2)
    handle = attach(model, ON)
    with torch.no_grad():
        out = model.generate(
            **inputs.kwargs,
            max_new_tokens=3,
            num_beams=2,
            num_return_sequences=2,
            return_dict_in_generate=True,
        )
    handle.remove()
    n = inputs.input_ids.shape[1]
    assert out.sequences.shape == (4, n + 3)
    assert torch.equal(out.sequences[:, :n], inputs.input_ids.repeat_interleave(2, dim=0))
    budget = ON.budget(inputs.frames, inputs.tokens_per_frame)
    entering = n - inputs.frames * inputs.tokens_per_frame + budget
    assert out.past_key_values.layers[0].keys.shape[-2] == entering + 2
    assert torch.equal(handle.last.vision_scores[0], handle.last.vision_scores[1])


@pytest.mark.parametrize("merger", MERGERS.names())
def test_generate_end_to_end_with_every_merger(merger):
    model = tiny_video_llama_3(layers=2)
    inputs = vl3_inputs(model)
    config = CompressionConfig(retention=0.2, merger=merger, layer=1, keep_ratio=0.5)
    handle = attach(model, config)
    out = generate(model, inputs, steps=3)
    budget = config.budget(inputs.frames, inputs.tokens_per_frame)
    lengths = cache_lengths(out.past_key_values)
    assert lengths[0] - lengths[1] == budget - config.kept_after_merge(budget)
    assert handle.stats.tokens_in == budget
    handle.remove()


def test_manual_decoding_without_generate_matches_generate():
    model = tiny_video_llama_3()
    inputs = vl3_inputs(model)
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


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("merger", ["text-aware", "none"])
def test_each_row_of_a_padded_batch_equals_its_prompt_alone(side, merger):
    """Rows of different prompt lengths and video sizes (so different budgets), padded left or
    right: each row generates what it generates alone."""
    model = tiny_video_llama_3()
    rows = [
        vl3_inputs(model, prefix=3, suffix=9, seed=1),
        vl3_inputs(model, prefix=6, suffix=4, seed=2, height=48),
        vl3_inputs(model, prefix=5, suffix=6, seed=3, frames=3),
    ]
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
