"""Certified screening of Eq. (3)-(4) (ustc.screening) against the dense computation."""

import pytest
import torch

import ustc.screening as screening
from ustc.recycle import dpc_knn, knn_log_density, peak_distance
from ustc.screening import kth_smallest_bound, screen, screening_applies, sketch_basis

D = 8 * screening.RANK  # the narrowest features screening takes


def clustered(n_clusters, per_cluster, seed, noise=0.6, dim=D):
    """Video-like features: noisy copies of a few scene vectors, scenes interleaved in index."""
    g = torch.Generator().manual_seed(seed)
    scenes = torch.randn(n_clusters, dim, generator=g)
    labels = torch.arange(n_clusters * per_cluster) % n_clusters
    x = scenes[labels] + noise * torch.randn(labels.numel(), dim, generator=g)
    return x.unsqueeze(0)


def dense(x, mask, k):
    log_rho = knn_log_density(x, mask, k)
    return log_rho, peak_distance(x, mask, log_rho)


@pytest.fixture
def small_pools(monkeypatch):
    """Let screening take the small pools the tests can afford."""
    monkeypatch.setattr(screening, "MIN_TOKENS", 64)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 5])
def test_screen_equals_dense_density_and_delta(seed, k):
    x = clustered(n_clusters=12, per_cluster=60, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    mask = torch.rand(1, x.shape[1], generator=g) < 0.9  # non-members: the retention pool
    got = screen(x, mask, k)
    assert got is not None, "clustered features must screen"
    want = dense(x, mask, k)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-4)
    assert torch.isneginf(got[0][~mask]).all() and (got[1][~mask] == 0).all()
    assert torch.equal(
        torch.sort(got[0][mask], stable=True).indices,
        torch.sort(want[0][mask], stable=True).indices,
    )


def test_uncertified_rows_take_the_exact_row(monkeypatch):
    """A reach too small to certify anything sends every row through the full-row path."""
    monkeypatch.setattr(screening, "REACH", 0.3)
    monkeypatch.setattr(screening, "MAX_FULL_ROWS", 10_000)
    x = clustered(n_clusters=6, per_cluster=40, seed=7)
    mask = torch.ones(1, x.shape[1], dtype=torch.bool)
    mask[0, ::9] = False
    got = screen(x, mask, 4)
    assert got is not None
    want = dense(x, mask, 4)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-4)


def test_gives_up_where_it_cannot_pay(monkeypatch):
    """Unstructured features link everything into one group: screen declines (None)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 300, D, generator=g)
    assert screen(x, torch.ones(1, 300, dtype=torch.bool), 5) is None
    monkeypatch.setattr(screening, "MAX_FULL_ROWS", 0)  # and past the row budget
    assert screen(clustered(6, 40, seed=1), torch.ones(1, 240, dtype=torch.bool), 5) is None


@pytest.mark.parametrize("structured", [True, False])
def test_dpc_knn_is_the_same_with_and_without_screening(small_pools, monkeypatch, structured):
    """Whatever screen decides, the recycler keeps the same centers and owners."""
    x = torch.cat([clustered(10, 50, seed=3), clustered(10, 50, seed=4)])
    if not structured:
        x = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    mask = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(6)) < 0.85
    n_clusters = torch.tensor([7, 13])
    assert screening_applies(x, mask, 5)
    assert (screen(x, mask, 5) is not None) == structured  # both branches of dpc_knn
    screened = dpc_knn(x, mask, n_clusters, 5)
    monkeypatch.setattr(screening, "MIN_TOKENS", 10**9)
    assert not screening_applies(x, mask, 5)
    plain = dpc_knn(x, mask, n_clusters, 5)
    assert torch.equal(screened.centers, plain.centers)
    assert torch.equal(screened.owner, plain.owner)


def test_screening_only_where_it_pays():
    x = torch.zeros(1, 10, D)
    mask = torch.ones(1, 10, dtype=torch.bool)
    assert not screening_applies(x, mask, 5)  # small pool
    big = torch.ones(1, screening.MIN_TOKENS, dtype=torch.bool)
    assert screening_applies(torch.zeros(1, screening.MIN_TOKENS, D), big, 5)
    assert not screening_applies(torch.zeros(1, screening.MIN_TOKENS, D // 2), big, 5)  # narrow
    assert not screening_applies(torch.zeros(1, screening.MIN_TOKENS, D, device="meta"), big, 5)


def test_kth_smallest_bound_is_an_upper_bound():
    g = torch.Generator().manual_seed(0)
    for k, n in [(1, 700), (5, 5000), (5, 300), (3, 2000)]:
        x = torch.randn(20, n, generator=g)
        x[:, 7] = float("inf")  # a masked column
        bound = kth_smallest_bound(x, k)
        exact = x.topk(k, dim=1, largest=False).values[:, -1]
        assert (bound >= exact).all()
        assert torch.isfinite(bound).all()
    x = torch.arange(10.0).flip(0).unsqueeze(0)  # n < k * width: exact top-k
    assert kth_smallest_bound(x, 3).item() == 2.0


def test_sketch_basis_is_orthonormal_and_captures_the_scenes():
    x = clustered(n_clusters=20, per_cluster=30, seed=2, noise=0.3)[0]
    basis = sketch_basis(x, 32)
    assert basis.shape == (D, 32)
    torch.testing.assert_close(basis.T @ basis, torch.eye(32), atol=1e-5, rtol=0)
    captured = (x @ basis).square().sum() / x.square().sum()
    assert captured > 0.85  # the scene share of the energy is 1 / (1 + 0.3^2) = 0.92
