"""Registries: names, build, errors, parameters, and third-party strategies."""

import pytest
import torch

from ustc import MERGERS, METHODS, POOLS, RECYCLERS, SCORERS, CompressionConfig, Compressor
from ustc.registry import Registry
from ustc.scoring import Scorer


def test_builtin_names():
    assert "ustc" in METHODS.names()
    assert {"attn", "attn+sim", "sim"} <= set(SCORERS.names())
    assert "greedy" in POOLS.names()
    assert {"dpc", "none"} <= set(RECYCLERS.names())
    assert {"last-token", "none", "text-aware"} <= set(MERGERS.names())


def test_build_and_params():
    assert RECYCLERS.build("dpc", k=7).k == 7
    assert [(p.name, p.annotation, p.default) for p in RECYCLERS.params("dpc")] == [
        ("k", int, 5),
        ("convention", str, "paper"),
    ]
    with pytest.raises(ValueError, match="takes no parameter 'tau'; it takes: convention, k"):
        RECYCLERS.build("dpc", tau=0.5)
    with pytest.raises(ValueError, match="unknown pool 'fifo'; known pools: greedy"):
        POOLS.get("fifo")


def test_duplicate_names_are_refused():
    registry = Registry("thing")
    registry.register("a")(type("A", (), {}))
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(type("B", (), {}))


def test_a_new_strategy_is_usable_by_name_with_its_own_parameter():
    @SCORERS.register("test-center-bias")
    class CenterBias(Scorer):
        def __init__(self, sigma: float = 1.0) -> None:
            self.sigma = sigma

        def score(self, features, attention):
            n = features.shape[1]
            pos = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
            return (-(pos**2) / self.sigma).expand(features.shape[0], n)

    try:
        config = CompressionConfig(
            retention=0.2,
            scorer="test-center-bias",
            recycler="none",
            merger="none",
            params={"sigma": 2.0},
        )
        compressor = Compressor(config)
        assert compressor.scorer.sigma == 2.0
        out = compressor.compress(torch.randn(1, 1, 10, 4))
        assert out.indices.tolist() == [[4, 5]]
    finally:
        SCORERS._classes.pop("test-center-bias")
