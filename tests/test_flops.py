"""Tests of ustc/flops.py: Eq. S3, the exact count, the token schedule and the paper's columns.

The exact count is checked against two independent measurements of the real transformers
modules (fvcore's FlopCountAnalysis and torch's FlopCounterMode) on tiny random models.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    DynamicCache,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ustc.config import CompressionConfig
from ustc.flops import (
    GENERATED_TOKENS,
    LLAVA_VIDEO_ADAPTER_P,
    MODEL_SPECS,
    VANILLA,
    ModelSpec,
    TokenSchedule,
    count,
    eq_s3,
    eq_s3_layer,
    exact,
    exact_layer,
    fastv,
    format_tables,
    llava_video_layout_note,
    main,
    paper_rows,
    reproduce,
)

# fvcore traces with torch.jit, which warns about its own deprecation on every trace
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

OV7 = MODEL_SPECS["llava-onevision-7b"]
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Slow references
# --------------------------------------------------------------------------------------------


def _matmul(rows: int, inner: int, cols: int) -> int:
    """Multiply-adds of a (rows, inner) @ (inner, cols) product."""
    return rows * inner * cols


def reference_eq_s3_layer(n: int, d: int, m: int, generated: int) -> int:
    """Eq. S3's layer, rebuilt matmul by matmul for the architecture it assumes.

    Prefill: Q, K, V, O projections (d x d) of n tokens, Q K^T and A V over all n x n pairs,
    two FFN matrices (d x m, m x d).  Decode: one token per step t = 1..R, attending to n + t keys.
    """
    total = 4 * _matmul(n, d, d) + _matmul(n, d, n) + _matmul(n, n, d)
    total += _matmul(n, d, m) + _matmul(n, m, d)
    for t in range(1, generated + 1):
        keys = n + t
        total += 4 * _matmul(1, d, d) + _matmul(1, d, keys) + _matmul(1, keys, d)
        total += _matmul(1, d, m) + _matmul(1, m, d)
    return total


def printed_eq_s3_layer(n: int, d: int, m: int, generated: int) -> Fraction:
    """Eq. S3's summand transcribed literally, with d/2 as an exact fraction."""
    r = generated
    return (4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m) + r * (
        (4 * d**2 + 2 * d * m) + 2 * (d * n + Fraction(d, 2) * (r + 1))
    )


def reference_exact_layer(n: int, spec: ModelSpec, generated: int) -> int:
    """One Qwen2 layer, head by head: GQA projections, per-head attention, gate/up/down."""
    d, m, dh = spec.hidden_size, spec.intermediate_size, spec.head_dim

    def one_pass(queries: int, keys: int) -> int:
        work = _matmul(queries, d, spec.num_heads * dh)  # q_proj
        work += 2 * _matmul(queries, d, spec.num_kv_heads * dh)  # k_proj, v_proj
        for _head in range(spec.num_heads):
            work += _matmul(queries, dh, keys) + _matmul(queries, keys, dh)
        work += _matmul(queries, spec.num_heads * dh, d)  # o_proj
        work += 2 * _matmul(queries, d, m) + _matmul(queries, m, d)  # gate, up, down
        return work

    return one_pass(n, n) + sum(one_pass(1, n + t) for t in range(1, generated + 1))


# --------------------------------------------------------------------------------------------
# Equations against the references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, d, m, generated",
    [(0, 8, 16, 3), (1, 8, 16, 0), (7, 12, 20, 5), (64, 32, 88, 10), (300, 16, 40, 100)],
)
def test_eq_s3_layer_matches_matmul_reference_and_printed_formula(n, d, m, generated):
    prefill, decode = eq_s3_layer(n, d, m, generated)
    assert prefill + decode == reference_eq_s3_layer(n, d, m, generated)
    assert prefill + decode == printed_eq_s3_layer(n, d, m, generated)
    assert prefill == reference_eq_s3_layer(n, d, m, 0)


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec("gqa", 1, 24, 40, num_heads=6, num_kv_heads=2),
        ModelSpec("mha", 1, 16, 30, num_heads=4, num_kv_heads=4),
        ModelSpec("wide-heads", 1, 16, 30, num_heads=4, num_kv_heads=1, head_dim=8),
    ],
    ids=lambda s: s.name,
)
@pytest.mark.parametrize("n, generated", [(0, 2), (5, 0), (9, 4), (40, 7)])
def test_exact_layer_matches_head_by_head_reference(spec, n, generated):
    prefill, decode = exact_layer(n, spec, generated)
    assert prefill + decode == reference_exact_layer(n, spec, generated)
    assert prefill == reference_exact_layer(n, spec, 0)


def test_exact_equals_eq_s3_for_mha_with_a_two_matrix_ffn_share():
    # With H_kv = H, the projections agree (4 n d^2); the count differs only by the third FFN
    # matrix, n d m per prefill token and d m per decode step.
    spec = ModelSpec("mha", 3, 32, 64, num_heads=4, num_kv_heads=4)
    schedule = TokenSchedule((50, 50, 20))
    ours, paper = exact(spec, schedule, 10), eq_s3(spec, schedule, 10)
    ffn_third = sum(n * 32 * 64 for n in schedule.tokens) + 3 * 10 * 32 * 64
    assert ours.total - paper.total == ffn_third


def test_sums_run_over_the_layers_of_the_schedule():
    spec = ModelSpec("t", 3, 16, 32, num_heads=2, num_kv_heads=1)
    schedule = TokenSchedule((30, 30, 12), text=5)
    result = eq_s3(spec, schedule, 7)
    layers = [eq_s3_layer(n, 16, 32, 7) for n in (35, 35, 17)]
    assert result.prefill == sum(p for p, _ in layers)
    assert result.decode == sum(q for _, q in layers)
    assert result.per_layer == tuple(p + q for p, q in layers)
    assert result.total == result.prefill + result.decode
    assert result.tera == pytest.approx(result.total / 1e12)


def test_qwen2_7b_exact_count_is_about_1_2_times_eq_s3():
    schedule = TokenSchedule.from_config(VANILLA, OV7)
    factor = exact(OV7, schedule).total / eq_s3(OV7, schedule).total
    assert 1.15 < factor < 1.25


def test_lm_head_counts_last_prefill_row_and_each_decode_step():
    spec = ModelSpec("t", 2, 16, 32, num_heads=2, num_kv_heads=1, vocab_size=50)
    schedule = TokenSchedule.uniform(2, 10)
    with_head = exact(spec, schedule, 4, lm_head=True)
    assert with_head.lm_head == (1 + 4) * 16 * 50
    assert with_head.total == exact(spec, schedule, 4).total + with_head.lm_head
    with pytest.raises(ValueError, match="vocab_size"):
        exact(ModelSpec("no-vocab", 2, 16, 32, num_heads=2, num_kv_heads=1), schedule, lm_head=True)


# --------------------------------------------------------------------------------------------
# Token schedule from a CompressionConfig
# --------------------------------------------------------------------------------------------


def test_schedule_comes_from_config_budget_and_merge():
    config = CompressionConfig(retention=0.02, merger="text-aware", layer=18, keep_ratio=0.5)
    n = config.budget(32, 196)
    kept = config.kept_after_merge(n)
    at_input = TokenSchedule.from_config(config, OV7)  # what the adapters run
    assert at_input.visual == (n,) * 18 + (kept,) * 10
    at_output = TokenSchedule.from_config(config, OV7, merge_at="output")  # the paper's count
    assert at_output.visual == (n,) * 19 + (kept,) * 9
    assert (n, kept) == (128, 64)


def test_schedule_without_merger_ignores_k_and_adds_text_tokens():
    tiny = ModelSpec("tiny", 4, 16, 32, num_heads=2, num_kv_heads=1, frames=3, tokens_per_frame=10)
    config = CompressionConfig(retention=0.5, merger="none", layer=18)
    schedule = TokenSchedule.from_config(config, tiny, text_tokens=7)
    assert schedule.visual == (15,) * 4
    assert schedule.tokens == (22,) * 4


def test_k_equal_to_layer_count_reduces_nothing_and_vanilla_is_full():
    tiny = ModelSpec("tiny", 4, 16, 32, num_heads=2, num_kv_heads=1, frames=2, tokens_per_frame=8)
    config = CompressionConfig(retention=1.0, merger="last-token", layer=4, keep_ratio=0.25)
    assert TokenSchedule.from_config(config, tiny).visual == (16,) * 4
    assert TokenSchedule.from_config(VANILLA, tiny).visual == (16,) * 4


def test_count_wraps_schedule_and_counter():
    config = CompressionConfig(retention=0.1)
    schedule = TokenSchedule.from_config(config, OV7)
    assert count(config, OV7) == eq_s3(OV7, schedule)
    assert count(config, OV7, counter="exact") == exact(OV7, schedule)
    with pytest.raises(ValueError, match="counter"):
        count(config, OV7, counter="fvcore")


# --------------------------------------------------------------------------------------------
# The paper's columns
# --------------------------------------------------------------------------------------------


def _tera(config: CompressionConfig, spec: ModelSpec = OV7) -> float:
    return count(config, spec, merge_at="output").tera


def test_vanilla_rows_reproduce_41_4_and_80_9_and_3_54():
    assert f"{_tera(VANILLA):.1f}" == "41.4"
    assert f"{_tera(VANILLA, MODEL_SPECS['llava-video-7b']):.1f}" == "80.9"
    assert f"{_tera(VANILLA, MODEL_SPECS['llava-onevision-0.5b']):.2f}" == "3.54"
    assert f"{_tera(VANILLA, OV7.with_video(frames=16)):.1f}" == "19.0"


@pytest.mark.parametrize(
    "retention, without_m, with_m",
    [
        (0.10, ("4.0", "9.6"), ("3.4", "8.2")),
        (0.05, ("2.2", "5.4"), ("2.0", "4.7")),
        (0.02, ("1.2", "2.9"), ("1.1", "2.6")),
        (0.01, ("0.9", "2.1"), ("0.8", "2.0")),
    ],
)
def test_ours_rows_of_table_1(retention, without_m, with_m):
    vanilla = count(VANILLA, OV7)
    for merger, printed in (("none", without_m), ("text-aware", with_m)):
        result = count(
            CompressionConfig(retention=retention, merger=merger), OV7, merge_at="output"
        )
        assert (f"{result.tera:.1f}", f"{result.ratio(vanilla) * 100:.1f}") == printed


def test_merged_rows_need_the_reduction_after_layer_k():
    # With the reduction at the input of layer 18, 10 % gives 8.1 % instead of the printed 8.2 %.
    vanilla = count(VANILLA, OV7)
    at_input = count(CompressionConfig(retention=0.1), OV7, merge_at="input")
    assert f"{at_input.ratio(vanilla) * 100:.1f}" == "8.1"


def test_every_row_reproduced():
    results = reproduce()
    assert len(results) == len(paper_rows()) == 31
    assert [(r.row.model, r.row.method, r.row.label) for r in results if not r.matches] == []
    # LLaVA-Video at 2 %: 64 x round(0.02 * 169) = 192 tokens gives the printed 1.5 T
    video_2 = TokenSchedule.uniform(28, 192)
    spec = MODEL_SPECS["llava-video-7b"]
    assert f"{eq_s3(spec, video_2).tera:.1f}" == "1.5"


def test_fastv_rows_use_keep_share_after_layer_2():
    config = fastv(0.10)
    schedule = TokenSchedule.from_config(config, OV7, merge_at="output")
    assert schedule.visual == (6272,) * 3 + (628,) * 25
    assert f"{eq_s3(OV7, schedule).tera:.1f}" == "7.9"


def test_command_prints_tables_with_paper_values(capsys):
    main([])
    out = capsys.readouterr().out
    assert out == format_tables("output") + "\n"
    assert "31/31 printed FLOPs rows reproduced (T and ratio)." in out
    assert "128      512 -> 256 from layer 19     2.8    2.8" in out


def test_command_counts_one_config(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "num_hidden_layers": 2,
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_attention_heads": 2,
            }
        )
    )
    main(
        [
            "--model",
            str(path),
            "--frames",
            "2",
            "--tokens-per-frame",
            "4",
            "--retention",
            "0.5",
            "--generated",
            "0",
        ]
    )
    out = capsys.readouterr().out
    assert "visual tokens per layer: 4," in out
    spec = ModelSpec.from_config(path, frames=2, tokens_per_frame=4)
    expected = eq_s3(spec, TokenSchedule.uniform(2, 4), 0).tera
    assert f"{expected:.4f} T" in out


# --------------------------------------------------------------------------------------------
# Specs and bad input
# --------------------------------------------------------------------------------------------


def test_builtin_specs_match_public_sizes():
    assert (OV7.num_layers, OV7.hidden_size, OV7.intermediate_size) == (28, 3584, 18944)
    assert (OV7.num_heads, OV7.num_kv_heads, OV7.head_dim) == (28, 4, 128)
    small = MODEL_SPECS["llava-onevision-0.5b"]
    assert (small.num_layers, small.hidden_size, small.intermediate_size) == (24, 896, 4864)
    assert (small.num_kv_heads, small.head_dim) == (2, 64)
    video = MODEL_SPECS["llava-video-7b"]
    assert (video.frames, video.tokens_per_frame, video.visual_tokens) == (64, 169, 10816)
    qwen2 = MODEL_SPECS["qwen2-vl-7b"]
    assert (qwen2.num_layers, qwen2.hidden_size, qwen2.num_kv_heads) == (28, 3584, 4)
    assert (qwen2.frames, qwen2.tokens_per_frame) == (16, 256)
    next_video = MODEL_SPECS["llava-next-video-7b"]
    assert (next_video.num_layers, next_video.hidden_size, next_video.intermediate_size) == (
        32,
        4096,
        11008,
    )
    assert (next_video.num_kv_heads, next_video.head_dim, next_video.tokens_per_frame) == (
        32,
        128,
        144,
    )
    internvl = MODEL_SPECS["internvl3.5-8b"]
    assert (internvl.num_layers, internvl.hidden_size, internvl.intermediate_size) == (
        36,
        4096,
        12288,
    )
    assert (internvl.num_kv_heads, internvl.kv_dim, internvl.tokens_per_frame) == (8, 1024, 256)
    assert set(MODEL_SPECS) == {
        "llava-onevision-7b",
        "llava-onevision-0.5b",
        "llava-video-7b",
        "qwen2.5-vl-7b",
        "qwen3-vl-8b",
        "qwen2-vl-7b",
        "llava-next-video-7b",
        "internvl3.5-8b",
        "glm-4.1v-9b",
        "videollama3-7b",
    }
    with pytest.raises(ValueError, match="built-in models"):
        ModelSpec.builtin("llava-13b")


def test_from_config_reads_text_config_top_level_files_and_objects(tmp_path):
    text = Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    )
    vlm = LlavaOnevisionConfig(text_config=text.to_dict())
    from_object = ModelSpec.from_config(vlm, name="llava-onevision-7b")
    assert from_object == OV7
    (tmp_path / "config.json").write_text(json.dumps(vlm.to_dict()))
    assert ModelSpec.from_config(tmp_path, name="llava-onevision-7b") == OV7
    assert ModelSpec.from_config(tmp_path / "config.json", name="llava-onevision-7b") == OV7
    top = ModelSpec.from_config(text.to_dict(), frames=64, tokens_per_frame=169)
    assert (top.num_kv_heads, top.frames, top.tokens_per_frame) == (4, 64, 169)


@pytest.mark.parametrize("name", sorted(MODEL_SPECS))
def test_text_config_is_what_from_config_reads_back(name):
    spec = MODEL_SPECS[name]
    text = spec.text_config()
    back = ModelSpec.from_config(
        text, name=name, frames=spec.frames, tokens_per_frame=spec.tokens_per_frame
    )
    assert back == spec
    # head_dim only where transformers would not derive it (d / H)
    assert ("head_dim" in text) == (spec.head_dim != spec.hidden_size // spec.num_heads)


def test_text_config_keeps_a_head_dim_that_is_not_hidden_over_heads():
    spec = ModelSpec("wide-heads", 2, 64, 128, 4, 2, head_dim=32)
    assert spec.text_config()["head_dim"] == 32
    assert ModelSpec.from_config(spec.text_config(), name="wide-heads") == spec


@pytest.mark.parametrize(
    "source, message",
    [
        ({"hidden_size": 8}, "num_hidden_layers"),
        ({"text_config": {"vision": 1}}, "num_hidden_layers"),
        (42, "config.json path"),
    ],
)
def test_from_config_rejects_what_is_not_an_llm_config(source, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec.from_config(source)


def test_from_config_rejects_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no transformers config"):
        ModelSpec.from_config(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_layers": 0}, "num_layers must be >= 1"),
        ({"hidden_size": -8}, "hidden_size must be >= 1"),
        ({"intermediate_size": 0}, "intermediate_size must be >= 1"),
        ({"num_heads": 0}, "num_heads must be >= 1"),
        ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"hidden_size": 30}, "multiple of num_heads"),
        ({"frames": 0}, "frames must be >= 1"),
        ({"tokens_per_frame": 1.5}, "tokens_per_frame must be an integer"),
        ({"num_layers": True}, "num_layers must be an integer"),
        ({"vocab_size": -1}, "vocab_size must be >= 0"),
    ],
)
def test_bad_specs_raise(changes, message):
    values = dict(
        name="bad", num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2
    )
    values.update(changes)
    with pytest.raises(ValueError, match=message):
        ModelSpec(**values)


def test_bad_schedules_raise():
    with pytest.raises(ValueError, match="visual tokens at layer 1 must be >= 0"):
        TokenSchedule((4, -1))
    with pytest.raises(ValueError, match="text tokens must be >= 0"):
        TokenSchedule((4,), text=-2)
    with pytest.raises(ValueError, match="at least one layer"):
        TokenSchedule(())
    with pytest.raises(ValueError, match="28 layers"):
        eq_s3(OV7, TokenSchedule.uniform(3, 10))
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        eq_s3_layer(-1, 8, 16)
    with pytest.raises(ValueError, match="generated tokens R must be >= 0"):
        exact_layer(4, OV7, -5)


def test_k_beyond_the_layer_count_raises():
    small = MODEL_SPECS["llava-onevision-0.5b"]
    config = CompressionConfig(retention=0.02, layer=30)
    with pytest.raises(ValueError, match=r"K=30 is beyond the 24 decoder layers.*\[0, 24\]"):
        TokenSchedule.from_config(config, small)
    with pytest.raises(ValueError, match="merge_at"):
        TokenSchedule.from_config(CompressionConfig(), OV7, merge_at="middle")


# --------------------------------------------------------------------------------------------
# Independent measurement on tiny transformers models (fvcore and FlopCounterMode)
# --------------------------------------------------------------------------------------------

TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)
GENERATED = 3


def _causal(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)[None, None]


class FullRun(nn.Module):
    """Prefill then R decode steps through the unmodified transformers model with a KV cache."""

    def __init__(self, lm: nn.Module, generated: int) -> None:
        super().__init__()
        self.lm, self.generated = lm, generated

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        out = self.lm(inputs_embeds=embeds, use_cache=True)
        cache, hidden = out.past_key_values, out.last_hidden_state[:, -1:]
        for _ in range(self.generated):
            out = self.lm(inputs_embeds=hidden, past_key_values=cache, use_cache=True)
            hidden = out.last_hidden_state
        return hidden


class ScheduleRun(nn.Module):
    """The transformers decoder layers called one by one, layer i on ``tokens[i]`` tokens.

    Dropping the tail at a layer stands for the compressor's reduction: the FLOPs depend on the
    count only.  Each layer keeps its own KV cache length, as after in-LLM merging.
    """

    def __init__(self, lm: nn.Module, tokens: tuple[int, ...], generated: int) -> None:
        super().__init__()
        self.lm, self.tokens, self.generated = lm, tokens, generated

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        cache = DynamicCache(config=self.lm.config)
        hidden = embeds
        for layer, n in zip(self.lm.layers, self.tokens, strict=True):
            hidden = hidden[:, :n]
            positions = torch.arange(n)[None]
            hidden = layer(
                hidden,
                attention_mask=_causal(n),
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=self.lm.rotary_emb(hidden, positions),
            )
        hidden = hidden[:, -1:]
        for t in range(1, self.generated + 1):
            for layer, n in zip(self.lm.layers, self.tokens, strict=True):
                positions = torch.tensor([[n + t - 1]])
                hidden = layer(
                    hidden,
                    attention_mask=None,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    position_embeddings=self.lm.rotary_emb(hidden, positions),
                )
        return hidden


def _measure(module: nn.Module, embeds: torch.Tensor) -> tuple[int, int]:
    """(fvcore, FlopCounterMode) multiply-adds of one forward of ``module``."""
    from fvcore.nn import FlopCountAnalysis
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        analysis = FlopCountAnalysis(module, (embeds,))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        fv = analysis.total()
        with FlopCounterMode(display=False) as counter:
            module(embeds)
    return fv, counter.get_total_flops() // 2


def _assert_close(measured: int, expected: int, what: str) -> None:
    # Equal with transformers 5.23.  Versions that build RoPE's frequencies with a matmul
    # (inv_freq @ positions, d_h / 2 multiply-adds per token) add well under 0.1 % here.
    assert expected > 0
    assert abs(measured - expected) / expected < 0.01, f"{what}: {measured} vs {expected}"


@pytest.fixture(scope="module")
def qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(**TINY_TEXT)
    config._attn_implementation = "eager"
    return Qwen2ForCausalLM(config).eval()


def test_exact_count_matches_fvcore_and_flop_counter_on_full_tokens(qwen2):
    torch.set_num_threads(1)
    spec = ModelSpec.from_config(qwen2.config, frames=4, tokens_per_frame=24)
    schedule = TokenSchedule.from_config(VANILLA, spec, text_tokens=6)
    expected = exact(spec, schedule, GENERATED).total
    embeds = torch.randn(1, schedule.tokens[0], spec.hidden_size)
    fv, tc = _measure(FullRun(qwen2.model, GENERATED), embeds)
    _assert_close(fv, expected, "fvcore")
    _assert_close(tc, expected, "FlopCounterMode")
    # Eq. S3 is not the real architecture: it misses the third FFN matrix, over-counts K and V.
    assert abs(eq_s3(spec, schedule, GENERATED).total - fv) / fv > 0.05


def test_lm_head_count_matches_flop_counter(qwen2):
    from torch.utils.flop_counter import FlopCounterMode

    spec = ModelSpec.from_config(qwen2.config)
    n = 40
    ids = torch.randint(0, spec.vocab_size, (1, n))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        qwen2(input_ids=ids, logits_to_keep=1)
    prefill_only = exact(spec, TokenSchedule.uniform(spec.num_layers, n), generated=0, lm_head=True)
    _assert_close(counter.get_total_flops() // 2, prefill_only.total, "FlopCounterMode")


def test_exact_count_matches_measurement_with_compression_and_merging():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vlm_config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **TINY_TEXT),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
    )
    vlm_config._attn_implementation = "eager"
    lm = LlavaOnevisionForConditionalGeneration(vlm_config).eval().model.language_model
    spec = ModelSpec.from_config(vlm_config, frames=8, tokens_per_frame=16)
    config = CompressionConfig(retention=0.5, merger="text-aware", layer=2, keep_ratio=0.5)
    schedule = TokenSchedule.from_config(config, spec, text_tokens=5)
    # 8 frames x round(0.5 x 16) = 64 visual tokens, 32 of them kept from layer K = 2 on
    assert schedule.tokens == (69, 69, 37, 37)
    expected = exact(spec, schedule, GENERATED).total
    embeds = torch.randn(1, schedule.tokens[0], spec.hidden_size)
    fv, tc = _measure(ScheduleRun(lm, schedule.tokens, GENERATED), embeds)
    _assert_close(fv, expected, "fvcore")
    _assert_close(tc, expected, "FlopCounterMode")
    uniform = exact(spec, TokenSchedule.uniform(spec.num_layers, 69), GENERATED).total
    assert fv < uniform * 0.8  # the merge is visible in the measurement


def test_generated_default_is_the_papers_r():
    assert GENERATED_TOKENS == 100
    assert math.isclose(count(VANILLA, OV7).tera, 41.416454152192, rel_tol=1e-12)


def test_command_rejects_bad_values_with_a_message(capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "--model",
                "llava-onevision-0.5b",
                "--retention",
                "0.02",
                "--merger",
                "text-aware",
                "--layer",
                "30",
            ]
        )
    assert "K=30 is beyond the 24 decoder layers" in capsys.readouterr().err


def test_qwen3_vl_8b_spec_is_its_public_text_config_and_counts_with_head_dim_128():
    from transformers import Qwen3VLConfig

    public = Qwen3VLConfig(
        text_config=dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
        )
    )
    spec = MODEL_SPECS["qwen3-vl-8b"]
    assert (
        ModelSpec.from_config(public, name="qwen3-vl-8b", frames=16, tokens_per_frame=196) == spec
    )
    assert (spec.attention_dim, spec.kv_dim, spec.visual_tokens) == (4096, 1024, 3136)
    n = spec.visual_tokens + 60
    d, m, kv = 4096, 12288, 1024
    # one Qwen3 layer: q, o (d x d), k, v (d x 1024), QK^T and AV, a 3-matrix SwiGLU
    prefill = 2 * n * d * d + 2 * n * d * kv + 2 * n * n * d + 3 * n * d * m
    assert exact_layer(n, spec, generated=0)[0] == prefill


def test_exact_count_matches_measurement_on_a_qwen3_vl_language_model():
    """head_dim (32) differs from hidden / heads (16) and q/k are normalised per head, as in
    Qwen3-VL: the count still equals what fvcore and FlopCounterMode measure."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = Qwen3VLConfig(
        text_config=dict(**TINY_TEXT, head_dim=32),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2),
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    lm = Qwen3VLForConditionalGeneration(config).eval().model.language_model
    spec = ModelSpec.from_config(config, frames=4, tokens_per_frame=24)
    assert spec.head_dim == 32 and spec.attention_dim == 128
    schedule = TokenSchedule.from_config(VANILLA, spec, text_tokens=6)
    expected = exact(spec, schedule, GENERATED).total
    embeds = torch.randn(1, schedule.tokens[0], spec.hidden_size)
    fv, tc = _measure(FullRun(lm, GENERATED), embeds)
    _assert_close(fv, expected, "fvcore")
    _assert_close(tc, expected, "FlopCounterMode")


def test_llava_video_tables_say_the_adapter_runs_196_tokens_per_frame():
    """Table 2 counts the paper's P = 169; transformers' LLaVA-OneVision class (what the adapter
    runs LLaVA-Video weights in) pools 27 x 27 SigLIP patches to 14 x 14 = 196. The table output,
    docs/flops.md and docs/models.md say so, with counts computed here again."""
    from types import SimpleNamespace

    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    config = LlavaOnevisionConfig()  # the real checkpoints' vision geometry: 384 px, patch 14
    side = config.vision_config.image_size // config.vision_config.patch_size
    patches = torch.zeros(1, side * side, 2)
    pooled = LlavaOnevisionModel.apply_pooling(SimpleNamespace(config=config), patches)
    assert (side, pooled.shape[1]) == (27, LLAVA_VIDEO_ADAPTER_P)
    paper = MODEL_SPECS["llava-video-7b"]
    assert paper.tokens_per_frame == 169 == (side // 2) ** 2
    ran = paper.with_video(tokens_per_frame=LLAVA_VIDEO_ADAPTER_P)
    full = [eq_s3(s, TokenSchedule.from_config(VANILLA, s)).tera for s in (paper, ran)]
    assert f"{full[0]:.1f} T -> {full[1]:.1f} T (+21%)" == "80.9 T -> 98.1 T (+21%)"
    note = llava_video_layout_note()
    assert "P = 169" in note[0] and "14 x 14 = 196" in note[0]
    assert f"vanilla 10816 -> 12544 tokens, {full[0]:.1f} T -> {full[1]:.1f} T (+21%)" in note[1]
    assert "\n".join(note) in format_tables()
    flops_page = (ROOT / "docs" / "flops.md").read_text()
    assert note[1].strip() in flops_page and note[2].split(": ")[1] in flops_page
    models = (ROOT / "docs" / "models.md").read_text()
    row = next(line for line in models.splitlines() if "LLaVA-Video checkpoints" in line)
    assert "196" in row and "26x26" not in row
    checkpoints = (ROOT / "docs" / "real-checkpoints.md").read_text()
    row = next(line for line in checkpoints.splitlines() if line.startswith("| LLaVA-Video-7B"))
    assert "64 x 196 in this class" in row
