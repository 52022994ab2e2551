"""Padded batches through ``generate()``: every row of a batch equals its prompt run alone.

B > 1 prompts of different lengths (and, for Qwen2.5-VL, videos of different sizes), one video per
prompt, padded on the left (chat templates, lmms-eval) or on the right, with and without in-LLM
merging, eager and sdpa.  Greedy decoding: each row generates the tokens its prompt generates
alone, with the same logits up to float rounding, and its KV cache holds exactly the tokens the
prompt alone keeps (the budget before layer K, the kept count after it); everything else in the
cache is padding, masked.
"""

import pytest
import torch
from models_helpers import (
    VideoInputs,
    internvl_video_inputs,
    llava_video_inputs,
    qwen3_video_inputs,
    qwen_video_inputs,
    tiny_internvl,
    tiny_llava_next_video,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
)

from ustc import CompressionConfig
from ustc.models import attach

torch.set_num_threads(1)

STEPS = 5
MERGING = CompressionConfig(retention=0.25, merger="text-aware", layer=1, keep_ratio=0.5)
NO_MERGING = MERGING.replace(merger="none")
#: FastV: nothing removed before the LLM, so the prompt enters it unchanged, padding and all
FASTV = CompressionConfig(retention=1.0, merger="fastv", layer=1, keep_ratio=0.5)


def pad_batch(rows: list[VideoInputs], side: str) -> dict[str, torch.Tensor]:
    """One batch of single-prompt inputs, padded to the longest prompt with id 0 on ``side``."""
    n = max(r.input_ids.shape[1] for r in rows)

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        fill = torch.full((x.shape[0], n - x.shape[1]), value, dtype=x.dtype)
        return torch.cat([fill, x] if side == "left" else [x, fill], dim=1)

    batch = {
        "input_ids": torch.cat([pad(r.input_ids, 0) for r in rows]),
        "attention_mask": torch.cat([pad(r.kwargs["attention_mask"], 0) for r in rows]),
    }
    for key in ("pixel_values_videos", "pixel_values"):  # InternVL: the frames as images
        if key in rows[0].kwargs:
            batch[key] = torch.cat([r.kwargs[key] for r in rows])
    if "video_grid_thw" in rows[0].kwargs:
        batch["video_grid_thw"] = torch.cat([r.kwargs["video_grid_thw"] for r in rows])
        batch["mm_token_type_ids"] = torch.cat(
            [pad(r.kwargs["mm_token_type_ids"], 0) for r in rows]
        )
    return batch


def generate(model, kwargs):
    with torch.no_grad():
        return model.generate(
            **kwargs, max_new_tokens=STEPS, return_dict_in_generate=True, output_logits=True
        )


def llava_rows(model):
    return [
        llava_video_inputs(model, prefix=3, suffix=9, seed=1),
        llava_video_inputs(model, prefix=6, suffix=4, seed=2),
        llava_video_inputs(model, prefix=5, suffix=6, seed=3),
    ]


def internvl_rows(model):
    return [
        internvl_video_inputs(model, prefix=3, suffix=9, seed=1),
        internvl_video_inputs(model, prefix=6, suffix=4, seed=2),
        internvl_video_inputs(model, prefix=5, suffix=6, seed=3),
    ]


def qwen_rows(model):
    return [
        qwen_video_inputs(model, prefix=3, suffix=9, seed=1),
        qwen_video_inputs(model, prefix=6, suffix=4, seed=2, height=48, width=32),
        qwen_video_inputs(model, prefix=5, suffix=6, seed=3, frames=2),
    ]


def qwen3_rows(model):
    return [
        qwen3_video_inputs(model, prefix=3, suffix=9, seed=1),
        qwen3_video_inputs(model, prefix=6, suffix=4, seed=2, height=48, width=32),
        qwen3_video_inputs(model, prefix=5, suffix=6, seed=3, frames=6),
    ]


BACKBONES = {
    "llava-onevision": (tiny_llava_onevision, llava_rows),
    "qwen2.5-vl": (tiny_qwen2_5_vl, qwen_rows),
    "qwen3-vl": (tiny_qwen3_vl, qwen3_rows),
    "qwen2-vl": (tiny_qwen2_vl, qwen_rows),
    "llava-next-video": (tiny_llava_next_video, llava_rows),
    "internvl": (tiny_internvl, internvl_rows),
}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "config", [MERGING, NO_MERGING, FASTV], ids=["text-aware", "no-merging", "fastv"]
)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_each_row_of_a_padded_batch_equals_its_prompt_alone(backbone, attn, config, side):
    build, make_rows = BACKBONES[backbone]
    model = build(attn=attn, layers=3)
    rows = make_rows(model)
    handle = attach(model, config)
    alone = []
    for row in rows:
        out = generate(model, row.kwargs)
        alone.append((out, handle.stats.sequence_in, handle.stats.sequence_after_merge))
    batch = pad_batch(rows, side)
    out = generate(model, batch)
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

        def held(columns, real=real):  # the row's own tokens among the columns a cache holds
            return int(((columns >= 0) & real[columns.clamp(min=0)]).sum())

        kept = last.input_positions[i]
        assert held(kept) == entering
        budget = config.budget(row.frames, row.tokens_per_frame)
        video = row.video_columns()
        shift = n - row.input_ids.shape[1] if side == "left" else 0
        assert int(torch.isin(kept, video + shift).sum()) == budget
        if config.merger != "none":
            assert held(last.merged_positions[i]) == after_k
    # the cache is as long as the longest row, plus the fed-back tokens
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert lengths[0] == last.input_positions.shape[1] + STEPS - 1
    if config.merger != "none":
        assert lengths[1:] == [last.merged_positions.shape[1] + STEPS - 1] * 2


def test_rows_with_videos_of_different_sizes_keep_different_numbers_of_tokens():
    model = tiny_qwen2_5_vl(layers=3)
    rows = qwen_rows(model)
    handle = attach(model, MERGING)
    generate(model, pad_batch(rows, "left"))
    groups = handle.last.groups
    handle.remove()
    sizes = {(g.frames, g.tokens_per_frame): g.rows.tolist() for g in groups}
    assert sizes == {(2, 16): [0], (2, 24): [1], (1, 16): [2]}
    counts = [int((handle.last.input_positions[i] >= 0).sum()) for i in range(3)]
    assert len(set(counts)) > 1  # padded to the longest, masked
