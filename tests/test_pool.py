"""Eq. (2), the greedy retention pool, against a slow reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_pool

from ustc.pool import REJECTED, RETAINED, GreedyPool, greedy_retention_pool


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 24),
    d=st.integers(1, 6),
    capacity=st.integers(0, 24),
    tau=st.sampled_from([None, -1.0, -0.2, 0.0, 0.3, 0.7, 0.95, 1.0]),
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 3),
    block=st.sampled_from([None, 1, 3, 7]),
)
def test_greedy_pool_matches_reference(n, d, capacity, tau, seed, batch, block):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=g, dtype=torch.float64)
    # coarse priorities create ties, which must go to the lower index
    priority = torch.randint(0, 4, (batch, n), generator=g).float()
    fill = greedy_retention_pool(x, priority, capacity, tau, block=block)
    for b in range(batch):
        pool, status = reference_pool(x[b], priority[b], capacity, tau)
        assert fill.admitted[b].nonzero().flatten().tolist() == pool
        assert fill.status[b].tolist() == status


def test_fewer_candidates_than_capacity_pass():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.001], [0.0, 1.0], [0.001, 1.0]]])
    fill = greedy_retention_pool(x, torch.tensor([[4.0, 3.0, 2.0, 1.0]]), capacity=4, tau=0.7)
    assert fill.admitted.tolist() == [[True, False, True, False]]
    assert fill.status.tolist() == [[RETAINED, REJECTED, RETAINED, REJECTED]]


def test_duplicates_are_rejected_and_tau_none_keeps_top_k():
    x = torch.ones(1, 5, 3)
    fill = greedy_retention_pool(x, torch.zeros(1, 5), capacity=3, tau=0.7)
    assert fill.admitted.tolist() == [[True, False, False, False, False]]
    fill = greedy_retention_pool(x, torch.zeros(1, 5), capacity=3, tau=None)
    assert fill.admitted.tolist() == [[True, True, True, False, False]]


def test_pool_strategy_validates_tau():
    with pytest.raises(ValueError, match=r"tau must be in \[-1, 1\]"):
        GreedyPool(tau=1.5)
