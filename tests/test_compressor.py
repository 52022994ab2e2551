"""The composed compressor: invariants (hypothesis), identity, edge cases, bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_dpc, reference_pool

from ustc import CompressionConfig, Compressor
from ustc.compressor import RETAINED, UNVISITED


def run(config, b=2, f=4, p=9, d=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, f, p, d, generator=g).to(dtype)
    a = torch.rand(b, f, p, generator=g)
    return x, a, Compressor(config).compress(x, a)


configs = st.builds(
    CompressionConfig,
    retention=st.sampled_from([0.01, 0.05, 0.2, 0.5, 0.9, 1.0]),
    scorer=st.sampled_from(["attn", "sim", "attn+sim"]),
    tau=st.sampled_from([-1.0, 0.0, 0.3, 0.7, 1.0]),
    recycler=st.sampled_from(["none", "dpc"]),
    cluster_ratio=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    k=st.integers(1, 6),
    merger=st.just("none"),
)


@settings(max_examples=80, deadline=None)
@given(
    config=configs,
    b=st.integers(1, 3),
    f=st.integers(1, 5),
    p=st.integers(1, 10),
    seed=st.integers(0, 99),
)
def test_invariants(config, b, f, p, seed):
    x, a, out = run(config, b=b, f=f, p=p, seed=seed)
    n, m = f * p, config.budget(f, p)
    assert out.tokens.shape == (b, m, x.shape[-1]) and out.indices.shape == (b, m)
    assert out.assignment.shape == (b, n) and out.status.shape == (b, n)
    for bi in range(b):
        idx = out.indices[bi].tolist()
        assert idx == sorted(set(idx)) and all(0 <= i < n for i in idx)  # sorted, no index twice
        # each kept token is in its own slot; every slot's token is the mean of what it absorbed
        assert out.assignment[bi, out.indices[bi]].tolist() == list(range(m))
        flat = x[bi].reshape(n, -1)
        for slot in range(m):
            members = (out.assignment[bi] == slot).nonzero().flatten()
            torch.testing.assert_close(out.tokens[bi, slot], flat[members].mean(0))
            assert bool(out.merged[bi, slot]) == (len(members) > 1)
    again = Compressor(config).compress(x, a)  # deterministic
    assert torch.equal(again.tokens, out.tokens) and torch.equal(again.assignment, out.assignment)


def test_matches_reference_pipeline():
    """Eq. 1-4 composed by hand from the slow references: pool, then DPC-KNN on the rest."""
    config = CompressionConfig(retention=0.3, tau=0.5, cluster_ratio=0.3, k=3, merger="none")
    x, a, out = run(config, b=2, f=3, p=10, d=5, seed=7, dtype=torch.float64)
    budget = config.budget(3, 10)  # 3 * ceil(3.0) = 9
    clusters = int(0.3 * budget + 0.5)
    for b in range(2):
        flat, prio = x[b].reshape(30, -1), a[b].reshape(30)
        pool, _ = reference_pool(flat, prio, budget - clusters, 0.5)
        rest = [i for i in range(30) if i not in pool]
        _, _, centers, owner = reference_dpc(flat, rest, budget - len(pool), 3)
        assert out.indices[b].tolist() == sorted(pool + centers)
        for i in range(30):
            expected_pos = i if i in pool else owner[i]
            assert int(out.indices[b, out.assignment[b, i]]) == expected_pos


def test_identity_at_full_retention_bit_for_bit():
    config = CompressionConfig(retention=1.0, merger="none")
    x, a, out = run(config, dtype=torch.bfloat16)
    assert torch.equal(out.tokens, x.reshape(2, -1, x.shape[-1]))
    assert out.indices.tolist() == [list(range(36))] * 2
    assert (out.status == RETAINED).all() and not out.merged.any()


def test_bfloat16_inputs_keep_retained_tokens_exact():
    config = CompressionConfig(retention=0.3, recycler="dpc", merger="none")
    x, a, out = run(config, f=4, p=20, d=8, dtype=torch.bfloat16)
    assert out.tokens.dtype == torch.bfloat16
    flat = x.reshape(2, 80, 8)
    kept = torch.gather(flat, 1, out.indices.unsqueeze(-1).expand(-1, -1, 8))
    single = ~out.merged
    assert torch.equal(out.tokens[single], kept[single])


def test_budget_never_below_one_token_per_frame():
    config = CompressionConfig(retention=1e-6, merger="none")
    _, _, out = run(config, f=5, p=9)
    assert out.tokens.shape[1] == 5


def test_global_pool_has_no_per_frame_quota():
    """All the evidence is in frame 0: a global pool may spend the whole budget there."""
    x = torch.randn(1, 4, 10, 8)
    a = torch.zeros(1, 4, 10)
    a[0, 0] = 1.0 + torch.arange(10.0)
    out = Compressor(
        CompressionConfig(retention=0.2, scorer="attn", recycler="none", merger="none")
    ).compress(x, a)
    assert out.indices.tolist() == [[2, 3, 4, 5, 6, 7, 8, 9]]
    assert (out.status[0, 10:] == UNVISITED).all()


def test_needs_attention_whenever_the_pool_can_be_used():
    for ratio in (0.0, 0.3, 0.6, 0.99):
        assert Compressor(CompressionConfig(cluster_ratio=ratio)).needs_attention
    assert Compressor(CompressionConfig(cluster_ratio=0.6, recycler="none")).needs_attention
    assert not Compressor(CompressionConfig(scorer="sim")).needs_attention


def test_cluster_only_needs_no_attention():
    config = CompressionConfig(retention=0.2, recycler="dpc", cluster_ratio=1.0, merger="none")
    compressor = Compressor(config)
    assert not compressor.needs_attention
    out = compressor.compress(torch.randn(1, 3, 10, 4), None)
    assert out.tokens.shape[1] == 6 and (out.assignment >= 0).all()  # every token in a cluster


@pytest.mark.parametrize(
    ("features", "attention", "message"),
    [
        (torch.randn(2, 3, 4), None, r"\(B, F, P, D\)"),
        (torch.randn(1, 0, 4, 3), None, "non-empty"),
        (torch.full((1, 2, 2, 3), float("nan")), None, "NaN"),
        (torch.randn(1, 2, 2, 3), torch.rand(1, 2, 3), r"attention must be \(B, F, P\)"),
        (torch.randn(1, 2, 2, 3), torch.full((1, 2, 2), float("inf")), "attention scores"),
        (torch.ones(1, 2, 2, 3, dtype=torch.long), None, "floating point"),
        (torch.randn(1, 2, 2, 3), None, "needs per-token attention"),
        (torch.randn(1, 2, 2, 3, device="meta"), None, "'meta' device"),
        (torch.randn(1, 2, 2, 3), [[[1.0, 1.0], [1.0, 1.0]]], "attention must be a .* tensor"),
    ],
)
def test_bad_inputs(features, attention, message):
    with pytest.raises(ValueError, match=message):
        Compressor(CompressionConfig(retention=0.5, merger="none")).compress(features, attention)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    config = CompressionConfig(retention=0.2)
    x, a, cpu = run(config, f=4, p=30, d=16)
    gpu = Compressor(config).compress(x.cuda(), a.cuda())
    assert torch.equal(gpu.indices.cpu(), cpu.indices)
    torch.testing.assert_close(gpu.tokens.cpu(), cpu.tokens)
