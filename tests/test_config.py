"""The config, the budget rule and the presets of Table 5."""

import pytest
import torch

from ustc import CompressionConfig, Compressor, merge_keep, visual_budget
from ustc.presets import TABLE5_PAPER, TABLE5_ROWS, ours


def test_budget_rule_reproduces_the_papers_token_counts():
    # LLaVA-OV-7B: 32 frames x 196 tokens; 2 % is "about four tokens per frame"
    assert [visual_budget(32, 196, r) for r in (0.1, 0.05, 0.02, 0.01)] == [640, 320, 128, 64]
    assert [visual_budget(64, 169, r) for r in (0.02, 0.01)] == [192, 128]  # LLaVA-Video-7B
    assert visual_budget(32, 196, 1.0) == 6272
    assert visual_budget(10, 100, 0.07) == 70  # 0.07 * 100 is 7.000000000000001 in floats
    assert visual_budget(10, 100, 0.075) == 80  # halves go up
    assert visual_budget(10, 100, 0.001) == 10  # never below one token per frame
    assert merge_keep(128, 0.5) == 64 and merge_keep(5, 0.5) == 3 and merge_keep(1, 0.01) == 1


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("retention", 0.0, r"retention must be in \(0, 1\]"),
        ("retention", 1.5, r"retention must be in \(0, 1\], got 1.5"),
        ("tau", 1.2, r"tau must be in \[-1, 1\]"),
        ("tau", float("nan"), "tau"),
        ("cluster_ratio", -0.1, "cluster_ratio"),
        ("keep_ratio", 0.0, "keep_ratio"),
        ("lam", 2.0, "lam"),
        ("k", 0, "k"),
        ("k", 2.5, "k must be an integer"),
        ("layer", -1, "layer"),
        ("scorer", "attention", "unknown scorer 'attention'; known scorers: attn, attn\\+sim"),
        ("recycler", "kmeans", "known recyclers: dpc, none"),
        ("merger", "fastv2", "unknown merger"),
        ("params", {"alpha": 1}, "taken by none of the selected strategies"),
        # a config field given again through params would run while the field says otherwise
        ("params", {"tau": 0.1}, "'tau' are fields of CompressionConfig"),
        ("params", {"k": 7, "convention": "tcformer"}, "'k' are fields of CompressionConfig"),
        ("params", None, "params must be a dict"),
        # bool is an int to Python; it passed the number checks
        ("retention", True, r"retention must be in \(0, 1\], got True"),
        ("tau", True, "tau must be in .*got True"),
        ("cluster_ratio", False, "cluster_ratio must be in .*got False"),
        ("keep_ratio", True, "keep_ratio must be in .*got True"),
        ("lam", True, "lam must be in .*got True"),
        ("k", True, "k must be an integer"),
    ],
)
def test_bad_values_raise_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(**{field: value})


def test_budget_errors():
    with pytest.raises(ValueError, match="at least one frame"):
        visual_budget(0, 196, 0.1)
    with pytest.raises(ValueError, match=">= 0"):
        merge_keep(-1, 0.5)


def test_roundtrip_and_defaults_are_the_papers():
    config = CompressionConfig()
    assert (config.tau, config.cluster_ratio, config.layer, config.keep_ratio, config.lam) == (
        0.7,
        0.3,
        18,
        0.5,
        0.5,
    )
    assert CompressionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown CompressionConfig fields"):
        CompressionConfig.from_dict({"retention": 0.1, "ratio": 2})
    assert config.kept_after_merge(128) == 64
    assert config.replace(merger="none").kept_after_merge(128) == 128
    assert config.replace(retention=1.0, merger="none").is_identity


def test_table5_rows_realise_their_marks():
    """Attn: the scorer's attention order is used; Sim: the tau filter applies; Cluster: DPC-KNN."""
    assert set(TABLE5_ROWS) == set(TABLE5_PAPER) and len(TABLE5_ROWS) == 7
    x, a = torch.randn(1, 32, 20, 16), torch.rand(1, 32, 20)
    for (attn, sim, cluster), config in TABLE5_ROWS.items():
        compressor = Compressor(config)
        assert compressor.needs_attention == attn
        pool_used = compressor._capacity(config.budget(32, 20)) > 0
        assert (compressor.scorer.filters_redundancy and pool_used) == sim
        assert (config.recycler == "dpc") == cluster
        assert config.retention == 0.02 and config.merger == "none"
        out = compressor.compress(x, a if attn else None)
        assert out.tokens.shape[1] == config.budget(32, 20) == 32


def test_ours_preset():
    assert ours(0.05).merger == "text-aware" and ours(0.05, merging=False).merger == "none"


def test_strategy_parameters_that_are_no_fields_pass_through_params():
    config = CompressionConfig(params={"convention": "tcformer"})
    assert config.strategy_values()["convention"] == "tcformer"
    assert Compressor(config).recycler.convention == "tcformer"
