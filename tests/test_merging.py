"""Eq. (5)-(10), in-LLM merging, against slow references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ustc import MERGERS
from ustc.merging import (
    decision_score,
    max_text_attention,
    max_text_similarity,
    merge_into_kept,
    min_max_normalize,
)


def cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def reference_text_aware(visual, text, attn, lam, keep):
    """Eq. (5)-(10) for one video, one token at a time."""
    nv, nq = visual.shape[0], text.shape[0]
    a_m = [max(float(attn[i, j]) for i in range(nq)) for j in range(nv)]  # Eq. 5-6
    s_m = [max(cos(visual[j], text[t]) for t in range(nq)) for j in range(nv)]  # Eq. 8

    def norm(v):  # Eq. 7
        lo, hi = min(v), max(v)
        return [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in v]

    score = [(1 - lam) * a + lam * s for a, s in zip(norm(a_m), norm(s_m), strict=True)]  # Eq. 9
    kept = sorted(sorted(range(nv), key=lambda j: (-score[j], j))[:keep])
    groups = {k: [k] for k in kept}
    for j in range(nv):
        if j not in groups:  # Eq. 10: into the most similar kept token, ties to the lower index
            r = max(kept, key=lambda k: (cos(visual[j], visual[k]), -k))
            groups[r].append(j)
    tokens = torch.stack([visual[groups[k]].mean(dim=0) for k in kept])
    return score, kept, tokens


@settings(max_examples=40, deadline=None)
@given(
    nv=st.integers(1, 12),
    nq=st.integers(1, 5),
    lam=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    keep_frac=st.floats(0.05, 1.0),
    seed=st.integers(0, 10_000),
)
def test_text_aware_matches_reference(nv, nq, lam, keep_frac, seed):
    g = torch.Generator().manual_seed(seed)
    visual = torch.randn(2, nv, 4, generator=g, dtype=torch.float64)
    text = torch.randn(2, nq, 4, generator=g, dtype=torch.float64)
    attn = torch.rand(2, nq, nv, generator=g, dtype=torch.float64)
    keep = max(1, math.ceil(keep_frac * nv))
    merger = MERGERS.build("text-aware", lam=lam)
    score = merger.scores(visual, text, attn)
    result = merger.merge(visual, text, attn, keep)
    for b in range(2):
        ref_score, kept, tokens = reference_text_aware(visual[b], text[b], attn[b], lam, keep)
        torch.testing.assert_close(
            score[b].double(), torch.tensor(ref_score, dtype=torch.float64), atol=1e-6, rtol=1e-5
        )
        assert result.indices[b].tolist() == kept
        torch.testing.assert_close(result.tokens[b], tokens)


def test_equation_pieces():
    attn = torch.tensor([[[0.1, 0.5, 0.2], [0.3, 0.1, 0.2]]])
    assert max_text_attention(attn)[0].tolist() == pytest.approx([0.3, 0.5, 0.2])
    assert min_max_normalize(torch.tensor([[2.0, 4.0, 3.0]])).tolist() == [[0.0, 1.0, 0.5]]
    assert min_max_normalize(torch.tensor([[3.0, 3.0]])).tolist() == [[0.0, 0.0]]
    v, t = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]), torch.tensor([[[0.0, 1.0]]])
    assert max_text_similarity(v, t).tolist() == [[0.0, 1.0]]
    assert decision_score(torch.tensor([1.0]), torch.tensor([0.0]), 0.25).item() == 0.75


def test_last_token_uses_the_last_text_row():
    visual, text = torch.randn(1, 4, 3), torch.randn(1, 2, 3)
    attn = torch.tensor([[[0.9, 0.0, 0.0, 0.1], [0.0, 0.2, 0.7, 0.1]]])
    result = MERGERS.build("last-token").merge(visual, text, attn, 2)
    assert result.indices.tolist() == [[1, 2]]
    assert set(result.assignment[0].tolist()) <= {0, 1}


def test_kept_tokens_without_merges_are_bit_exact():
    visual = torch.randn(1, 6, 5, dtype=torch.bfloat16)
    keep = torch.ones(1, 6, dtype=torch.bool)
    assert torch.equal(merge_into_kept(visual, keep, 6).tokens, visual)


def test_merger_errors():
    with pytest.raises(ValueError, match="lam"):
        MERGERS.build("text-aware", lam=1.5)
    merger = MERGERS.build("text-aware")
    v, t = torch.randn(1, 4, 3), torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="needs the text-to-visual attention"):
        merger.merge(v, t, None, 2)
    with pytest.raises(ValueError, match=r"\(B, Nq, Nv\)"):
        merger.merge(v, t, torch.rand(1, 3, 4), 2)
    with pytest.raises(ValueError, match="at least one text token"):
        merger.merge(v, torch.randn(1, 0, 3), torch.rand(1, 0, 4), 2)
    with pytest.raises(ValueError, match="tokens to keep"):
        merger.merge(v, t, torch.rand(1, 2, 4), 5)


@pytest.mark.parametrize("name", MERGERS.names())
def test_masked_text_of_a_padded_batch_equals_each_row_alone(name):
    # rows with 3 and 6 text tokens, right-aligned in one (2, 6) batch; the padding columns hold
    # values that would win every max if they counted
    g = torch.Generator().manual_seed(0)
    visual = torch.randn(2, 10, 8, generator=g)
    lengths = (3, 6)
    text = torch.randn(2, 6, 8, generator=g)
    attention = torch.rand(2, 6, 10, generator=g)
    mask = torch.arange(6)[None, :] >= torch.tensor([6 - n for n in lengths])[:, None]
    text = torch.where(mask[..., None], text, 100.0 * visual[:, :1])
    attention = torch.where(mask[..., None], attention, 1.0)
    merger = MERGERS.build(name)
    batched = merger.merge(visual, text, attention, 4, text_mask=mask)
    for row, n in enumerate(lengths):
        alone = merger.merge(
            visual[row : row + 1],
            text[row : row + 1, 6 - n :],
            attention[row : row + 1, 6 - n :],
            4,
        )
        assert torch.equal(batched.indices[row], alone.indices[0])
        assert torch.equal(batched.tokens[row], alone.tokens[0])
    if name == "text-aware":  # the padding would change the choice if it counted
        unmasked = merger.merge(visual, text, attention, 4)
        assert not torch.equal(unmasked.indices[0], batched.indices[0])
    with pytest.raises(ValueError, match="right-aligned"):
        merger.merge(visual, text, attention, 4, text_mask=mask.flip(1))
