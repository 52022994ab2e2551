"""The lmms-eval plugin's cache of prepared videos (``session_cache``, ``ustc.session.SessionCache``):
consecutive questions about one video reuse its prepared session, the answers and token counts
equal those without the cache, the cache is bounded and logs its evictions."""

from __future__ import annotations

import pytest
import torch
from test_lmms_eval import _generate_requests, _tiny_lm, _toy_docs, lmms

from ustc.lmms_eval import BACKBONES
from ustc.session import SessionCache

ARGS = "retention=0.25,merger=text-aware,layer=1,max_frames_num=4"


def _docs() -> dict[int, dict]:
    docs = _toy_docs()
    video_a, video_b = docs[0]["video"], docs[1]["video"]
    return {
        0: {"video": video_a, "question": "what colour is the ball ?"},
        1: {"video": video_a, "question": "what is at the end of the video ?"},
        2: {"video": video_b, "question": "what colour is the ball ?"},
        3: {"video": video_a, "question": "what is the ball ?"},
    }


@lmms
@pytest.mark.parametrize("backbone", ["llava_onevision_ustc", "qwen2_5_vl_ustc"])
def test_answers_are_the_same_with_and_without_the_session_cache(backbone: str) -> None:
    from loguru import logger

    torch.set_num_threads(1)
    docs = _docs()
    answers, models = {}, {}
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="INFO")
    try:
        for size in (0, 1):
            models[size] = lm = _tiny_lm(backbone, f"{ARGS},session_cache={size}", docs)
            answers[size] = lm.generate_until(_generate_requests(docs))
    finally:
        logger.remove(sink)
    assert models[0].sessions is None  # the off switch
    cache = models[1].sessions
    # video A, A (reused), B (A evicted: one kept), A (prepared again)
    assert (cache.hits, cache.misses) == (1, 3)
    assert len(cache.sessions) == 1
    evictions = [m for m in messages if "evicted the prepared video" in m]
    assert len(evictions) == 2
    assert [r.text for r in answers[1]] == [r.text for r in answers[0]]
    assert [r.token_counts for r in answers[1]] == [r.token_counts for r in answers[0]]
    # and each answer is what the model generates on that prompt alone
    lm = models[0]
    for i, doc in docs.items():
        inputs = lm._to_device(lm._inputs(doc["question"], [doc["video"]]))
        with torch.no_grad():
            out = lm.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        text = lm.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answers[1][i].text == text.split("\n\n")[0]
    assert models[1].handle.stats.prefills == len(docs)  # preparing a prefix is no prefill


@lmms
def test_a_bad_session_cache_size_fails_before_the_model_loads() -> None:
    with pytest.raises(ValueError, match="session_cache must be a positive integer"):
        BACKBONES["llava_onevision_ustc"].create_from_arg_string(
            f"{ARGS},session_cache=-1", {"model": None, "pretrained": None}
        )
    with pytest.raises(ValueError, match="session cache size must be an integer >= 0"):
        SessionCache(-1)
