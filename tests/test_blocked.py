"""ustc.blocked: the GPU path of DPC-KNN, in tiles, against the dense path.

CPU tests compare with ``ustc.recycle``'s dense functions in tiles far smaller than N; the tests
whose names contain ``cuda`` need a GPU (``pytest -k cuda``) and skip without one.

Known gap: since issue 16 the dense path measures the distances that decide (k nearest, nearest
denser, nearest centre) from differences and certifies them against float32 rounding; the blocked
path still takes every distance from Gram products (||a||^2 + ||b||^2 - 2 a.b), so its values
agree to Gram rounding and its selections can differ where rounding decides (exact duplicates,
near ties).  It is therefore not dispatched by ``recycle.dpc_knn``; the selection test below is
an expected failure until it certifies its choices as the dense path does.
"""

import sys
from pathlib import Path

import pytest
import torch

from ustc import CompressionConfig, Compressor, blocked, recycle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synthetic import structured_video  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def clustered(b: int, n: int, d: int, seed: int, duplicates: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scenes = 3.0 * torch.randn(max(2, n // 30), d, generator=g)
    x = scenes[torch.randint(0, scenes.shape[0], (b, n), generator=g)]
    x = x + 0.5 * torch.randn(b, n, d, generator=g)
    if duplicates:  # exact copies: distance 0, equal densities, ties everywhere
        x[:, 1::7] = x[:, 0:1]
    return x


def close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def pool_mask(b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, generator=g) > 0.2


@pytest.mark.parametrize(
    ("b", "n", "d", "block", "k", "duplicates"),
    [
        (1, 40, 8, 7, 5, False),
        (2, 300, 32, 64, 5, False),
        (2, 257, 16, 50, 9, True),
        (1, 30, 4, 1, 3, False),  # one-token tiles
        (2, 90, 24, 90, 5, True),  # a single tile
    ],
)
def test_blocked_values_equal_the_dense_ones(b, n, d, block, k, duplicates):
    x = clustered(b, n, d, seed=n, duplicates=duplicates)
    mask = pool_mask(b, n, seed=d)
    # the tiles change nothing but the order of BLAS additions: equal to one whole-pool tile
    log_rho = blocked.knn_log_density(x, mask, k, block=block)
    close(log_rho, blocked.knn_log_density(x, mask, k, block=n))
    delta = blocked.peak_distance(x, mask, log_rho, block=block)
    close(delta, blocked.peak_distance(x, mask, log_rho, block=n))
    # and the dense path's exact-to-float32 values up to the rounding of Gram products
    gram = dict(rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(log_rho, recycle.knn_log_density(x, mask, k), **gram)
    torch.testing.assert_close(delta, recycle.peak_distance(x, mask, log_rho), **gram)


def test_fewer_members_than_k_and_a_lone_member():
    x = clustered(2, 20, 6, seed=3)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, [2, 5, 11]] = True  # 2 other members for k = 5
    mask[1, 7] = True  # a lone member: log rho 0
    log_rho, delta = blocked.density_and_peak(x, mask, 5, block=3)
    close(log_rho, recycle.knn_log_density(x, mask, 5))
    dense = recycle.peak_distance(x, mask, log_rho)
    assert delta[1, 7] == 0.0  # exactly: the dense path leaves the rounding of d(i, i) there
    close(delta[0], dense[0])
    assert log_rho[1, 7] == 0.0
    assert torch.isinf(log_rho[~mask]).all() and (delta[~mask] == 0).all()


@pytest.mark.xfail(
    reason="known gap (see the module docstring): the blocked path does not yet certify its "
    "choices against float32 rounding, so exact duplicates break ties differently",
    strict=False,
)
@pytest.mark.parametrize("block", [37, 128, None])
def test_blocked_recycler_selects_what_dpc_knn_selects(block):
    x = clustered(2, 400, 48, seed=7, duplicates=True)
    mask = pool_mask(2, 400, seed=8)
    n_clusters = torch.tensor([25, 60])
    dense = recycle.dpc_knn(x, mask, n_clusters, 5)
    ours = blocked.BlockedDPC(k=5, block=block).recycle(x, mask, n_clusters, None)
    assert torch.equal(ours.centers, dense.centers)
    assert torch.equal(ours.owner, dense.owner)
    assert int(ours.centers.sum()) == 25 + 60


def test_compressor_with_the_blocked_recycler_keeps_the_same_tokens():
    features, attention = structured_video(12, 36, 64, seed=2)
    for retention in (0.05, 0.2):
        config = CompressionConfig(retention=retention, merger="none")
        expected = Compressor(config).compress(features, attention)
        compressor = Compressor(config)
        compressor.recycler = blocked.BlockedDPC(k=config.k, block=37)
        got = compressor.compress(features, attention)
        assert torch.equal(got.indices, expected.indices)
        assert torch.equal(got.assignment, expected.assignment)
        assert torch.equal(got.tokens, expected.tokens)


def test_no_host_synchronisation_in_the_distance_work():
    # meta tensors have no data: any .item(), bool(tensor) or data-dependent shape would raise
    x = torch.empty(2, 50, 16, device="meta")
    mask = torch.empty(2, 50, dtype=torch.bool, device="meta")
    log_rho, delta = blocked.density_and_peak(x, mask, 5, block=7)
    assert log_rho.shape == delta.shape == (2, 50)
    assert blocked.nearest_center(x, mask, mask, 4).shape == (2, 50)
    with pytest.raises(RuntimeError, match="meta"):  # the dense path does read values
        recycle.dpc_knn(x, mask, torch.empty(2, dtype=torch.long, device="meta"), 5)


def test_tiles_never_hold_n_by_n():
    assert blocked.block_size(6272) == 6272  # 32 x 196: one tile
    assert blocked.block_size(50176) == blocked.BLOCK  # 256 x 196: 4096-wide tiles
    assert blocked.block_size(50176) ** 2 <= blocked.BLOCK_ENTRIES


def test_products_of_bfloat16_values_are_exact_in_float32():
    # why bf16 operands with a float32 result change only the order of the additions
    g = torch.Generator().manual_seed(0)
    a = (100 * torch.randn(10_000, generator=g)).bfloat16()
    b = (100 * torch.randn(10_000, generator=g)).bfloat16()
    assert torch.equal(a.float() * b.float(), (a.double() * b.double()).float())


def test_bfloat16_input_on_the_cpu_takes_float32_products():
    x = clustered(1, 200, 32, seed=4).bfloat16()
    mask = pool_mask(1, 200, seed=5)
    assert not blocked.uses_low_precision_products(x)
    log_rho = blocked.knn_log_density(x, mask, 5, block=33)
    assert torch.equal(log_rho, blocked.knn_log_density(x.float(), mask, 5, block=33))


def test_products_must_be_named():
    x = clustered(1, 10, 4, seed=1)
    with pytest.raises(ValueError, match="products must be 'auto' or 'float32'"):
        blocked.knn_log_density(x, torch.ones(1, 10, dtype=torch.bool), 3, products="tf32")


@needs_cuda
def test_cuda_blocked_float32_equals_the_dense_path():
    x = clustered(2, 3000, 256, seed=11).cuda()
    mask = pool_mask(2, 3000, seed=12).cuda()
    n_clusters = torch.tensor([40, 90], device="cuda")
    dense = recycle.dpc_knn(x, mask, n_clusters, 5)
    ours = blocked.BlockedDPC(k=5, block=700, products="float32").recycle(x, mask, n_clusters, None)
    assert torch.equal(ours.centers, dense.centers)
    assert torch.equal(ours.owner, dense.owner)


@needs_cuda
def test_cuda_bfloat16_products_select_the_float32_tokens():
    features, attention = structured_video(32, 196, 3584, seed=0)
    features, attention = features.cuda().bfloat16(), attention.cuda()
    config = CompressionConfig(retention=0.02, merger="none")
    fp32 = Compressor(config)
    fp32.recycler = blocked.BlockedDPC(k=config.k, products="float32")
    bf16 = Compressor(config)
    bf16.recycler = blocked.BlockedDPC(k=config.k, products="auto")
    assert blocked.uses_low_precision_products(features)
    expected, got = fp32.compress(features, attention), bf16.compress(features, attention)
    assert torch.equal(got.indices, expected.indices)
    assert torch.equal(got.assignment, expected.assignment)


@needs_cuda
def test_cuda_distance_work_does_not_synchronise():
    x = clustered(1, 2000, 128, seed=13).cuda().bfloat16()
    mask = pool_mask(1, 2000, seed=14).cuda()
    blocked.density_and_peak(x, mask, 5, block=512)  # warm-up: the out_dtype probe syncs once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        blocked.density_and_peak(x, mask, 5, block=512)
    finally:
        torch.cuda.set_sync_debug_mode("default")
