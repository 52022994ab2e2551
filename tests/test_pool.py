"""Eq. (2), the greedy retention pool, against a slow reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_pool

import ustc.pool as pool_module
from ustc.pool import REJECTED, RETAINED, GreedyPool, first_fit, greedy_retention_pool


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


def _first_fit_loop(within, tau, free):
    """Eq. (2)'s rule one candidate at a time: admitted iff free and below tau to every earlier
    admitted candidate."""
    admitted = []
    for j in range(free.numel()):
        ok = bool(free[j]) and all(within[i, j] < tau for i in admitted)
        if ok:
            admitted.append(j)
    return [j in admitted for j in range(free.numel())]


@pytest.mark.parametrize("rounds", [0, 1, 3, 16])
def test_first_fit_settles_like_the_sequential_rule(monkeypatch, rounds):
    """Rounds, the one-at-a-time finish, and both together give the sequential answer: on
    random similarities and on a chain (each candidate too close to the previous one only),
    which takes one round per link."""
    monkeypatch.setattr(pool_module, "_ROUNDS", rounds)
    g = torch.Generator().manual_seed(rounds)
    x = torch.nn.functional.normalize(torch.randn(3, 40, 4, generator=g), dim=-1)
    within = x @ x.transpose(1, 2)
    free = torch.rand(3, 40, generator=g) < 0.8
    angle = torch.arange(10.0) * 0.6  # neighbours 0.6 rad apart: cos 0.83, next ones cos 0.36
    chain = torch.stack([angle.cos(), angle.sin()], 1)
    cases = [(within, free), ((chain @ chain.T).unsqueeze(0), torch.ones(1, 10, dtype=torch.bool))]
    for sims, ok in cases:
        got = first_fit(sims, 0.7, ok)
        for b in range(sims.shape[0]):
            assert got[b].tolist() == _first_fit_loop(sims[b], 0.7, ok[b])
    chain_kept = first_fit(cases[1][0], 0.7, cases[1][1])[0]
    assert chain_kept[::2].all() and not chain_kept[1::2].any()  # every other link
