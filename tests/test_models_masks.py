"""Every attention implementation transformers offers (``ustc/models/masks.py``).

flex_attention hands the decoder layers a ``BlockMask``, which cannot be cut: it is rebuilt for
the merged sequence.  A function registered through ``AttentionInterface`` runs as sdpa does.
Each gives the greedy tokens sdpa gives, for a single prompt and a padded batch, and what cannot
be supported is refused at ``attach``.  FlashAttention 2/3 and kernels-hub implementations need a
GPU: ``benchmarks/gpu.sh`` runs their checks (``benchmarks/gpu_attention.py``).
"""

import pytest
import torch
from models_helpers import (
    internvl_video_inputs,
    llava_video_inputs,
    pad_batch,
    tiny_internvl,
    tiny_llava_next_video,
    tiny_llava_onevision,
)
from torch.nn.attention.flex_attention import create_mask
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ustc import CompressionConfig
from ustc.models import attach
from ustc.models.masks import rebuilt_layer_mask

torch.set_num_threads(1)

STEPS = 5
MERGING = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)
#: transformers' flex_attention support is per model class: these three classes have it
FLEX = {
    "llava-onevision": (tiny_llava_onevision, llava_video_inputs),
    "llava-next-video": (tiny_llava_next_video, llava_video_inputs),
    "internvl": (tiny_internvl, internvl_video_inputs),
}

calls = {"n": 0}


def counted_sdpa(*args, **kwargs):
    """A user's attention function: sdpa, counting its calls (it must really run)."""
    calls["n"] += 1
    return sdpa_attention_forward(*args, **kwargs)


AttentionInterface.register("ustc_test_attention", counted_sdpa)
AttentionInterface.register("ustc_test_masked", counted_sdpa)
AttentionMaskInterface.register("ustc_test_masked", sdpa_mask)


def generate(build, inputs, attn, config, batch_side=None):
    model = build(attn=attn)
    rows = [inputs(model, prefix=3, suffix=9, seed=1), inputs(model, prefix=6, suffix=4, seed=2)]
    kwargs = rows[0].kwargs if batch_side is None else pad_batch(rows, batch_side)
    with attach(model, config) as handle, torch.no_grad():
        out = model.generate(**kwargs, max_new_tokens=STEPS)
        assert handle.stats.tokens_after_merge < handle.stats.tokens_in
    return out


@pytest.mark.parametrize("backbone", ["llava-onevision", "internvl"])
def test_flex_attention_gives_the_tokens_of_sdpa(backbone):
    # padded batches under flex_attention fail in torch's CPU compiler (inductor's C++ build)
    # without ustc attached as well: benchmarks/gpu.sh runs them on a GPU; the padded masks
    # themselves are checked below
    build, inputs = FLEX[backbone]
    want = generate(build, inputs, "sdpa", MERGING)
    got = generate(build, inputs, "flex_attention", MERGING)
    assert torch.equal(got, want)


@pytest.mark.parametrize("queries", [None, 1], ids=["prefill", "decode"])
def test_the_rebuilt_block_mask_is_the_cut_eager_mask(queries):
    """A padded batch at a layer >= K: the BlockMask built for flex_attention allows exactly
    what the eager mask cut to the kept columns allows."""
    model = tiny_llava_onevision(attn="flex_attention")
    handle = attach(model, MERGING)
    lm = handle.language_model()
    # kept columns of three rows of different lengths, -1 on the left: padding slots
    keep = torch.tensor([[-1, -1, 0, 2, 3, 5, 6], [0, 1, 2, 3, 4, 5, 6], [-1, 0, 1, 2, 4, 5, 6]])
    valid = keep >= 0
    q = keep.shape[1] if queries is None else queries
    hidden = torch.zeros(3, q, 64)
    kwargs = {}
    if queries is not None:  # decode: the layer's cache holds all but the new token
        from transformers import DynamicCache

        cache = DynamicCache(config=lm.config)
        for index in range(len(handle.decoder_layers())):
            cache.update(
                torch.zeros(3, 2, keep.shape[1] - q, 16),
                torch.zeros(3, 2, keep.shape[1] - q, 16),
                index,
            )
        kwargs["cache"] = cache
    block = rebuilt_layer_mask(handle, 1, hidden, valid, kwargs)
    dense = create_mask(block.mask_mod, 3, 1, q, keep.shape[1])
    rows = torch.arange(keep.shape[1] - q, keep.shape[1])
    causal = torch.arange(keep.shape[1])[None, :] <= rows[:, None]
    want = (causal[None] & valid[:, None, :])[:, None]
    real = valid[:, None, -q:, None]  # padding query rows attend to anything: not compared
    assert torch.equal(dense & real, want & real)
    lm.config._attn_implementation = "eager"
    eager = rebuilt_layer_mask(handle, 1, hidden, valid, kwargs)
    assert torch.equal((eager == 0) & real, want & real)
    handle.remove()


@pytest.mark.parametrize(
    "name, side",
    [
        ("ustc_test_attention", None),
        # without a registered mask function transformers passes the function no padding mask:
        # a padded batch needs one (AttentionMaskInterface.register)
        ("ustc_test_masked", None),
        ("ustc_test_masked", "left"),
    ],
)
def test_a_registered_attention_function_gives_the_tokens_of_sdpa(name, side):
    want = generate(tiny_llava_onevision, llava_video_inputs, "sdpa", MERGING, side)
    calls["n"] = 0
    got = generate(tiny_llava_onevision, llava_video_inputs, name, MERGING, side)
    assert calls["n"] > 0
    assert torch.equal(got, want)


def test_unsupported_attention_is_refused_at_attach():
    model = tiny_llava_onevision()
    model.model.language_model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match="paged attention"):
        attach(model, MERGING)
    model.model.language_model.config._attn_implementation = "no_such_attention"
    with pytest.raises(ValueError, match="not registered in transformers' AttentionInterface"):
        attach(model, MERGING)
    assert getattr(model, "_ustc_handle", None) is None


# ------------------------------------------------------------------------------- GPU only
# benchmarks/gpu.sh runs these on the lent GPU (its pytest step); here they are skipped.
def _cuda_implementations() -> list:
    import importlib.util

    found = []
    for name, package in (
        ("flash_attention_2", "flash_attn"),
        ("flash_attention_3", "flash_attn_interface"),
        ("kernels-community/flash-attn", "kernels"),
        ("flex_attention", "torch"),
    ):
        reason = None
        if not torch.cuda.is_available():
            reason = "needs CUDA"
        elif importlib.util.find_spec(package) is None:
            reason = f"needs {package}"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        found.append(pytest.param(name, marks=marks, id=name))
    return found


def _cuda_generate(attn: str, side, session: bool):
    from test_session import split

    import ustc

    model = tiny_llava_onevision(attn=attn, layers=4, dtype=torch.bfloat16).cuda()
    rows = [
        llava_video_inputs(model, prefix=3, suffix=9, seed=1),
        llava_video_inputs(model, prefix=6, suffix=4, seed=2),
    ]
    kwargs = rows[0].kwargs if side is None else pad_batch(rows, side)
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    options = dict(max_new_tokens=STEPS, return_dict_in_generate=True, output_logits=True)
    with attach(model, MERGING), torch.no_grad():
        if session:
            rows[0].kwargs = kwargs
            prefix, question = split(rows[0], question_length=7)
            prepared = ustc.prepare(model, prefix)
            return prepared.ask(question, **options)
        return model.generate(**kwargs, **options)


@pytest.mark.parametrize("mode", ["single", "padded", "session"])
@pytest.mark.parametrize("attn", _cuda_implementations())
def test_cuda_attention_gives_the_tokens_of_sdpa_where_numerics_allow(attn, mode):
    """bfloat16 on the GPU: each step's token equals sdpa's wherever sdpa's top two logits are
    further apart than the two implementations' logits differ (a near tie may flip)."""
    side = "left" if mode == "padded" else None
    want = _cuda_generate("sdpa", side, mode == "session")
    got = _cuda_generate(attn, side, mode == "session")
    for step, (a, b) in enumerate(zip(got.logits, want.logits, strict=True)):
        gap = (a.float() - b.float()).abs().amax(dim=-1)
        top = b.float().topk(2, dim=-1).values
        clear = (top[:, 0] - top[:, 1]) > 2 * gap
        chosen_got, chosen_want = a.argmax(-1), b.argmax(-1)
        assert torch.equal(chosen_got[clear], chosen_want[clear]), f"step {step}"
        if not bool(clear.all()):
            break  # a near tie may flip: the later steps continue different sequences
