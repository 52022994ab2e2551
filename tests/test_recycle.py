"""Eq. (3)-(4), DPC-KNN on the recycle pool, against slow references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_dpc

import ustc.ops
import ustc.recycle
from ustc.recycle import (
    DPCKNNRecycler,
    NoRecycler,
    dpc_knn,
    knn_log_density,
    nearest_center,
    peak_distance,
)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 18),
    k=st.integers(1, 6),
    n_clusters=st.integers(1, 20),
    seed=st.integers(0, 10_000),
)
def test_dpc_knn_matches_reference(n, k, n_clusters, seed):
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(1, n, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(1, n, generator=g) < 0.7
    members = mask[0].nonzero().flatten().tolist()
    rho, delta, centers, owner = reference_dpc(x[0], members, n_clusters, k)

    log_rho = knn_log_density(x, mask, k)
    for i in members:
        assert math.isclose(math.exp(float(log_rho[0, i])), rho[i], rel_tol=1e-5, abs_tol=1e-12)
    got_delta = peak_distance(x, mask, log_rho)
    for i in members:
        assert math.isclose(float(got_delta[0, i]), delta[i], rel_tol=1e-4, abs_tol=1e-5)
    out = dpc_knn(x, mask, torch.tensor([n_clusters]), k)
    assert out.centers[0].nonzero().flatten().tolist() == centers
    assert {i: int(out.owner[0, i]) for i in members} == owner
    assert (out.owner[0][~mask[0]] == -1).all()


def test_blocked_distances_match_unblocked(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 40, 8)
    mask = torch.rand(2, 40) < 0.8
    full = dpc_knn(x, mask, torch.tensor([5, 7]), k=4)  # cached symmetric Gram matrix
    monkeypatch.setattr(ustc.ops, "PAIRWISE_BLOCK", 50)  # 1 row at a time, no cache
    monkeypatch.setattr(ustc.recycle, "GRAM_CACHE_ENTRIES", 0)
    blocked = dpc_knn(x, mask, torch.tensor([5, 7]), k=4)
    assert torch.equal(full.centers, blocked.centers) and torch.equal(full.owner, blocked.owner)


def test_no_full_pairwise_matrix_for_large_n(monkeypatch):
    """256 frames x 196 tokens: every pairwise block stays within PAIRWISE_BLOCK entries."""
    shapes = []

    def spy(a, b):  # records the block and returns cheap distances: only the shapes matter here
        shapes.append((a.shape[1], b.shape[1]))
        return torch.ones(a.shape[0], a.shape[1], b.shape[1])

    monkeypatch.setattr("ustc.recycle.squared_distances", spy)
    n = 16_500
    x = torch.randn(1, n, 4)
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, ::2] = True
    dpc_knn(x, mask, torch.tensor([30]), k=5)
    assert shapes and max(r * c for r, c in shapes) <= ustc.ops.PAIRWISE_BLOCK


def test_more_clusters_than_members_gives_singletons():
    x = torch.randn(1, 6, 3)
    mask = torch.tensor([[True, False, True, False, True, False]])
    out = DPCKNNRecycler(k=3).recycle(x, mask, torch.tensor([10]), None)
    assert out.centers.tolist() == mask.tolist()
    assert out.owner.tolist() == [[0, -1, 2, -1, 4, -1]]


def test_duplicates_never_leave_a_center_without_itself():
    x = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [5.0, 5.0]]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = dpc_knn(x, mask, torch.tensor([3]), k=2)
    centers = out.centers[0].nonzero().flatten().tolist()
    assert len(centers) == 3
    for c in centers:
        assert int(out.owner[0, c]) == c
    # the lower-index duplicate is the denser one; the others have delta = 0
    assert out.centers[0, 0] and out.centers[0, 3]


def test_norecycler_fills_spare_slots_by_priority():
    mask = torch.tensor([[False, True, True, True]])
    out = NoRecycler().recycle(
        torch.randn(1, 4, 2), mask, torch.tensor([2]), torch.tensor([[9.0, 1.0, 3.0, 2.0]])
    )
    assert out.centers.tolist() == [[False, False, True, True]]
    assert out.owner.tolist() == [[-1, -1, 2, 3]]


def test_nearest_center_ties_go_to_lower_index():
    x = torch.tensor([[[0.0], [1.0], [2.0]]])
    centers = torch.tensor([[True, False, True]])
    owner = nearest_center(x, torch.ones(1, 3, dtype=torch.bool), centers)
    assert owner.tolist() == [[0, 0, 2]]


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="k"):
        DPCKNNRecycler(k=0)
    with pytest.raises(ValueError, match="k must be"):
        knn_log_density(torch.randn(1, 3, 2), torch.ones(1, 3, dtype=torch.bool), 0)


def test_symmetric_gram_matches_direct_distances(monkeypatch):
    monkeypatch.setattr(ustc.ops, "_GRAM_BLOCK", 3)
    x = torch.randn(2, 10, 4)
    d2 = ustc.ops.pairwise_squared_distances(x)
    torch.testing.assert_close(d2, ustc.ops.squared_distances(x, x))
    assert torch.equal(d2, d2.transpose(1, 2))


def test_squared_norms_are_the_plain_sums_bit_for_bit():
    """The row-blocked norms feed every distance: they must not move a tie (lab duplicates)."""
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 1000, 37), (1, 700, 5), (2, 256, 64), (9,)]:
        x = torch.randn(*shape, generator=g)
        assert torch.equal(ustc.ops.squared_norms(x), x.square().sum(-1))
    half = torch.randn(2, 600, 16, generator=g).bfloat16()
    assert torch.equal(ustc.ops.squared_norms(half), half.float().square().sum(-1))
