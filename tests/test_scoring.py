"""Eq. (1) and the scorers, against slow loop references."""

import math

import pytest
import torch

from ustc import SCORERS
from ustc.scoring import (
    attention_probs,
    cls_attention,
    mean_received_attention,
    redundancy,
)


def reference_attention(q, k):
    """A_h[i, j] = exp(q_i.k_j / sqrt d) / sum_l exp(q_i.k_l / sqrt d), one entry at a time."""
    b, h, n, d = q.shape
    out = torch.zeros(b, h, n, n, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                logits = [float(q[bi, hi, i] @ k[bi, hi, j]) / math.sqrt(d) for j in range(n)]
                top = max(logits)
                exps = [math.exp(x - top) for x in logits]
                for j in range(n):
                    out[bi, hi, i, j] = exps[j] / sum(exps)
    return out


def test_attention_probs_matches_softmax_by_hand():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(
        attention_probs(q, k).double(), reference_attention(q, k), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_mean_received_attention_matches_reference(chunk):
    torch.manual_seed(1)
    q, k = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    a = reference_attention(q, k).mean(dim=1)  # heads
    n = a.shape[-1]
    expected = torch.tensor(
        [
            [sum(a[b, i, j] for i in range(n) if i != j) / (n - 1) for j in range(n)]
            for b in range(2)
        ]
    )
    got = mean_received_attention(q, k, chunk=chunk)
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-6, rtol=1e-5)


def test_cls_attention_matches_reference():
    torch.manual_seed(2)
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    a = reference_attention(q, k).mean(dim=1)
    torch.testing.assert_close(cls_attention(q, k).double(), a[:, 0, 1:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        cls_attention(q, k, cls_index=-1).double(), a[:, 5, :5], atol=1e-6, rtol=1e-5
    )


def test_redundancy_is_mean_cosine_similarity():
    torch.manual_seed(3)
    x = torch.randn(2, 9, 5)
    expected = torch.tensor(
        [
            [
                sum(float(torch.cosine_similarity(x[b, i], x[b, j], dim=0)) for j in range(9)) / 9
                for i in range(9)
            ]
            for b in range(2)
        ]
    )
    torch.testing.assert_close(redundancy(x), expected, atol=1e-6, rtol=1e-5)


def test_scorer_names_and_semantics():
    assert {"attn", "sim", "attn+sim"} <= set(SCORERS.names())
    x, a = torch.randn(1, 6, 4), torch.rand(1, 6)
    attn, sim, both = (SCORERS.build(n) for n in ("attn", "sim", "attn+sim"))
    assert torch.equal(attn.score(x, a), a) and torch.equal(both.score(x, a), a)
    assert not attn.filters_redundancy and sim.filters_redundancy and both.filters_redundancy
    assert attn.uses_attention and both.uses_attention and not sim.uses_attention
    # least redundant first: a token far from the others gets the highest priority
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [0.99, 0.0], [0.0, 1.0]]])
    assert sim.score(x, None).argmax().item() == 3


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="needs per-token attention"):
        SCORERS.build("attn").score(torch.randn(1, 3, 2), None)
    with pytest.raises(ValueError, match=r"\(B, H, N, d\)"):
        mean_received_attention(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="same shape"):
        mean_received_attention(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="cls_index"):
        cls_attention(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), cls_index=3)
