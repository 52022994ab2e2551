"""Certified screening of Eq. (3)-(4) (ustc.screening) against the dense computation."""

import pytest
import torch

import ustc.ops
import ustc.screening as screening
from ustc import CompressionConfig, Compressor
from ustc.recycle import dpc_knn, knn_log_density, peak_distance
from ustc.screening import cells, screen, screening_applies, sketch_basis

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
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-4)
    assert torch.isneginf(got[0][~mask]).all() and (got[1][~mask] == 0).all()
    # the screened density order is the dense one, up to pairs within float32 rounding
    dense_in_screened_order = want[0][mask][torch.sort(got[0][mask], stable=True).indices]
    steps = dense_in_screened_order.diff()
    assert (steps >= -1e-6 * dense_in_screened_order[1:].abs()).all()


@pytest.mark.parametrize(
    ("setting", "value"),
    [("SLACK", 10.0), ("CELL", 3), ("PAIRWISE_BLOCK", 500)],
    ids=["no-pruning", "tiny-cells", "row-blocks"],
)
def test_screen_equals_dense_whatever_the_cells(monkeypatch, setting, value):
    """A slack so wide that no bound prunes anything makes every row-cell pair exact; cells of
    three tokens send nearly every row through the extra rounds; small blocks make the bounds
    and the full rows go block by block.  All must give the dense values."""
    monkeypatch.setattr(ustc.ops if setting == "PAIRWISE_BLOCK" else screening, setting, value)
    monkeypatch.setattr(screening, "MAX_EXACT_SHARE", 1.0)
    x = clustered(n_clusters=6, per_cluster=40, seed=7)
    mask = torch.ones(1, x.shape[1], dtype=torch.bool)
    mask[0, ::9] = False
    got = screen(x, mask, 4)
    assert got is not None
    want = dense(x, mask, 4)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-4)


def test_gives_up_where_it_cannot_pay(monkeypatch):
    """Unstructured features: every cell is within reach of every token, so the exact pairs
    pass their budget and screen declines (None).  Likewise past the pair or full-row caps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 300, D, generator=g)
    assert screen(x, torch.ones(1, 300, dtype=torch.bool), 5) is None
    structured, everyone = clustered(6, 40, seed=1), torch.ones(1, 240, dtype=torch.bool)
    assert screen(structured, everyone, 5) is not None
    with monkeypatch.context() as patch:
        patch.setattr(screening, "MAX_EXACT_PAIRS", 1000)
        assert screen(structured, everyone, 5) is None
    monkeypatch.setattr(screening, "MAX_FULL_ROWS", 0)
    assert screen(structured, everyone, 5) is None


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


def test_cells_are_a_kmeans_partition_with_true_radii():
    x = clustered(n_clusters=8, per_cluster=30, seed=4)[0]
    z = x @ sketch_basis(x, 16)
    labels, centroids, radius = cells(z, 12)
    n_cells = centroids.shape[0]
    assert labels.shape == (z.shape[0],) and 1 <= n_cells <= 12
    assert torch.equal(torch.unique(labels), torch.arange(n_cells))  # no empty cell
    for b in range(n_cells):
        inside = z[labels == b]
        assert torch.allclose((inside - centroids[b]).norm(dim=1).max(), radius[b])
    # every token sits in the cell of its nearest centroid (up to rounding of near ties)
    distance = torch.cdist(z, centroids)
    assert torch.allclose(distance.gather(1, labels[:, None])[:, 0], distance.amin(1), rtol=1e-5)
    # identical points: fewer distinct points than cells asked for
    labels, centroids, radius = cells(torch.ones(10, 4), 3)
    assert centroids.shape[0] == 1 and (labels == 0).all() and radius.item() == 0


def test_closest_centroid_is_argmin_with_ties_to_the_first():
    """``_closest`` takes ``min(1).indices`` for speed: the same cells as ``argmin(1)``, equal
    distances (duplicated centroids) going to the lower centroid."""
    g = torch.Generator().manual_seed(3)
    z = torch.randint(-2, 3, (500, 4), generator=g).float()
    centroids = torch.randint(-2, 3, (40, 4), generator=g).float()
    centroids = torch.cat([centroids, centroids[:10]])  # exact ties
    d = torch.addmm(ustc.ops.squared_norms(centroids), z, centroids.T, alpha=-2.0)
    assert torch.equal(screening._closest(z, centroids), d.argmin(1))
    assert int(screening._closest(centroids[40:], centroids).max()) < 40


def test_cells_split_a_cell_that_merged_two_scenes():
    """k-means alone leaves scenes 3 and 10 of this pool in one cell (and splits two others);
    the wide cell is bisected, so no cell mixes scenes."""
    x = clustered(n_clusters=12, per_cluster=60, seed=0)[0]
    z = x @ sketch_basis(x, screening.RANK)
    labels, _, radius = cells(z, 13)
    scene = torch.arange(x.shape[0]) % 12
    for b in range(radius.numel()):
        assert scene[labels == b].unique().numel() == 1
    assert radius.max() < 1.5 * radius.median()


def test_sketch_basis_is_orthonormal_and_captures_the_scenes():
    x = clustered(n_clusters=20, per_cluster=30, seed=2, noise=0.3)[0]
    basis = sketch_basis(x, 32)
    assert basis.shape == (D, 32)
    torch.testing.assert_close(basis.T @ basis, torch.eye(32), atol=1e-5, rtol=0)
    captured = (x @ basis).square().sum() / x.square().sum()
    assert captured > 0.85  # the scene share of the energy is 1 / (1 + 0.3^2) = 0.92


def test_screen_and_dense_give_the_same_bits_far_from_the_origin(small_pools):
    """Both paths choose on rounded distances of the centred features and measure the decisive
    ones from the differences: the same log rho and delta, bit for bit, even for scenes offset
    far from the origin, where the rounded distances of the two paths differ."""
    x = clustered(n_clusters=8, per_cluster=40, seed=9, noise=0.05) + 30.0
    mask = torch.ones(1, x.shape[1], dtype=torch.bool)
    mask[0, ::11] = False
    got = screen(x, mask, 5)
    assert got is not None
    want = dense(x, mask, 5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def objects_per_scene(frames, tokens, dim, objects, noise, seed):
    """A video of one scene: every token one of ``objects`` object vectors plus noise."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.randn(objects, dim, generator=g)
    layout = torch.randint(0, objects, (tokens,), generator=g)
    x = scene[layout].expand(frames, tokens, dim)
    return (x + noise * torch.randn(frames, tokens, dim, generator=g)).unsqueeze(0)


def test_a_videos_result_does_not_depend_on_its_batch():
    """Issue 16's reproducer: video A (12 objects, noise 0.05) screens, video B (randn) does not;
    A's tokens must be the same alone and next to B (screening was declined for the whole batch,
    and the dense path picked 3 of 64 centers differently)."""
    a = objects_per_scene(16, 196, 1024, objects=12, noise=0.05, seed=0)
    b = torch.randn(1, 16, 196, 1024, generator=torch.Generator().manual_seed(1))
    config = CompressionConfig(cluster_ratio=1.0, merger="none")
    mask = torch.ones(1, 16 * 196, dtype=torch.bool)
    assert screening_applies(a.reshape(1, -1, 1024), mask, 5)
    assert screen(torch.cat([a, b]).reshape(2, -1, 1024), mask.expand(2, -1), 5) is None
    alone = Compressor(config).compress(a)
    batch = Compressor(config).compress(torch.cat([a, b]))
    assert torch.equal(alone.indices[0], batch.indices[0])
    assert torch.equal(alone.assignment[0], batch.assignment[0])
    assert torch.equal(alone.tokens[0], batch.tokens[0])
