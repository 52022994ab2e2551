"""Tests of ustc/evaluation.py (the lmms-eval models: tests/test_lmms_eval.py).

The lmms-eval tests need lmms-eval importable (it is an optional extra; see docs/ablations.md for
an install that keeps this torch) and are skipped otherwise.  They go through lmms-eval's own
entry-point loader and its real ``Instance`` request objects, with a tiny random LLaVA-OneVision.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ustc import evaluation
from ustc.config import CompressionConfig
from ustc.evaluation import (
    BenchmarkResult,
    LabBenchmark,
    LmmsEvalBenchmark,
    build_benchmarks,
    parse_lmms_results,
)
from ustc.lmms_eval import config_from_model_args, config_to_model_args

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None


def test_registered_benchmarks_and_their_columns() -> None:
    assert {
        "lab",
        "lmms-eval",
        "mvbench",
        "egoschema",
        "mlvu",
        "longvideobench",
        "videomme",
    } <= set(evaluation.BENCHMARKS.names())
    assert LmmsEvalBenchmark().columns == (
        "MVBench",
        "EgoSchema",
        "MLVU",
        "LongVideoBench",
        "VideoMME",
    )
    (single,) = build_benchmarks("videomme", {"limit": 4, "split": "ignored-not-taken"})
    assert single.columns == ("VideoMME",) and single.limit == 4
    assert single.spec() == {
        "name": "videomme",
        "model": evaluation.LmmsEvalBenchmark().model,
        "limit": 4,
        "frames": 32,
        "lmms_model": "llava_onevision_ustc",
    }
    with pytest.raises(ValueError, match="unknown lmms-eval task"):
        LmmsEvalBenchmark(tasks="mvbench,activitynet")


def test_normalized_places_a_score_between_random_and_oracle() -> None:
    """Issue 27's figures: ours 55.2, random 36.0, oracle 94.5 -> 0.33; random is 0, the
    oracle 1, nothing is clipped, and an oracle no better than random has no scale."""
    assert evaluation.normalized(55.2, 36.0, 94.5) == pytest.approx(19.2 / 58.5)
    assert round(evaluation.normalized(55.2, 36.0, 94.5), 2) == 0.33
    assert evaluation.normalized(36.0, 36.0, 94.5) == 0.0
    assert evaluation.normalized(94.5, 36.0, 94.5) == 1.0
    assert evaluation.normalized(30.0, 40.0, 60.0) == pytest.approx(-0.5)
    assert evaluation.normalized(70.0, 40.0, 60.0) == pytest.approx(1.5)
    assert evaluation.normalized(50.0, 40.0, 40.0) is None
    assert evaluation.normalized(50.0, 45.0, 40.0) is None
    for bad in (float("nan"), float("inf"), None, True):
        with pytest.raises(ValueError, match="must be a finite number"):
            evaluation.normalized(50.0, bad, 90.0)  # type: ignore[arg-type]


def test_average_is_the_unweighted_column_mean() -> None:
    assert BenchmarkResult({"a": 50.0, "b": 40.0, "c": 30.0}, n=999).average == 40.0
    with pytest.raises(ValueError, match="at least one score"):
        _ = BenchmarkResult({}).average


def test_flops_spec_of_known_checkpoints() -> None:
    spec = LmmsEvalBenchmark(model="llava-hf/llava-onevision-qwen2-0.5b-ov-hf").flops_spec()
    assert (spec.name, spec.num_layers, spec.frames) == ("llava-onevision-0.5b", 24, 32)
    spec = LmmsEvalBenchmark(model="lmms-lab/LLaVA-Video-7B-Qwen2", frames=64).flops_spec()
    assert (spec.name, spec.frames, spec.tokens_per_frame) == ("llava-video-7b", 64, 169)
    for checkpoint, name in [
        ("Qwen/Qwen2-VL-7B-Instruct", "qwen2-vl-7b"),
        ("llava-hf/LLaVA-NeXT-Video-7B-hf", "llava-next-video-7b"),
        ("OpenGVLab/InternVL3_5-8B", "internvl3.5-8b"),
    ]:
        assert LmmsEvalBenchmark(model=checkpoint).flops_spec().name == name
    assert LmmsEvalBenchmark(model="someone/unknown-model").flops_spec() is None


def test_lmms_eval_missing_package_or_data_is_reported_before_loading(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        evaluation.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "lmms_eval" else real(name, *a),
    )
    with pytest.raises(ValueError, match=r"need lmms-eval: pip install 'ustc\[lmms-eval\]'"):
        LmmsEvalBenchmark().check()
    monkeypatch.setattr(
        evaluation.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "lmms_eval" else real(name, *a),
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "datasets--OpenGVLab--MVBench").mkdir()
    LmmsEvalBenchmark(tasks="mvbench").check()  # present in the cache
    with pytest.raises(ValueError, match=r"videomme \(lmms-lab/Video-MME\)"):
        LmmsEvalBenchmark(tasks="mvbench,videomme").check()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    LmmsEvalBenchmark(tasks="mvbench,videomme").check()  # online: lmms-eval downloads them


def test_parse_lmms_results_picks_each_metric_as_percent() -> None:
    results = {
        "mvbench": {"alias": "mvbench", "mvbench_accuracy,none": 0.529},
        "videomme": {
            "videomme_perception_score,none": 51.3,
            "videomme_perception_score_stderr,none": "N/A",
        },
    }
    assert parse_lmms_results(results, ["mvbench", "videomme"]) == pytest.approx(
        {"MVBench": 52.9, "VideoMME": 51.3}
    )
    with pytest.raises(ValueError, match="no results for task 'mlvu_dev'"):
        parse_lmms_results(results, ["mlvu"])
    with pytest.raises(ValueError, match="submission server"):
        parse_lmms_results({"egoschema": {"submission,none": "file.json"}}, ["egoschema"])


def test_model_args_round_trip_through_lmms_eval_parsing() -> None:
    config = CompressionConfig(
        retention=0.05,
        scorer="sim",
        tau=0.6,
        cluster_ratio=0.2,
        k=7,
        merger="text-aware",
        layer=14,
        keep_ratio=0.25,
        lam=1.0,
    )
    text = config_to_model_args(config)
    assert "retention=0.05" in text and "merger=text-aware" in text and "lam=1.0" in text
    if HAS_LMMS:
        from lmms_eval.utils import simple_parse_args_string as parse
    else:

        def parse(s: str) -> dict[str, object]:
            return dict(kv.split("=", 1) for kv in s.split(","))

        pytest.skip("the typed parsing is lmms-eval's; run with lmms-eval installed")
    back, rest = config_from_model_args(parse(text + ",pretrained=x,max_frames_num=8"))
    assert back == config and rest == {"pretrained": "x", "max_frames_num": 8}
    back, _ = config_from_model_args(parse("retention=1,merger=none"))
    assert back.is_identity
    with pytest.raises(ValueError, match="unknown scorer"):
        config_from_model_args(parse("scorer=magic"))


# --------------------------------------------------------------------------------------------
# The lab benchmark
# --------------------------------------------------------------------------------------------


def test_lab_errors_come_before_any_model_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import ustc.lab.model as lab_model
    from ablations import run as runner

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(lab_model, "load_model", no_loading)
    runner._BENCH_CACHE.clear()
    with pytest.raises(ValueError, match="split must be one of"):
        runner.resolve(["--split", "nope"])
    with pytest.raises(ValueError, match="unbounded stream: give --limit"):
        runner.resolve(["--split", "train"])
    with pytest.raises(ValueError, match=r"no lab weights in .*empty"):
        runner.resolve(["--model", str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="unknown scorer"):
        runner.resolve(["--scorer", "nope"])
    with pytest.raises(ValueError, match=r"K must be in \[0, 3\]"):
        runner.resolve(["--layer", "18"])
    assert LabBenchmark().default_config().layer < LabBenchmark().llm_layers()


@pytest.mark.skipif(
    not (LabBenchmark()._folder() / "model.safetensors").is_file(),
    reason="the lab's trained weights are not shipped yet",
)
def test_lab_benchmark_runs_a_reduced_split(tmp_path: Path) -> None:
    bench = LabBenchmark(limit=12)
    bench.check()
    result = bench.evaluate(bench.default_config().replace(retention=0.1), progress=False)
    assert result.n == 12 and set(result.scores) <= set(bench.columns)
    assert result.tokens["llm_visual"] < result.tokens["visual_in"]
    spec = bench.flops_spec()
    assert spec.num_layers == bench.llm_layers()
    assert spec.visual_tokens == result.tokens["visual_in"]


def test_a_table_runs_on_the_lab_path(tmp_path: Path) -> None:
    """Table S6 through the real lab code path (ustc.lab.evaluate, ustc.attach) on a randomly
    initialised lab model saved like the shipped weights, on 6 questions."""
    from ablations import run as runner
    from ablations import sweep as sweeper
    from ustc.lab.model import build_model

    torch.set_num_threads(1)
    build_model().save_pretrained(tmp_path / "lab")
    runner._BENCH_CACHE.clear()
    rendered = sweeper.run_sweep(
        "s6",
        ["--model", str(tmp_path / "lab"), "--limit=6"],
        store_path=str(tmp_path / "store.jsonl"),
        out_dir=str(tmp_path),
        wandb="disabled",
        progress=False,
    )
    assert rendered is not None and rendered.missing == 0 and len(rendered.rows) == 6
    from ablations.store import ResultStore

    records = list(ResultStore(tmp_path / "store.jsonl"))
    assert len(records) == 6
    for record in records:
        budget = record["flops"]["llm_visual_tokens"]
        assert record["tokens"]["llm_visual"] == budget  # measured on the model == planned
        assert record["columns"] == list(LabBenchmark().columns)
    vanilla = next(r for r in records if r["config"]["retention"] == 1.0)
    assert vanilla["tokens"]["llm_visual"] == vanilla["tokens"]["visual_in"]
    assert vanilla["tokens"]["visual_in"] == vanilla["flops"]["visual_tokens"]  # F * P


@pytest.mark.skipif(
    not (LabBenchmark()._folder() / "model.safetensors").is_file(),
    reason="the lab's trained weights are not shipped yet",
)
def test_lab_figures_do_not_depend_on_threads_or_batch_size() -> None:
    """A reduced lab set (the first 12 test questions) under the full method without merging and
    with it: 1 and 2 threads, batches of 1 and of 25 give the same answer to every question and
    the same logit margins up to float32 rounding (measured: 4e-6; the smallest margin on the
    full split is 9e-3, so rounding cannot flip an answer there)."""
    from ustc.lab.evaluate import evaluate, samples
    from ustc.lab.model import default_config, load_model

    model = load_model()
    data = samples("test", 12)
    before = torch.get_num_threads()
    try:
        for config in (default_config(merger="none"), default_config()):
            runs = {}
            for threads, batch in ((1, 25), (2, 25), (1, 1), (2, 7)):
                torch.set_num_threads(threads)
                runs[threads, batch] = evaluate(
                    config, model=model, data=data, batch_size=batch, progress=False
                )
            first = runs[1, 25]
            assert len(first.answers) == 12 and -1 not in first.answers
            for key, run in runs.items():
                assert run.answers == first.answers, f"threads, batch = {key}"
                assert run.per_family == first.per_family, f"threads, batch = {key}"
                assert run.margins == pytest.approx(first.margins, abs=1e-4), key
    finally:
        torch.set_num_threads(before)
