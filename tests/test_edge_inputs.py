"""Bad and degenerate inputs on the fast paths (issue 28, goal 7): clear errors for NaN/Inf, and
for all-zero frames, one frame, one token and a budget of every token, results with and without
screening that are the same, with the budget met."""

import pytest
import torch

import ustc.screening as screening
from ustc import CompressionConfig, Compressor
from ustc.recycle import dpc_knn


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_features_are_refused_by_name(value):
    x = torch.randn(1, 2, 3, 4)
    x[0, 1, 2, 3] = value
    with pytest.raises(ValueError, match="features contain NaN or infinite values"):
        Compressor(CompressionConfig(retention=0.5, merger="none")).compress(x, torch.rand(1, 2, 3))


def _screened_video(zero_frames: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 8, 196, 512): 12 scene vectors plus noise, some frames all zero."""
    g = torch.Generator().manual_seed(0)
    scene = torch.randn(12, 512, generator=g)
    layout = torch.randint(0, 12, (196,), generator=g)
    x = scene[layout].expand(8, 196, 512) + 0.1 * torch.randn(8, 196, 512, generator=g)
    x = x.clone()
    x[zero_frames] = 0.0
    return x.unsqueeze(0), torch.rand(1, 8, 196, generator=g)


@pytest.mark.parametrize("zero_frames", [slice(2, 5), slice(0, 8)], ids=["some", "all"])
def test_all_zero_frames_compress_the_same_with_and_without_screening(monkeypatch, zero_frames):
    x, a = _screened_video(zero_frames)
    config = CompressionConfig(retention=0.02, merger="none")
    screened = Compressor(config).compress(x, a)
    monkeypatch.setattr(screening, "MIN_TOKENS", 10**9)
    dense = Compressor(config).compress(x, a)
    assert torch.equal(screened.indices, dense.indices)
    assert torch.equal(screened.assignment, dense.assignment)
    assert screened.indices.shape[1] == config.budget(8, 196)
    assert torch.isfinite(screened.tokens).all()


def test_the_sketch_of_zero_features_is_still_orthonormal():
    basis = screening.sketch_basis(torch.zeros(300, 512), screening.RANK)
    torch.testing.assert_close(basis.T @ basis, torch.eye(screening.RANK), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["ustc", "visionzip", "holitom", "fastvid", "flashvid", "sttm"])
@pytest.mark.parametrize(("frames", "tokens"), [(1, 36), (6, 1), (1, 1)])
def test_one_frame_or_one_token(method, frames, tokens):
    x = torch.randn(2, frames, tokens, 8, generator=torch.Generator().manual_seed(1))
    a = torch.rand(2, frames, tokens)
    config = CompressionConfig(retention=0.1, method=method, merger="none")
    out = Compressor(config).compress(x, a)
    budget = config.budget(frames, tokens)
    assert out.indices.shape == (2, budget)
    assert ((out.assignment >= -1) & (out.assignment < budget)).all()


def test_a_budget_of_every_token_passes_the_input_unchanged():
    x, a = torch.randn(1, 3, 5, 8), torch.rand(1, 3, 5)
    out = Compressor(CompressionConfig(retention=1.0, merger="none")).compress(x, a)
    assert torch.equal(out.tokens, x.reshape(1, 15, 8))
    assert torch.equal(out.indices[0], torch.arange(15))


def test_more_clusters_than_a_screened_pool_makes_every_member_a_center():
    x, _ = _screened_video(slice(0, 0))
    x = x.flatten(1, 2)
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    mask[0, :1100] = True  # a screened pool (>= MIN_TOKENS)
    out = dpc_knn(x, mask, torch.tensor([5000]), 5)
    assert torch.equal(out.centers, mask)
    assert torch.equal(out.owner[0, :1100], torch.arange(1100))
