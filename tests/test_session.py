"""Compress once, ask many (``ustc/session.py``): each question asked of a prepared video gives
the tokens (and, up to float rounding, the logits) of asking it alone, while the vision tower,
the compression and the prefix below layer K run once."""

import pytest
import torch
from models_helpers import (
    llava_video_inputs,
    qwen3_video_inputs,
    qwen_video_inputs,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen3_5,
    tiny_qwen3_vl,
)

import ustc
from ustc import CompressionConfig
from ustc.models import attach

torch.set_num_threads(1)

STEPS = 5
MERGING = CompressionConfig(retention=0.5, merger="text-aware", layer=2, keep_ratio=0.5)
CONFIGS = {
    "text-aware-K2": MERGING,
    "text-aware-K1": MERGING.replace(layer=1),
    "no-merging": MERGING.replace(merger="none"),
    "fastv": CompressionConfig(retention=1.0, merger="fastv", layer=1, keep_ratio=0.5),
}
BACKBONES = {
    "llava-onevision": (tiny_llava_onevision, llava_video_inputs),
    "qwen2.5-vl": (tiny_qwen2_5_vl, qwen_video_inputs),
    "qwen3-vl": (tiny_qwen3_vl, qwen3_video_inputs),
}
PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids")


def split(inputs, question_length):
    """(prefix inputs, question ids): the prompt cut ``question_length`` tokens before its end."""
    cut = inputs.input_ids.shape[1] - question_length
    prefix = {k: v[:, :cut] if k in PER_TOKEN else v for k, v in inputs.kwargs.items()}
    return prefix, inputs.input_ids[:, cut:]


def questions(first, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [
        first,
        torch.randint(5, 80, (1, 3), generator=g),
        torch.randint(5, 80, (12,), generator=g),
    ]


class Counter:
    """Counts forwards of a module and the sequence length its first input had each time."""

    def __init__(self, module):
        self.lengths = []
        self.hook = module.register_forward_pre_hook(self.seen, with_kwargs=True)

    def seen(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self.lengths.append(x.shape[-2] if x.dim() > 2 else x.shape[0])


def prepared(backbone, attn, config):
    """(model, handle, session, first question, vision-tower Counter): a tiny ``backbone``
    with ``config`` attached and its video prepared."""
    build, make_inputs = BACKBONES[backbone]
    model = build(attn=attn, layers=4)
    # the shared prefix ends two text tokens after the video: text may follow the video there
    prefix, first = split(make_inputs(model, suffix=9), question_length=7)
    handle = attach(model, config)
    session = ustc.prepare(model, prefix)
    base = handle.base_model()
    vision = Counter(base.visual if hasattr(base, "visual") else base.vision_tower)
    return model, handle, session, first, vision


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_each_question_gives_the_tokens_of_asking_it_alone(backbone, attn, config):
    config = CONFIGS[config]
    model, handle, session, first, vision = prepared(backbone, attn, config)
    layer0 = Counter(handle.decoder_layers()[0])
    compress = []
    original = handle.compressor.compress
    handle.compressor.compress = lambda *a, **k: compress.append(1) or original(*a, **k)
    for question in questions(first):
        asked = session.ask(
            question, max_new_tokens=STEPS, return_dict_in_generate=True, output_logits=True
        )
        shared = len(layer0.lengths)
        alone = model.generate(
            **session.prompt(question),
            max_new_tokens=STEPS,
            return_dict_in_generate=True,
            output_logits=True,
        )
        assert torch.equal(asked.sequences, alone.sequences)
        for got, want in zip(asked.logits, alone.logits, strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        # asked: layer 0 saw the question only (K > 0), then one token per step; alone: all
        q = question.reshape(-1).shape[0]
        asked_lengths, alone_lengths = layer0.lengths[:shared], layer0.lengths[shared:]
        first_length = q if session.shared_layers > 0 else alone_lengths[0]
        assert asked_lengths == [first_length] + [1] * (STEPS - 1)
        assert alone_lengths[0] > q
        del layer0.lengths[:]
    handle.compressor.compress = original
    # the vision tower and the compression ran for the questions asked alone only
    assert len(vision.lengths) == len(compress) == 3
    assert len(session.prefix.kv) == session.shared_layers
    expected = 4 if config.merger == "none" else config.layer  # K layers of the prefix shared
    assert session.shared_layers == expected
    session.close()
    handle.remove()


def test_a_session_under_flex_attention_gives_the_tokens_of_asking_alone():
    model = tiny_llava_onevision(attn="flex_attention", layers=4)
    prefix, first = split(llava_video_inputs(model, suffix=9), question_length=7)
    session = ustc.prepare(model, prefix, MERGING)
    for question in questions(first)[:2]:
        asked = session.ask(question, max_new_tokens=STEPS)
        assert torch.equal(asked, model.generate(**session.prompt(question), max_new_tokens=STEPS))
    session.close()


def test_sampling_gives_the_tokens_of_asking_alone_with_the_same_seed():
    model = tiny_llava_onevision(layers=4)
    prefix, first = split(llava_video_inputs(model, suffix=9), question_length=7)
    session = ustc.prepare(model, prefix, MERGING)
    for question in questions(first):
        torch.manual_seed(3)
        asked = session.ask(question, max_new_tokens=8, do_sample=True, top_k=20)
        torch.manual_seed(3)
        alone = model.generate(
            **session.prompt(question), max_new_tokens=8, do_sample=True, top_k=20
        )
        assert torch.equal(asked, alone)
    session.close()
    assert getattr(model, "_ustc_handle", None) is None  # prepare attached it, close removed it


def test_bad_input_is_refused_with_a_clear_error():
    model = tiny_llava_onevision(layers=4)
    inputs = llava_video_inputs(model, suffix=9)
    prefix, first = split(inputs, question_length=7)
    handle = attach(model, MERGING)
    with pytest.raises(ValueError, match="attached compressor has"):
        ustc.prepare(model, prefix, MERGING.replace(retention=0.25))
    with pytest.raises(ValueError, match=r"input_ids of shape \(1, n\)"):
        ustc.prepare(model, {**prefix, "input_ids": prefix["input_ids"].repeat(2, 1)})
    session = ustc.prepare(model, prefix)
    other = llava_video_inputs(model, suffix=9, seed=7).kwargs["pixel_values_videos"]
    with pytest.raises(ValueError, match="belong to the prepared video"):
        session.ask(first, pixel_values_videos=other, max_new_tokens=2)
    with pytest.raises(ValueError, match="context left after the prepared prefix"):
        session.ask(first, max_new_tokens=5000)
    with pytest.raises(ValueError, match="one non-empty row"):
        session.ask(first.repeat(2, 1), max_new_tokens=2)
    # another compressor attached since prepare: the session refuses rather than answer wrongly
    handle.remove()
    with pytest.raises(ValueError, match="no longer attached"):
        session.ask(first, max_new_tokens=2)
    handle = attach(model, MERGING.replace(retention=0.25))
    with pytest.raises(ValueError, match="no longer attached"):
        session.ask(first, max_new_tokens=2)
    handle.remove()
    # a closed session
    session.close()
    with pytest.raises(ValueError, match="closed"):
        session.ask(first, max_new_tokens=2)
    # after all that, the model generates as before (no prepared state left in the hooks)
    with attach(model, MERGING):
        out = model.generate(**inputs.kwargs, max_new_tokens=2)
    assert out.shape[1] == inputs.input_ids.shape[1] + 2


def test_qwen3_5_is_refused_at_prepare():
    model = tiny_qwen3_5()
    prefix, _ = split(qwen3_video_inputs(model, suffix=9), question_length=7)
    with pytest.raises(ValueError, match="recurrent state"):
        ustc.prepare(model, prefix, MERGING.replace(layer=1))
    assert getattr(model, "_ustc_handle", None) is None


def test_the_hooks_refuse_another_video_while_a_session_is_asked():
    model = tiny_llava_onevision(layers=4)
    inputs = llava_video_inputs(model, suffix=9)
    prefix, first = split(inputs, question_length=7)
    session = ustc.prepare(model, prefix, MERGING)
    other = llava_video_inputs(model, suffix=9, seed=7)
    # what ask() sets while it runs, with a video other than the prepared one
    session.asking, session.handle.resume = True, session
    try:
        with pytest.raises(ValueError, match="differs from the one it prepared"), torch.no_grad():
            model.generate(**other.kwargs, max_new_tokens=2)
    finally:
        session.asking, session.handle.resume = False, None
    session.close()


def test_the_session_cache_misses_on_another_video_or_config():
    from ustc.session import SessionCache

    model = tiny_llava_onevision(layers=4)
    first, second = llava_video_inputs(model, suffix=9), llava_video_inputs(model, suffix=9, seed=7)
    cache = SessionCache(4)

    def asked(handle, inputs):
        got = cache.ask(model, handle, inputs.kwargs, max_new_tokens=STEPS)
        with torch.no_grad():
            return torch.equal(got, model.generate(**inputs.kwargs, max_new_tokens=STEPS))

    with attach(model, MERGING) as handle:
        assert asked(handle, first) and asked(handle, second) and asked(handle, first)
    assert (cache.hits, cache.misses) == (1, 2)  # the first video reused once
    # another compressor (another config): the first video is prepared afresh, not reused
    with attach(model, MERGING.replace(retention=0.25)) as handle:
        assert asked(handle, first)
    assert (cache.hits, cache.misses) == (1, 3)
    cache.clear()


# ----------------------------------------------------------------- a batch of questions
def kv_widths(cache):
    return [layer.keys.shape[-2] for layer in cache.layers]


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_a_batch_of_questions_gives_the_padded_batch_and_each_question_alone(
    backbone, attn, config
):
    """``ask_batch`` answers questions of 7, 3 and 12 tokens in one ``generate()``: it returns
    what ``generate()`` returns on the left-padded batch of the three prompts (unreused), and
    each row's tokens are those of its question asked alone.  FastV lets the padding itself
    enter the LLM (nothing removed before it), the merging configs replace it by -1 slots."""
    config = CONFIGS[config]
    model, handle, session, first, vision = prepared(backbone, attn, config)
    asked_qs = questions(first)
    options = dict(max_new_tokens=STEPS, return_dict_in_generate=True, output_logits=True)
    layer0 = Counter(handle.decoder_layers()[0])
    asked = session.ask_batch(asked_qs, **options)
    # one generate(): no vision tower; layer 0 saw the (B, 12) padded questions, then 1 token
    assert vision.lengths == []
    widest = max(q.reshape(-1).shape[0] for q in asked_qs)
    if session.shared_layers > 0:
        assert layer0.lengths == [widest] + [1] * (STEPS - 1)
    n_p = session.prefix.keep.shape[1]
    if config.merger != "none":  # layers < K: the prefix once per row, then the questions
        widths = kv_widths(asked.past_key_values)
        assert widths[: session.shared_layers] == [n_p + widest + STEPS - 1] * config.layer

    batch = session.prompts(asked_qs)
    n = batch["input_ids"].shape[1]
    assert n == session.prefix_length + widest
    padded = model.generate(**batch, **options)
    assert torch.equal(asked.sequences, padded.sequences)
    for got, want in zip(asked.logits, padded.logits, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for i, question in enumerate(asked_qs):
        prompt = session.prompt(question)
        alone = model.generate(**prompt, **options)
        assert torch.equal(
            asked.sequences[i, n:], alone.sequences[0, prompt["input_ids"].shape[1] :]
        )
        for got, want in zip(asked.logits, alone.logits, strict=True):
            torch.testing.assert_close(got[i], want[0], atol=2e-5, rtol=1e-5)
    session.close()
    handle.remove()


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_a_sampled_batch_of_questions_gives_the_padded_batch_with_the_same_seed(backbone):
    build, make_inputs = BACKBONES[backbone]
    model = build(layers=4)
    prefix, first = split(make_inputs(model, suffix=9), question_length=7)
    session = ustc.prepare(model, prefix, MERGING)
    asked_qs = questions(first)
    options = dict(max_new_tokens=8, do_sample=True, top_k=20)
    torch.manual_seed(3)
    asked = session.ask_batch(asked_qs, **options)
    torch.manual_seed(3)
    padded = model.generate(**session.prompts(asked_qs), **options)
    assert torch.equal(asked, padded)
    # a single question through the batch path is the question asked alone
    assert torch.equal(
        session.ask_batch(asked_qs[1:2], max_new_tokens=STEPS),
        session.ask(asked_qs[1], max_new_tokens=STEPS),
    )
    session.close()


@pytest.mark.parametrize(
    "options",
    [dict(do_sample=True, num_return_sequences=2), dict(num_beams=3, num_return_sequences=2)],
    ids=["sampled-r2", "beams3-r2"],
)
def test_an_expanded_batch_of_questions_gives_the_padded_batch(options):
    """generate() repeats each row (num_return_sequences, beams): every copy gets the prepared
    video, and the beams reorder a cache that starts with the shared prefix."""
    model = tiny_qwen3_vl(layers=4)
    prefix, first = split(qwen3_video_inputs(model, suffix=9), question_length=7)
    session = ustc.prepare(model, prefix, MERGING)
    asked_qs = questions(first)
    torch.manual_seed(1)
    asked = session.ask_batch(asked_qs, max_new_tokens=STEPS, **options)
    torch.manual_seed(1)
    padded = model.generate(**session.prompts(asked_qs), max_new_tokens=STEPS, **options)
    assert asked.shape[0] == 6 and torch.equal(asked, padded)
    session.close()


def test_num_return_sequences_leaves_the_prepared_session_intact():
    """Regression: generate(num_return_sequences=r) repeats the video encoding it is given in
    place; ask() used to hand it the prepared one, fail mid-generate ("video features have shape
    (3, ...)") and leave every later question failing ("features and video tokens do not
    match").  Now each row gets a copy: r sampled answers, the prepared session unchanged."""
    model = tiny_qwen2_5_vl(layers=4)
    prefix, first = split(qwen_video_inputs(model, suffix=9), question_length=7)
    session = ustc.prepare(model, prefix, MERGING)
    options = dict(max_new_tokens=STEPS, do_sample=True, num_return_sequences=3)
    torch.manual_seed(1)
    asked = session.ask(first, **options)
    torch.manual_seed(1)
    assert torch.equal(asked, model.generate(**session.prompt(first), **options))
    assert torch.equal(
        session.ask(first, max_new_tokens=STEPS),
        model.generate(**session.prompt(first), max_new_tokens=STEPS),
    )
    session.close()


def test_a_bad_batch_of_questions_is_refused_before_any_work():
    model = tiny_llava_onevision(layers=4)
    prefix, first = split(llava_video_inputs(model, suffix=9), question_length=7)
    session = ustc.prepare(model, prefix, MERGING)
    layer0 = Counter(session.handle.decoder_layers()[0])
    short = torch.randint(5, 80, (3,))
    with pytest.raises(ValueError, match="questions is empty"):
        session.ask_batch([], max_new_tokens=2)
    with pytest.raises(ValueError, match="a list of token-id tensors"):
        session.ask_batch(first, max_new_tokens=2)  # a tensor, not a list of questions
    with pytest.raises(ValueError, match="one non-empty row"):
        session.ask_batch([short, first.repeat(2, 1)], max_new_tokens=2)
    with pytest.raises(ValueError, match="one non-empty row"):
        session.ask_batch([short, first[:, :0]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\(q,\) or \(1, q\)"):
        session.ask_batch([short, first[None]], max_new_tokens=2)
    # the short question would fit, the longest row does not
    limit = model.config.text_config.max_position_embeddings
    fits_short = limit - session.prefix_length - short.shape[0]
    session.prompt(short)  # valid alone
    with pytest.raises(ValueError, match=r"longest\) question \(7 tokens\)"):
        session.ask_batch([short, first], max_new_tokens=fits_short)
    with pytest.raises(ValueError, match="is the model's video_token"):
        session.ask_batch([short, first], pad_token_id=model.config.video_token_id)
    with pytest.raises(ValueError, match="belong to the prepared video"):
        session.ask_batch([short], pixel_values_videos=prefix["pixel_values_videos"])
    with pytest.raises(ValueError, match="attention_mask belong to the prepared video"):
        session.ask_batch([short], attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert layer0.lengths == []  # nothing ran
    session.close()
    with pytest.raises(ValueError, match="closed"):
        session.ask_batch([short], max_new_tokens=2)
