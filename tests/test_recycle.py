"""Eq. (3)-(4), DPC-KNN on the recycle pool, against slow references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_dpc, reference_log_dpc

import ustc.ops
import ustc.recycle
from ustc import CompressionConfig, Compressor
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

    real = ustc.recycle.squared_distances

    def spy(a, b):  # records the block's shape
        shapes.append((a.shape[1], b.shape[1]))
        return real(a, b)

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
    # a block below the diagonal is the transpose of the one above, not a product of its own
    for i in range(0, 10, 3):
        for j in range(i + 3, 10, 3):
            above = d2[:, i : i + 3, j : j + 3]
            assert torch.equal(d2[:, j : j + 3, i : i + 3], above.transpose(1, 2))


def test_squared_norms_are_the_plain_sums_bit_for_bit():
    """The row-blocked norms feed every distance: they must not move a tie (lab duplicates)."""
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 1000, 37), (1, 700, 5), (2, 256, 64), (9,)]:
        x = torch.randn(*shape, generator=g)
        assert torch.equal(ustc.ops.squared_norms(x), x.square().sum(-1))
    half = torch.randn(2, 600, 16, generator=g).bfloat16()
    assert torch.equal(ustc.ops.squared_norms(half), half.float().square().sum(-1))


@pytest.mark.parametrize("dim", [1, 7, 896, 3584, 40_000])
def test_measured_pairs_are_the_difference_distances_bit_for_bit(monkeypatch, dim):
    """Each unordered pair is measured once and looked up after, in either order, with
    ``difference_distances``' bits; a call of one pair is measured alone as before (from 32768
    elements torch splits a lone row's sum across threads: other bits), and not stored."""
    g = torch.Generator().manual_seed(dim)
    x = 30.0 + torch.randn(40, dim, generator=g)
    rows = torch.randint(0, 40, (25,), generator=g)
    index = torch.randint(0, 40, (25, 6), generator=g)
    pairs = ustc.ops.MeasuredPairs(x)
    measured = []
    original = ustc.ops.difference_distances
    monkeypatch.setattr(
        ustc.ops,
        "difference_distances",
        lambda x, r, i: measured.append(i.numel()) or original(x, r, i),
    )
    lone = pairs.distances(rows[:1], index[:1, :1])
    assert torch.equal(lone, original(x, rows[:1], index[:1, :1]))
    assert pairs.keys.numel() == 0
    first = pairs.distances(rows, index)
    assert torch.equal(first, original(x, rows, index))
    unordered = torch.stack([rows.unsqueeze(1).expand_as(index), index]).sort(0).values
    unique = torch.unique(unordered[0] * 40 + unordered[1]).numel()
    assert sum(measured[1:]) in (unique, unique + 1)  # + 1: a lone row measured twice
    # the same pairs the other way round, and a few new ones: only the new ones are measured
    calls = len(measured)
    flipped = pairs.distances(index[:, 0], rows.unsqueeze(1))
    assert torch.equal(flipped, first[:, :1]) and len(measured) == calls
    new = torch.tensor([[0, 1], [39, 38]])
    again = pairs.distances(torch.tensor([5, 6]), new)
    assert torch.equal(again, original(x, torch.tensor([5, 6]), new))


def far_cluster(n, dim, seed, noise=0.01, norm=28.0, groups=1):
    """Tight groups (noise ``noise``) around points of norm ~``norm``: the float32 Gram form
    ||a||^2 + ||b||^2 - 2 a.b loses most digits of their distances."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(groups, dim, generator=g)
    centres = norm * centres / centres.norm(dim=1, keepdim=True)
    spread = torch.randn(groups, dim, generator=g) * 0.05  # groups a little apart
    labels = torch.arange(n) % groups
    return (centres[labels] + spread[labels] + noise * torch.randn(n, dim, generator=g))[None]


def check_against_float64(x, mask, n_clusters, k, convention="paper"):
    members = mask[0].nonzero().flatten().tolist()
    log_rho, delta, centers, owner = reference_log_dpc(x[0], members, n_clusters, k, convention)
    got_rho = knn_log_density(x, mask, k, convention=convention)
    got_delta = peak_distance(x, mask, got_rho, convention=convention)
    for i in members:
        assert math.isclose(float(got_rho[0, i]), log_rho[i], rel_tol=1e-5, abs_tol=1e-12), i
        assert math.isclose(float(got_delta[0, i]), delta[i], rel_tol=1e-5, abs_tol=1e-9), i
    # the density order is the float64 one (no two densities here within float32 rounding)
    want = sorted(members, key=lambda i: (-log_rho[i], i))
    assert sorted(members, key=lambda i: (-float(got_rho[0, i]), i)) == want
    out = dpc_knn(x, mask, torch.tensor([n_clusters]), k, convention)
    assert out.centers[0].nonzero().flatten().tolist() == centers
    assert {i: int(out.owner[0, i]) for i in members} == owner


@pytest.mark.parametrize("groups", [1, 3])
def test_tight_clusters_far_from_the_origin_match_float64(groups):
    """Noise 0.01 around points of norm 28: the uncentred float32 Gram form lost ~3 % of log rho
    and picked other centers; now the density order, centers and owners are float64's."""
    x = far_cluster(60, 32, seed=groups, groups=groups)
    mask = torch.ones(1, 60, dtype=torch.bool)
    mask[0, ::7] = False
    check_against_float64(x, mask, n_clusters=6, k=5)


def test_exact_duplicates_get_equal_densities_and_the_lower_index_is_denser():
    base = far_cluster(12, 16, seed=4)[0]
    x = torch.cat([base, base[[3, 7, 3]]])[None]  # 12 and 14 duplicate 3, 13 duplicates 7
    mask = torch.ones(1, 15, dtype=torch.bool)
    log_rho = knn_log_density(x, mask, 4)
    assert log_rho[0, 3] == log_rho[0, 12] == log_rho[0, 14]
    assert log_rho[0, 7] == log_rho[0, 13]
    delta = peak_distance(x, mask, log_rho)
    # the later copies have the first as their nearest denser token, at distance 0
    assert delta[0, 12] == 0 and delta[0, 14] == 0 and delta[0, 13] == 0
    assert delta[0, 3] > 0 and delta[0, 7] > 0
    check_against_float64(x, mask, n_clusters=5, k=4)


def test_zero_cluster_share_drops_the_recycle_pool():
    """cluster_ratio 0 with a full retention pool: no centers, so the recycle pool is dropped
    (as with recycler none), not merged into output token 0."""
    x = torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(0))
    a = torch.tensor([[[9.0, 1, 1, 1], [1, 1, 1, 1]]])
    config = CompressionConfig(retention=0.5, tau=1.0, cluster_ratio=0.0, merger="none")
    out = Compressor(config).compress(x, a)
    dropped = Compressor(config.replace(recycler="none")).compress(x, a)
    assert out.assignment.tolist() == dropped.assignment.tolist()
    assert (out.assignment == -1).sum() == 4 and not out.merged.any()
    assert torch.equal(out.tokens, dropped.tokens)


def test_a_video_without_centers_drops_its_pool_inside_a_batch():
    x = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.bool)
    out = dpc_knn(x, mask, torch.tensor([2, 0]), k=2)
    assert out.centers[1].sum() == 0 and (out.owner[1] == -1).all()
    assert out.centers[0].sum() == 2 and (out.owner[0] >= 0).all()
    alone = dpc_knn(x[:1], mask[:1], torch.tensor([2]), k=2)
    assert torch.equal(alone.owner[0], out.owner[0])


def test_uncertified_rows_fall_back_to_float64(monkeypatch):
    """A rounding bound so wide that no row is certified sends every row through the float64
    path; the result is the same."""
    x = far_cluster(40, 24, seed=5, groups=2)
    mask = torch.ones(1, 40, dtype=torch.bool)
    want = dpc_knn(x, mask, torch.tensor([5]), 3)
    monkeypatch.setattr(ustc.ops, "GRAM_ROUNDING", 1e3)
    calls = []
    real = ustc.ops._gram64
    monkeypatch.setattr(ustc.ops, "_gram64", lambda *a: calls.append(1) or real(*a))
    got = dpc_knn(x, mask, torch.tensor([5]), 3)
    assert calls, "the float64 fallback did not run"
    assert torch.equal(want.centers, got.centers) and torch.equal(want.owner, got.owner)


# --- the peers' DPC-KNN (convention="tcformer") ---------------------------------------------


def test_tcformer_convention_on_a_hand_checked_input():
    """Tokens on a line at 0, 4, 5, 6, 12 (D = 4, so d' = d / 2), k = 2: the k nearest are the
    token itself (0) and its nearest other, log rho = -(0 + (d/2)^2) / 2 = -d^2 / 8:
      t0: d 4 -> -2;  t1, t2, t3: d 1 -> -0.125;  t4: d 6 -> -4.5.
    Densest t1 (tie with t2, t3: lower index).  delta (d / 2): t1 gets the pool's largest
    distance d(t0, t4) = 12 -> 6 (its own row's largest would be 8 -> 4); t2 -> t1: 0.5;
    t3 -> t2: 0.5; t0 -> t1: 2; t4 -> t3: 3.
    log gamma = log rho + log delta: t1 1.667, t2 = t3 -0.818, t0 -1.307, t4 -3.401; three
    centers t1, t2, t3 (t2 before t3 by index); t0 joins t1 (4 < 5), t4 joins t3 (6).
    The paper reading (two nearest others, no scaling): log rho t0 -(16 + 25) / 2 = -20.5,
    t1 -(1 + 4) / 2 = -2.5, t2 -(1 + 1) / 2 = -1, t3 -2.5, t4 -(36 + 49) / 2 = -42.5: the
    densest is t2, whose delta is its own row's largest distance, 7."""
    x = torch.zeros(1, 5, 4)
    x[0, :, 0] = torch.tensor([0.0, 4, 5, 6, 12])
    mask = torch.ones(1, 5, dtype=torch.bool)
    log_rho = knn_log_density(x, mask, 2, convention="tcformer")
    assert log_rho.tolist() == [[-2.0, -0.125, -0.125, -0.125, -4.5]]
    delta = peak_distance(x, mask, log_rho, convention="tcformer")
    assert delta.tolist() == [[2.0, 6.0, 0.5, 0.5, 3.0]]
    out = DPCKNNRecycler(k=2, convention="tcformer").recycle(x, mask, torch.tensor([3]), None)
    assert out.centers[0].nonzero().flatten().tolist() == [1, 2, 3]
    assert out.owner.tolist() == [[1, 1, 2, 3, 3]]
    paper = knn_log_density(x, mask, 2)
    assert paper.tolist() == [[-20.5, -2.5, -1.0, -2.5, -42.5]]
    assert peak_distance(x, mask, paper).tolist() == [[4.0, 1.0, 7.0, 1.0, 6.0]]


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 16),
    k=st.integers(1, 6),
    n_clusters=st.integers(0, 18),
    seed=st.integers(0, 10_000),
    far=st.booleans(),
)
def test_both_conventions_match_the_float64_reference(n, k, n_clusters, seed, far):
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(1, n, 6, generator=g)
    if far:
        x = x * 0.03 + 20.0 * torch.randn(6, generator=g)
    mask = torch.rand(1, n, generator=g) < 0.8
    for convention in ("paper", "tcformer"):
        members = mask[0].nonzero().flatten().tolist()
        log_rho, delta, centers, owner = reference_log_dpc(x[0], members, n_clusters, k, convention)
        got_rho = knn_log_density(x, mask, k, convention=convention)
        got_delta = peak_distance(x, mask, got_rho, convention=convention)
        for i in members:
            assert math.isclose(float(got_rho[0, i]), log_rho[i], rel_tol=1e-5, abs_tol=1e-9)
            assert math.isclose(float(got_delta[0, i]), delta[i], rel_tol=1e-5, abs_tol=1e-7)
        out = dpc_knn(x, mask, torch.tensor([n_clusters]), k, convention)
        assert out.centers[0].nonzero().flatten().tolist() == centers
        assert {i: int(out.owner[0, i]) for i in members} == owner


def test_convention_is_a_registered_parameter_and_checked():
    from ustc.registry import RECYCLERS

    assert {p.name: p.default for p in RECYCLERS.params("dpc")} == {"k": 5, "convention": "paper"}
    config = CompressionConfig(params={"convention": "tcformer"})
    assert Compressor(config).recycler.convention == "tcformer"
    with pytest.raises(ValueError, match="convention must be one of 'paper', 'tcformer'"):
        DPCKNNRecycler(convention="holitom")


@pytest.mark.parametrize("convention", ["paper", "tcformer"])
@pytest.mark.parametrize("case", ["random", "duplicates", "clusters", "small pools"])
def test_delta_from_the_neighbour_lists_is_the_full_search_bit_for_bit(
    convention, case, monkeypatch
):
    """dpc_knn takes a token's delta from its k nearest where one of them is denser; every token's
    delta must be the bits the search over the whole pool gives (``peak_distance``)."""
    g = torch.Generator().manual_seed(7)
    if case == "duplicates":  # ties everywhere: 12 vectors, each repeated 8 times
        x = torch.randn(2, 12, 16, generator=g).repeat(1, 8, 1)
    elif case == "clusters":  # tight groups far from the origin
        x = 40.0 + torch.randn(2, 6, 1, 16, generator=g)
        x = (x + 1e-3 * torch.randn(2, 6, 16, 16, generator=g)).reshape(2, 96, 16)
    else:
        x = torch.randn(2, 96, 16, generator=g)
    mask = torch.rand(2, 96, generator=g) < 0.9
    if case == "small pools":  # fewer members than k in one video
        mask[1] = False
        mask[1, :3] = True
    searched = []  # rows searched over the whole pool for their nearest denser token
    nearest = ustc.recycle._Distances.nearest

    def counting(self, v, rows, gram, allowed, count, largest):
        if count == 1 and not largest:
            searched.append(rows.numel())
        return nearest(self, v, rows, gram, allowed, count, largest)

    monkeypatch.setattr(ustc.recycle._Distances, "nearest", counting)
    for k in (1, 3, 5):
        log_rho, neighbours = ustc.recycle._knn(x, mask, k, None, convention)
        assert torch.equal(log_rho, knn_log_density(x, mask, k, convention=convention))
        searched.clear()
        full = peak_distance(x, mask, log_rho, convention=convention)
        full_rows = sum(searched)
        searched.clear()
        shortcut = ustc.recycle._peak_distance(x, mask, log_rho, None, convention, neighbours)
        assert torch.equal(shortcut, full), (k, (shortcut - full).abs().max())
        if neighbours is not None and case != "small pools":
            assert sum(searched) < full_rows / 2  # most deltas came from the lists
