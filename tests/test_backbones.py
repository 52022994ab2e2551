"""The one test battery every supported backbone runs, from a small spec per backbone.

Adding a backbone to the battery
--------------------------------
Write a tiny builder and an inputs builder in ``tests/models_helpers.py`` (a random model of the
real transformers class, inputs laid out as its processor lays them out), then add one
:class:`Backbone` to :data:`BACKBONES` below::

    Backbone(
        name="qwen2-vl",                 # test id
        build=tiny_qwen2_vl,             # build(attn="sdpa", layers=3) -> model, eval mode
        inputs=qwen_video_inputs,        # inputs(model, frames=4, batch=1, prefix=5, suffix=7,
                                         #        seed=1, **size) -> VideoInputs
        handle=Qwen2VLHandle,            # the adapter ustc.attach must choose
        grid=(2, 16),                    # (F, P) of inputs(model, frames=4): F counts what the
                                         # model calls a frame (Qwen: temporal patch pairs)
        trailing=1,                      # structural tokens right after the last visual token
                                         # that are not text to the merger (<|vision_end|>)
        padded_rows=QWEN_ROWS,           # 3 keyword sets for inputs(): prompts (and videos) of
                                         # different sizes, batched with padding
        lmms_eval="qwen2_vl_ustc",       # its lmms-eval model (ustc.lmms_eval.BACKBONES)
        flops="qwen2-vl-7b",             # its public sizes in ustc.flops.MODEL_SPECS
    )

``inputs``, ``grid``, ``trailing`` and ``padded_rows`` default to the LLaVA layout (one run of
F*P placeholders, (4, 16), nothing after the video, three prompt lengths); ``_qwen(...)`` makes a
Qwen-style spec.  Optional fields: ``streams`` (per-token inputs besides the embeddings that the no-cache reference
must carry along, e.g. Qwen3-VL's DeepStack levels), ``layers`` (the builder's LLM depth when it
takes no ``layers`` argument), ``flops_measured=False`` where the exact FLOPs count does not
model the LLM (a hybrid with linear-attention layers, an MoE), ``beam_search_upstream=False``
where transformers itself may not beam-search the family's video (the test then tries the
unattached model first and skips naming the error) and ``right_padding=False`` where the model
itself, without ustc, answers a right-padded prompt unlike the prompt alone.  Every test below then runs on the new
backbone; its own file ``tests/test_models_<name>.py`` keeps only what is truly that family's
(the Eq. (1) reference through its own alignment, its positions, its errors).

What the battery checks, on tiny random models, with sdpa and eager attention:

* compression off (retention 1, K = the number of layers) is bit-identical during and after
  ``remove()``, and ``remove()`` leaves no hook; attaching twice fails;
* token counts come from the model's own KV cache (layers < K hold the budget, >= K the kept);
* every decode step equals a layer-by-layer no-cache recompute (``reference_logits``), with the
  merge at K = 1, at the first attention layer (K = 0) and at the last;
* the external stage compressed the model's own video features with the captured scores;
* Eq. (5)'s text-to-visual attention at layer K equals the eager weights, and the merge there is
  the core merger on exactly those inputs;
* generate() with every registered merger, beam search, decoding by hand, text-only prompts;
* each row of a padded batch (left and right) equals its prompt alone;
* the lmms-eval model and the FLOPs spec exist, and the exact FLOPs count of the LLM equals
  ``FlopCounterMode``'s measurement on the tiny model.

The ``check_*`` functions are plain functions so that a family file can run one on a variant
(an MoE class, another LLM) without copying it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers
from models_helpers import (
    VideoInputs,
    compressed_levels,
    generate,
    glm4v_inputs,
    glm4v_vision_reference,
    internvl_video_inputs,
    llava_video_inputs,
    original_positions,
    pad_batch,
    qwen3_video_inputs,
    qwen_video_inputs,
    qwen_vision_reference,
    reference_logits,
    tiny_glm4v,
    tiny_internvl,
    tiny_llava_next_video,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_5,
    tiny_qwen3_vl,
    tiny_video_llama_3,
    video_features,
    vl3_inputs,
)

from ustc import MERGERS, CompressionConfig, Compressor
from ustc.flops import MODEL_SPECS, VANILLA, ModelSpec, TokenSchedule, exact
from ustc.lmms_eval import BACKBONES as LMMS_EVAL_MODELS
from ustc.models import (
    Glm4vHandle,
    Handle,
    InternVLHandle,
    LlavaNextVideoHandle,
    LlavaOnevisionHandle,
    Qwen2_5_VLHandle,
    Qwen2VLHandle,
    Qwen3_5Handle,
    Qwen3VLHandle,
    VideoLlama3Handle,
    attach,
)
from ustc.models.attention import text_to_visual_attention

torch.set_num_threads(1)

#: compression on: r = 25 %, text-aware merge at K = 1 keeping half
ON = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)
ON_NO_MERGER = ON.replace(merger="none")

#: three prompts of different lengths, one video each
LLAVA_ROWS = (
    {"prefix": 3, "suffix": 9, "seed": 1},
    {"prefix": 6, "suffix": 4, "seed": 2},
    {"prefix": 5, "suffix": 6, "seed": 3},
)
#: and videos of different sizes (Qwen's dynamic resolution)
QWEN_ROWS = (
    {"prefix": 3, "suffix": 9, "seed": 1},
    {"prefix": 6, "suffix": 4, "seed": 2, "height": 48, "width": 32},
    {"prefix": 5, "suffix": 6, "seed": 3, "frames": 2},
)
QWEN3_ROWS = (*QWEN_ROWS[:2], {"prefix": 5, "suffix": 6, "seed": 3, "frames": 6})


@dataclass(frozen=True)
class Backbone:
    """What the battery needs to know of one backbone (see the module docstring)."""

    name: str
    build: Callable[..., Any]
    handle: type[Handle]
    lmms_eval: str
    flops: str | None
    inputs: Callable[..., VideoInputs] = llava_video_inputs
    grid: tuple[int, int] = (4, 16)
    trailing: int = 0
    padded_rows: tuple[dict[str, Any], ...] = LLAVA_ROWS
    #: (model, inputs, last run) -> per-level (B, M, D) streams for reference_logits, or None
    streams: Callable[[Any, VideoInputs, Any], list[torch.Tensor]] | None = None
    #: the builder's LLM depth when it takes no ``layers`` argument (None: it takes layers=3)
    layers: int | None = None
    #: False where the exact FLOPs count does not model the LLM's layers
    flops_measured: bool = True
    #: False where the model itself (without ustc) answers a right-padded row differently from
    #: the row alone (recurrent layers run over the padding); ustc's compression moves the
    #: padding left, so only prompts that enter the LLM uncompressed are affected
    right_padding: bool = True
    #: Eq. (1) reference from eager attention maps, (eager model, inputs, vision layer) -> scores,
    #: and the cases it is checked on: (vision layer, inputs size keywords); None: the family's
    #: own file checks Eq. (1)
    vision_reference: Callable[[Any, VideoInputs, int], torch.Tensor] | None = None
    vision_cases: tuple[tuple[int, dict[str, int]], ...] = ()
    #: False where transformers itself may fail to beam-search this family's video (5.25's
    #: ``_expand_multimodal_outputs`` counts placeholders by ``video_token_id``, which GLM-4V
    #: does not write): the unattached model is tried first and the test skips naming the error
    beam_search_upstream: bool = True

    def model(self, attn: str = "sdpa", **kwargs: Any) -> Any:
        if self.layers is None:
            kwargs.setdefault("layers", 3)
        return self.build(attn=attn, **kwargs)

    def __str__(self) -> str:
        return self.name


def _qwen3_5(attn: str = "sdpa", **kwargs: Any) -> Any:
    return tiny_qwen3_5(attn=attn, **kwargs)


def _glm4v_moe(attn: str = "sdpa", **kwargs: Any) -> Any:
    return tiny_glm4v(attn=attn, moe=True, **kwargs)


def _qwen(name: str, build: Callable[..., Any], handle: type[Handle], **spec: Any) -> Backbone:
    """A Qwen-style spec: temporal patch pairs of 4 x 4 tokens, <|vision_end|> after the video,
    videos of different sizes in a padded batch."""
    spec.setdefault("inputs", qwen_video_inputs)
    spec.setdefault("padded_rows", QWEN_ROWS)
    spec.setdefault("vision_reference", qwen_vision_reference)
    spec.setdefault("vision_cases", ((-1, {"height": 32}), (0, {"height": 40})))
    spec.setdefault("trailing", 1)
    return Backbone(name, build, handle=handle, grid=(2, 16), **spec)


BACKBONES: list[Backbone] = [
    Backbone(
        "llava-onevision",
        tiny_llava_onevision,
        trailing=1,  # the image_newline
        lmms_eval="llava_onevision_ustc",
        flops="llava-onevision-7b",
        handle=LlavaOnevisionHandle,
    ),
    Backbone(
        "llava-next-video",
        tiny_llava_next_video,
        handle=LlavaNextVideoHandle,
        lmms_eval="llava_next_video_ustc",
        flops="llava-next-video-7b",
    ),
    _qwen(
        "qwen2.5-vl",
        tiny_qwen2_5_vl,
        Qwen2_5_VLHandle,
        lmms_eval="qwen2_5_vl_ustc",
        flops="qwen2.5-vl-7b",
    ),
    _qwen(
        "qwen2-vl",
        tiny_qwen2_vl,
        Qwen2VLHandle,
        lmms_eval="qwen2_vl_ustc",
        flops="qwen2-vl-7b",
        vision_cases=((-1, {"height": 40}), (0, {"height": 40})),
    ),
    _qwen(
        "qwen3-vl",
        tiny_qwen3_vl,
        Qwen3VLHandle,
        inputs=qwen3_video_inputs,
        padded_rows=QWEN3_ROWS,
        lmms_eval="qwen3_vl_ustc",
        flops="qwen3-vl-8b",
        streams=compressed_levels,
    ),
    _qwen(
        "qwen3.5",
        _qwen3_5,
        Qwen3_5Handle,
        inputs=qwen3_video_inputs,
        padded_rows=QWEN3_ROWS,
        lmms_eval="qwen3_5_ustc",
        flops=None,  # no public Qwen3.5 sizes in MODEL_SPECS yet
        layers=4,
        flops_measured=False,  # Gated DeltaNet layers are not softmax attention
        right_padding=False,
        vision_cases=((-1, {}),),
    ),
    *(
        _qwen(
            name,
            build,
            Glm4vHandle,
            inputs=glm4v_inputs,  # one image run per frame pair, a timestamp after each
            trailing=3,  # <|end_of_image|>, the timestamp, <|end_of_video|>
            padded_rows=QWEN3_ROWS,
            lmms_eval=lmms,
            flops="glm-4.1v-9b",
            vision_reference=glm4v_vision_reference,
            vision_cases=((-1, {"height": 32}), (0, {"height": 40})),  # 40: a ragged grid
            beam_search_upstream=False,
            flops_measured=measured,
        )
        for name, build, lmms, measured in (
            ("glm4.1v", tiny_glm4v, "glm4v_ustc", True),
            # the exact count models the dense LLM (the MoE's counted by its family file)
            ("glm4.5v-moe", _glm4v_moe, "glm4v_moe_ustc", False),
        )
    ),
    Backbone(
        "videollama3",
        tiny_video_llama_3,
        inputs=vl3_inputs,  # a 'Time t s:' label before each frame's run, ',' between frames
        handle=VideoLlama3Handle,
        padded_rows=QWEN_ROWS,  # NaViT: frames of any size
        lmms_eval="video_llama_3_ustc",
        flops="videollama3-7b",
    ),
    Backbone(
        "internvl",
        tiny_internvl,
        inputs=internvl_video_inputs,  # </img> after the video counts as text
        handle=InternVLHandle,
        lmms_eval="internvl_ustc",
        flops="internvl3.5-8b",
    ),
]

every_backbone = pytest.mark.parametrize("spec", BACKBONES, ids=str)


# --------------------------------------------------------------------------------------------
# Small tools
# --------------------------------------------------------------------------------------------


def hooks(model: Any) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def decoder_layers(model: Any) -> Any:
    return model.model.language_model.layers


def kv_lengths(cache: Any) -> dict[int, int]:
    """Layer -> cached keys, for the layers that hold keys (a recurrent layer holds a state)."""
    return {
        i: layer.keys.shape[-2]
        for i, layer in enumerate(cache.layers)
        if getattr(layer, "keys", None) is not None
    }


def attention_layers(model: Any) -> list[int]:
    """The decoder layers with softmax attention (all, unless the config says otherwise)."""
    types = getattr(model.config.get_text_config(), "layer_types", None)
    count = len(decoder_layers(model))
    return [i for i in range(count) if types is None or types[i] != "linear_attention"]


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------

OFF = {
    "r1-no-merger": lambda layers: CompressionConfig(retention=1.0, merger="none"),
    "r1-text-aware-K=L": lambda layers: CompressionConfig(
        retention=1.0, merger="text-aware", layer=layers
    ),
    "r1-last-token-K=L": lambda layers: CompressionConfig(
        retention=1.0, merger="last-token", layer=layers, scorer="attn"
    ),
}


def check_off_is_bit_identical_and_remove_restores(spec: Backbone, off: str, attn: str) -> None:
    model = spec.model(attn)
    inputs = spec.inputs(model, batch=2)
    config = OFF[off](len(decoder_layers(model)))
    with torch.no_grad():
        before = model(**inputs.kwargs).logits
    plain = generate(model, inputs.kwargs)
    count = hooks(model)  # transformers may add hooks of its own on the first forward
    handle = attach(model, config)
    method = spec.handle.video_method
    assert isinstance(handle, spec.handle) and hooks(model) > count
    assert method in model.model.__dict__
    with torch.no_grad():
        during = model(**inputs.kwargs).logits
    hooked = generate(model, inputs.kwargs)
    assert handle.stats.prefills == 2
    assert handle.stats.tokens_in == inputs.frames * inputs.tokens_per_frame
    handle.remove()
    with torch.no_grad():
        after = model(**inputs.kwargs).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert torch.equal(plain.sequences, hooked.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, hooked.logits, strict=True))
    assert hooks(model) == count and method not in model.model.__dict__
    assert not any(
        layer._forward_hooks or layer._forward_pre_hooks for layer in decoder_layers(model)
    )


def check_token_counts_come_from_the_kv_cache(spec: Backbone, attn: str) -> None:
    model = spec.model(attn)
    inputs = spec.inputs(model, frames=4)
    f, p = inputs.frames, inputs.tokens_per_frame
    assert (f, p) == spec.grid
    n = inputs.input_ids.shape[1]
    handle = attach(model, ON)
    out = generate(model, inputs.kwargs, steps=5)
    handle.remove()
    budget = ON.budget(f, p)
    kept = ON.kept_after_merge(budget)
    entering = n - f * p + budget  # the text (and structural tokens) + the budget
    after_k = entering - budget + kept
    decoded = 4  # 5 tokens generated, the last is never fed back
    lengths = kv_lengths(out.past_key_values)
    assert sorted(lengths) == attention_layers(model)
    assert lengths == {
        i: (after_k if i >= ON.layer else entering) + decoded for i in attention_layers(model)
    }
    assert (handle.stats.tokens_in, handle.stats.tokens_after_merge) == (budget, kept)
    assert handle.stats.sequence_in == entering and handle.stats.sequence_after_merge == after_k
    assert handle.stats.visual_tokens == f * p and handle.stats.total_seconds > 0
    # generate() returns the caller's prompt followed by the new tokens
    assert torch.equal(out.sequences[:, :n], inputs.input_ids)


def check_decode_matches_a_no_cache_recompute(
    spec: Backbone,
    attn: str,
    config: CompressionConfig,
    batch: int,
    model: Any = None,
    steps: int = 6,
) -> tuple[VideoInputs, Any, Handle]:
    """Every decode step equals ``reference_logits``; returns (inputs, generate output, handle)
    for a family file's further checks."""
    model = model if model is not None else spec.model(attn)
    inputs = spec.inputs(model, batch=batch)
    handle = attach(model, config)
    out = generate(model, inputs.kwargs, steps=steps)
    handle.remove()
    streams = spec.streams(model, inputs, handle.last) if spec.streams else None
    expected = reference_logits(model, inputs, out.sequences, handle.last, config, streams)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected, atol=2e-5, rtol=1e-5)
    return inputs, out, handle


def check_text_attention_and_merge_at_layer_k(spec: Backbone, **build: Any) -> None:
    k = 1
    model = spec.model("eager", **build)
    inputs = spec.inputs(model, batch=2)
    captured = {}

    def grab(module: Any, args: Any, kwargs: Any) -> None:
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs["position_embeddings"]

    layer = decoder_layers(model)[k]
    probe = layer.register_forward_pre_hook(grab, with_kwargs=True)  # before attach's hooks
    handle = attach(model, ON.replace(merger="none"))
    with torch.no_grad():
        # one map per softmax-attention layer (a hybrid LLM returns none for its recurrent ones)
        maps = model(**inputs.kwargs, output_attentions=True).attentions
        weights = maps[attention_layers(model).index(k)]
    handle.remove()
    columns = handle.last.input_positions  # (B, n') original column of each entering token
    visual = torch.isin(columns, inputs.video_columns()).nonzero()[:, 1].view(2, -1)
    ts = int(visual[:, -1].max()) + 1 + spec.trailing  # the first text token after the video
    hidden = captured["hidden"]
    with torch.no_grad():
        recomputed = text_to_visual_attention(
            getattr(layer, spec.handle.layer_attention),
            getattr(layer, spec.handle.layer_norm)(hidden),
            *captured["rope"],
            ts,
            visual,
            queries=spec.handle.attention_queries,
        )
    expected = (
        weights[:, :, ts:]
        .mean(dim=1)
        .gather(2, visual[:, None].expand(-1, recomputed.shape[1], -1))
    )
    torch.testing.assert_close(recomputed, expected, atol=1e-6, rtol=1e-5)

    # the merge the hooks perform at layer K is the core merger on exactly these inputs
    config = ON.replace(layer=k)
    merged = attach(model, config)
    with torch.no_grad():
        model(**inputs.kwargs)
    merged.remove()
    probe.remove()
    states = hidden.gather(1, visual[..., None].expand(-1, -1, hidden.shape[-1]))
    want = Compressor(config).merge(states, hidden[:, ts:], expected)
    assert torch.equal(merged.last.merge.indices, want.indices)
    torch.testing.assert_close(merged.last.merge.tokens, want.tokens)


def check_vision_scores(
    spec: Backbone,
    reference: Callable[[Any, VideoInputs, int], torch.Tensor],
    layer: int,
    vision_layer: int | None = None,
    config: CompressionConfig = ON_NO_MERGER,
    atol: float = 1e-5,
    build: dict[str, Any] | None = None,
    **sizes: Any,
) -> Any:
    """The Eq. (1) scores the adapter captured under sdpa equal ``reference(eager model, inputs,
    layer)`` (the family's own alignment, from eager attention maps), reshaped to (B, F, P); the
    external stage compressed the model's own features with them.  ``vision_layer`` goes to
    attach; ``sizes`` to the inputs builder.  Returns the handle."""
    eager = spec.model("eager", **(build or {}))
    model = spec.model("sdpa", **(build or {}))
    inputs = spec.inputs(model, batch=2, **sizes)
    extra = {} if vision_layer is None else {"vision_layer": vision_layer}
    handle = attach(model, config, **extra)
    with torch.no_grad():
        model(**inputs.kwargs)
    handle.remove()
    scores = handle.last.vision_scores
    assert scores.shape == (2, inputs.frames, inputs.tokens_per_frame)
    expected = reference(eager, inputs, layer).reshape(scores.shape)
    torch.testing.assert_close(scores.double(), expected, atol=atol, rtol=0)
    want = Compressor(config).compress(video_features(model, inputs), scores)
    assert torch.equal(handle.last.compression.indices, want.indices)
    torch.testing.assert_close(handle.last.compression.tokens, want.tokens)
    handle.eager, handle.inputs = eager, inputs  # for a family's further checks
    return handle


# --------------------------------------------------------------------------------------------
# The battery
# --------------------------------------------------------------------------------------------


@every_backbone
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("off", list(OFF))
def test_compression_off_is_bit_identical_and_remove_restores(spec, off, attn):
    check_off_is_bit_identical_and_remove_restores(spec, off, attn)


@every_backbone
def test_remove_restores_the_instance_and_attach_twice_fails(spec):
    model = spec.model()
    method = spec.handle.video_method
    count = hooks(model)
    handle = attach(model, ON)
    assert hooks(model) > count and method in model.model.__dict__
    with pytest.raises(ValueError, match="already attached"):
        attach(model, ON)
    handle.remove()
    handle.remove()  # idempotent
    assert hooks(model) == count
    assert method not in model.model.__dict__
    assert not hasattr(model, "_ustc_handle")
    with attach(model, ON) as again:  # attachable again; detached on exit
        assert again.attached
    assert hooks(model) == count


@every_backbone
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_token_counts_come_from_the_kv_cache(spec, attn):
    check_token_counts_come_from_the_kv_cache(spec, attn)


@every_backbone
@pytest.mark.parametrize(
    "attn,merger,batch",
    [
        ("sdpa", "text-aware", 1),
        ("eager", "text-aware", 2),
        ("sdpa", "last-token", 2),
        ("eager", "none", 1),
    ],
)
def test_every_decode_step_matches_a_no_cache_recompute(spec, attn, merger, batch):
    check_decode_matches_a_no_cache_recompute(spec, attn, ON.replace(merger=merger), batch)


@every_backbone
@pytest.mark.parametrize(
    "attn,merger,where",
    [
        ("sdpa", "text-aware", "first"),
        ("eager", "text-aware", "first"),
        ("sdpa", "last-token", "first"),
        ("sdpa", "text-aware", "last"),
    ],
)
def test_merge_at_the_first_and_last_attention_layer_decodes_as_the_no_cache_recompute(
    spec, attn, merger, where
):
    """K = 0 (a hybrid: its first attention layer), where every attention layer's cache holds
    the merged sequence so the decode masks are built over merged columns only, and K = the
    last attention layer."""
    model = spec.model(attn)
    k = attention_layers(model)[0 if where == "first" else -1]
    config = ON.replace(merger=merger, layer=k)
    check_decode_matches_a_no_cache_recompute(spec, attn, config, batch=2, model=model)


@every_backbone
def test_external_stage_compresses_the_models_own_video_features(spec):
    model = spec.model()
    inputs = spec.inputs(model, batch=2)
    handle = attach(model, ON.replace(merger="none"))
    with torch.no_grad():
        model(**inputs.kwargs)
    handle.remove()
    f, p = inputs.frames, inputs.tokens_per_frame
    assert handle.last.vision_scores.shape == (2, f, p)
    expected = Compressor(ON).compress(video_features(model, inputs), handle.last.vision_scores)
    assert torch.equal(handle.last.compression.indices, expected.indices)
    torch.testing.assert_close(handle.last.compression.tokens, expected.tokens)
    start = inputs.video_start  # the prompt before the video enters unchanged
    assert handle.last.input_positions[0, :start].tolist() == list(range(start))


@every_backbone
def test_text_attention_and_merge_at_layer_k_match_eager_weights(spec):
    check_text_attention_and_merge_at_layer_k(spec)


@every_backbone
@pytest.mark.parametrize("merger", MERGERS.names())
def test_generate_end_to_end_with_every_merger(spec, merger):
    model = spec.model(layers=2) if spec.layers is None else spec.model()
    inputs = spec.inputs(model, frames=4)
    config = CompressionConfig(retention=0.2, merger=merger, layer=1, keep_ratio=0.5)
    handle = attach(model, config)
    out = generate(model, inputs.kwargs, steps=3)
    handle.remove()
    budget = config.budget(inputs.frames, inputs.tokens_per_frame)
    assert handle.stats.tokens_in == budget
    assert handle.stats.tokens_after_merge == config.kept_after_merge(budget)
    reduced = budget - config.kept_after_merge(budget)
    assert handle.stats.sequence_in - handle.stats.sequence_after_merge == reduced
    held = {  # layers < K hold the sequence that entered the LLM, layers >= K the merged one
        i: (handle.stats.sequence_after_merge if i >= config.layer else handle.stats.sequence_in)
        + 2
        for i in attention_layers(model)
    }
    assert kv_lengths(out.past_key_values) == held
    assert out.sequences.shape[1] == inputs.input_ids.shape[1] + 3


def _expands_videos_whole(model: Any, inputs: VideoInputs, beams: Callable[[], Any]) -> bool:
    """Whether ``generate`` hands the unattached model's video encoder each prompt's whole video
    (once, or repeated per beam) when it beam-searches, read from what the encoder receives:
    transformers 5.17 repeats a frames-as-images video (InternVL's (B*F, C, H, W)
    ``pixel_values``) frame by frame, so its expanded rows see other prompts' frames."""
    handle = attach(model, ON)
    base, name, argument = handle.base_model(), handle.video_method, handle.video_argument
    handle.remove()
    video, seen = inputs.kwargs[argument], []
    original = getattr(base, name)

    @functools.wraps(original)  # generate() routes its arguments by this signature
    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v)))
        return original(*args, **kwargs)

    setattr(base, name, spy)  # this instance only; deleted below
    try:
        beams()
    finally:
        delattr(base, name)
    rows = inputs.input_ids.shape[0]
    whole = video.reshape(rows, -1, *video.shape[1:]).repeat_interleave(2, dim=0)
    whole = whole.reshape(-1, *video.shape[1:])
    return all(torch.equal(got, video) or torch.equal(got, whole) for got in seen)


@every_backbone
def test_beam_search_with_several_returned_sequences(spec):
    model = spec.model()
    inputs = spec.inputs(model, batch=2)

    def beams() -> Any:
        with torch.no_grad():
            return model.generate(
                **inputs.kwargs,
                max_new_tokens=3,
                num_beams=2,
                num_return_sequences=2,
                return_dict_in_generate=True,
            )

    if not spec.beam_search_upstream:
        try:
            beams()
        except ValueError as exc:
            pytest.skip(
                f"transformers {transformers.__version__} cannot beam-search a {spec} video "
                f"even without ustc ({exc})"
            )
    if not _expands_videos_whole(model, inputs, beams):
        pytest.skip(
            f"transformers {transformers.__version__} expands a {spec} video frame by frame for "
            "beam search (each frame repeated, not each prompt's video), so even without ustc the "
            "expanded rows see other videos"
        )
    handle = attach(model, ON)
    out = beams()
    handle.remove()
    n = inputs.input_ids.shape[1]
    assert out.sequences.shape == (4, n + 3)
    assert torch.equal(out.sequences[:, :n], inputs.input_ids.repeat_interleave(2, dim=0))
    budget = ON.budget(inputs.frames, inputs.tokens_per_frame)
    entering = n - inputs.frames * inputs.tokens_per_frame + budget
    first = attention_layers(model)[0]
    if first >= ON.layer:  # a hybrid LLM whose first attention layer is K holds the merged
        entering -= budget - ON.kept_after_merge(budget)
    assert out.past_key_values.layers[first].keys.shape[-2] == entering + 2
    # the 2 videos' scores were repeated for the 4 expanded rows, in order
    assert handle.last.vision_scores.shape[0] == 4
    assert torch.equal(handle.last.vision_scores[0], handle.last.vision_scores[1])


@every_backbone
def test_manual_decoding_without_generate_matches_generate(spec):
    model = spec.model()
    inputs = spec.inputs(model)
    handle = attach(model, ON)
    out = generate(model, inputs.kwargs, steps=4)
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


@every_backbone
def test_text_only_prompts_pass_through_unchanged(spec):
    model = spec.model()
    ids = torch.randint(5, 80, (1, 9))
    plain = model.generate(input_ids=ids, max_new_tokens=3)
    handle = attach(model, ON)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=3), plain)
    assert handle.stats.prefills == 0
    handle.remove()


PADDED = {
    "text-aware": ON,
    "no-merging": ON.replace(merger="none"),
    # FastV: nothing removed before the LLM, so the prompt enters it unchanged, padding and all
    "fastv": CompressionConfig(retention=1.0, merger="fastv", layer=1, keep_ratio=0.5),
}


@every_backbone
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("config", list(PADDED))
@pytest.mark.parametrize("side", ["left", "right"])
def test_each_row_of_a_padded_batch_equals_its_prompt_alone(spec, attn, config, side):
    """B > 1 prompts of different lengths (and videos of different sizes), one video each,
    padded on the left (chat templates, lmms-eval) or the right: each row generates the tokens
    its prompt generates alone, with the same logits up to float rounding, and its KV cache holds
    exactly the tokens the prompt alone keeps; everything else in the cache is masked padding."""
    config = PADDED[config]
    if side == "right" and config.retention == 1.0 and not spec.right_padding:
        pytest.skip(f"{spec.name} itself answers right-padded prompts unlike the prompt alone")
    steps = 5
    model = spec.model(attn)
    rows = [spec.inputs(model, **row) for row in spec.padded_rows]
    handle = attach(model, config)
    alone = []
    for row in rows:
        out = generate(model, row.kwargs, steps=steps)
        alone.append((out, handle.stats.sequence_in, handle.stats.sequence_after_merge))
    batch = pad_batch(rows, side)
    out = generate(model, batch, steps=steps)
    last = handle.last
    handle.remove()

    n = batch["input_ids"].shape[1]
    for i, (row, (single, entering, after_k)) in enumerate(zip(rows, alone, strict=True)):
        assert torch.equal(out.sequences[i, n:], single.sequences[0, row.input_ids.shape[1] :])
        for step, (got, want) in enumerate(zip(out.logits, single.logits, strict=True)):
            torch.testing.assert_close(
                got[i], want[0], atol=2e-5, rtol=1e-5, msg=f"row {i}, step {step}"
            )
        # the cache of layers < K holds the row's prompt as alone; the rest are padding slots
        real = batch["attention_mask"][i].bool()

        def held(columns: torch.Tensor, real: torch.Tensor = real) -> int:
            return int(((columns >= 0) & real[columns.clamp(min=0)]).sum())

        kept = last.input_positions[i]
        assert held(kept) == entering
        budget = config.budget(row.frames, row.tokens_per_frame)
        shift = n - row.input_ids.shape[1] if side == "left" else 0
        assert int(torch.isin(kept, row.video_columns() + shift).sum()) == budget
        if config.merger != "none":
            assert held(last.merged_positions[i]) == after_k
    # the cache is as long as the longest row, plus the fed-back tokens
    lengths = kv_lengths(out.past_key_values)
    for i, length in lengths.items():
        merged = config.merger != "none" and i >= config.layer
        columns = last.merged_positions if merged else last.input_positions
        assert length == columns.shape[1] + steps - 1


@every_backbone
def test_has_an_lmms_eval_model_and_a_flops_spec(spec):
    plugin = LMMS_EVAL_MODELS[spec.lmms_eval]
    model = spec.model()
    assert plugin.model_class == type(model).__name__
    if spec.flops is not None:
        public = MODEL_SPECS[spec.flops]
        assert public.num_layers > 0 and public.tokens_per_frame > 0
    # the LLM sizes read from the model's own config are those of its decoder
    read = ModelSpec.from_config(model.config, frames=2, tokens_per_frame=8)
    lm = model.model.language_model
    assert read.num_layers == len(lm.layers)
    assert read.hidden_size == lm.config.hidden_size


@every_backbone
def test_exact_flops_count_equals_the_measurement_of_the_llm(spec):
    """The exact count of ``ustc.flops`` (GQA, SwiGLU, head_dim) equals what torch's
    FlopCounterMode measures on the tiny model's own language model, prefill then 3 decode
    steps with a KV cache, eager attention."""
    if not spec.flops_measured:
        pytest.skip(f"{spec.name}: the exact count models dense softmax-attention layers only")
    from torch.utils.flop_counter import FlopCounterMode

    model = spec.model("eager")
    lm = model.model.language_model
    read = ModelSpec.from_config(model.config, frames=4, tokens_per_frame=6)
    schedule = TokenSchedule.from_config(VANILLA, read, text_tokens=6)
    generated = 3
    expected = exact(read, schedule, generated).total
    embeds = torch.randn(1, schedule.tokens[0], read.hidden_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = lm(inputs_embeds=embeds, use_cache=True)
        cache, hidden = out.past_key_values, out.last_hidden_state[:, -1:]
        for _ in range(generated):
            out = lm(inputs_embeds=hidden, past_key_values=cache, use_cache=True)
            hidden = out.last_hidden_state
    measured = counter.get_total_flops() // 2
    # versions that build RoPE's frequencies with a matmul add well under 0.1 % here
    assert abs(measured - expected) / expected < 0.01, (measured, expected)


@every_backbone
@pytest.mark.parametrize("use_generate", [False, True])
def test_kept_tokens_keep_their_uncompressed_positions(spec, use_generate):
    """The LLM sees each kept token at its position in the uncompressed prompt (1-D, or the
    model's own M-RoPE ``get_rope_index``), every token outside the video is kept, and the first
    generated token continues after the uncompressed prompt."""
    model = spec.model()
    inputs = spec.inputs(model, frames=6)  # Qwen3-VL: timestamps of 2, 2, 3 tokens
    handle = attach(model, ON.replace(merger="none"))
    seen = []
    # registered after attach, so it runs after the compression hook of the language model
    probe = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["position_ids"]), with_kwargs=True
    )
    if use_generate:
        generate(model, inputs.kwargs, steps=2)
    else:
        with torch.no_grad():
            model(**inputs.kwargs)
    probe.remove()
    handle.remove()
    n = inputs.input_ids.shape[1]
    full = original_positions(model, inputs, n)
    columns = handle.last.input_positions[0]
    prefill = seen[0] if seen[0].dim() == 2 else seen[0][-3:]  # generate() prepends a text row
    assert prefill.shape[-1] == columns.numel() < n
    assert torch.equal(prefill[..., 0, :], full[..., 0, columns])
    other = torch.ones(n, dtype=torch.bool)
    other[inputs.video_columns()] = False
    assert bool(torch.isin(other.nonzero()[:, 0], columns).all())
    if use_generate:
        step = seen[1] if seen[1].dim() == 2 else seen[1][-3:]
        assert torch.equal(step[..., 0, 0], full[..., 0, -1] + 1)


@every_backbone
def test_a_vision_layer_outside_the_encoder_is_refused(spec):
    model = spec.model()
    with pytest.raises(ValueError, match="vision_layer must be in"):
        attach(model, ON, vision_layer=99)


VISION_CASES = [
    pytest.param(
        spec, layer, sizes, id=f"{spec.name}-layer{layer}-" + "-".join(map(str, sizes.values()))
    )
    for spec in BACKBONES
    for layer, sizes in spec.vision_cases
]


@pytest.mark.parametrize("spec,layer,sizes", VISION_CASES)
def test_vision_scores_equal_the_families_eager_reference(spec, layer, sizes):
    """Eq. (1) captured under sdpa = the spec's reference from eager attention maps, at the
    vision layer chosen with ``vision_layer`` (videos of ragged size too)."""
    check_vision_scores(spec, spec.vision_reference, layer, layer, **sizes, width=32)


@pytest.mark.parametrize("spec", [s for s in BACKBONES if s.vision_reference is not None], ids=str)
def test_m_rope_inputs_without_token_types_or_a_grid_per_prompt_are_refused(spec):
    """M-RoPE backbones: positions need ``mm_token_type_ids`` (without it transformers silently
    falls back to 1-D positions), and each prompt its own ``video_grid_thw`` row."""
    model = spec.model()
    inputs = spec.inputs(model, batch=2)
    handle = attach(model, ON)
    no_types = {k: v for k, v in inputs.kwargs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match=f"{type(model).__name__} needs mm_token_type_ids"):
        model(**no_types)
    grids = dict(inputs.kwargs, video_grid_thw=inputs.kwargs["video_grid_thw"][:1])
    with pytest.raises(ValueError, match="1 videos for 2 prompts"):
        model(**grids)
    no_grid = {k: v for k, v in inputs.kwargs.items() if k != "video_grid_thw"}
    with pytest.raises(ValueError, match="need video_grid_thw"):
        model(**no_grid)
    handle.remove()
