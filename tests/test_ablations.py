"""Tests of the ablation framework (ablations/): flags, validation order, store, resume, tables.

The benchmark here is :class:`ToyBenchmark`, a deterministic analytic function of every config
value (not a constant), so the grid, resume and table logic are checked independently of the lab
model.  W&B is disabled (WANDB_MODE=disabled) except where offline logging itself is tested.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from ablations import paper_tables, sweep_files, tables
from ablations import run as runner
from ablations import sweep as sweeper
from ablations.store import ResultStore, run_key
from ablations.wandb_log import metrics_of, resolve_mode
from ustc import flops
from ustc.config import CompressionConfig
from ustc.evaluation import Benchmark, BenchmarkResult, map_paper_layer
from ustc.presets import TABLE5_ROWS
from ustc.registry import RECYCLERS, SCORERS

ROOT = Path(__file__).resolve().parents[1]

TOY = f"{__name__}:ToyBenchmark"


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    runner._BENCH_CACHE.clear()
    ToyBenchmark.loads = 0
    ToyBenchmark.evaluations = 0


class ToyBenchmark(Benchmark):
    """Two columns that respond to every knob of the config, peaking at the paper's settings.

    Its "model" has 4 LLM layers and 8 frames x 49 tokens.  ``data`` names a file that must exist
    (to test missing-data errors).  TOY_LOG: file to which every evaluation appends its config;
    TOY_KILL_AFTER=n: SIGKILL this process when evaluation n + 1 starts; TOY_RAISE_AFTER=n: raise;
    TOY_SIGINT_AFTER=n: Ctrl-C (SIGINT) when evaluation n + 1 starts; TOY_SLEEP=s: each evaluation
    takes s seconds (to let two processes overlap).
    """

    registered_name = "toy"
    loads = 0
    evaluations = 0

    def __init__(self, limit: int | None = None, data: str | None = None) -> None:
        self.limit = limit
        self.data = data
        self._model: object | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        return ("Alpha", "Beta")

    def check(self) -> None:
        if self.data is not None and not Path(self.data).exists():
            raise ValueError(f"toy benchmark data {self.data} does not exist")

    def default_config(self) -> CompressionConfig:
        return CompressionConfig(layer=3)

    def llm_layers(self) -> int:
        return 4

    def flops_spec(self) -> flops.ModelSpec:
        return flops.ModelSpec(
            "toy",
            num_layers=4,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            num_kv_heads=2,
            frames=8,
            tokens_per_frame=49,
        )

    def evaluate(self, config: CompressionConfig, *, progress: bool = True) -> BenchmarkResult:
        done = type(self).evaluations
        if os.environ.get("TOY_KILL_AFTER") and done >= int(os.environ["TOY_KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("TOY_RAISE_AFTER") and done >= int(os.environ["TOY_RAISE_AFTER"]):
            raise RuntimeError("injected failure")
        if os.environ.get("TOY_SIGINT_AFTER") and done >= int(os.environ["TOY_SIGINT_AFTER"]):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the KeyboardInterrupt arrives here
        if os.environ.get("TOY_SLEEP"):
            time.sleep(float(os.environ["TOY_SLEEP"]))
        if self._model is None:
            type(self).loads += 1
            self._model = object()
        type(self).evaluations += 1
        if os.environ.get("TOY_LOG"):
            with open(os.environ["TOY_LOG"], "a") as fh:
                fh.write(
                    json.dumps({**config.to_dict(), "pid": os.getpid()}, sort_keys=True) + "\n"
                )
        score = toy_score(config)
        return BenchmarkResult(
            scores={"Alpha": score, "Beta": score - 7.0 + 3.0 * config.lam},
            n=self.limit or 10,
            tokens={"llm_visual": float(config.budget(8, 49))},
            timings={"compress": 0.001},
        )


def toy_score(c: CompressionConfig) -> float:
    score = 30.0 + 30.0 * c.retention**0.25
    score -= {"attn": 8.0, "sim": 1.0, "attn+sim": 0.0}[c.scorer]
    if c.recycler == "dpc":
        score += 1.0 - 20.0 * (c.cluster_ratio - 0.3) ** 2
    score -= 20.0 * (c.tau - 0.7) ** 2
    if c.merger == "text-aware":
        score += 0.5 - 10.0 * (c.layer / 4 - 0.6) ** 2 - (c.lam - 0.5) ** 2
    elif c.merger == "last-token":
        score -= 1.0
    return score


def resolve(*flags: str) -> runner.RunPlan:
    return runner.resolve(["--benchmark", TOY, *flags])


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def test_every_config_field_and_strategy_parameter_is_a_flag() -> None:
    options = {s for a in runner.build_parser()._actions for s in a.option_strings}
    for name in (
        "retention",
        "scorer",
        "pool",
        "tau",
        "recycler",
        "cluster-ratio",
        "k",
        "merger",
        "layer",
        "keep-ratio",
        "lam",
        "model",
        "benchmark",
        "limit",
        "split",
        "tasks",
        "cluster_ratio",
        "keep_ratio",
    ):
        assert f"--{name}" in options


def test_a_newly_registered_strategy_parameter_becomes_a_flag() -> None:
    @SCORERS.register("test-only-scaled")
    class Scaled:
        uses_attention = False

        def __init__(self, alpha: float = 1.0, use_bias: bool = False) -> None:
            self.alpha = alpha

    try:
        options = {s for a in runner.build_parser()._actions for s in a.option_strings}
        assert {"--alpha", "--use-bias", "--use_bias"} <= options
        plan = resolve("--scorer=test-only-scaled", "--alpha=2.5", "--use-bias=true")
        assert plan.config.scorer == "test-only-scaled"
        assert plan.config.params == {"alpha": 2.5, "use_bias": True}
        with pytest.raises(ValueError, match="alpha"):
            resolve("--alpha=2.5")  # the default scorer takes no alpha
    finally:
        SCORERS._classes.pop("test-only-scaled")


def test_name_equals_value_as_sweeps_pass_it() -> None:
    plan = resolve(
        "--cluster_ratio=0.4",
        "--keep-ratio=0.25",
        "--layer=2.0",
        "--tau=0.6",
        "--scorer=sim",
        "--recycler=dpc",
        "--merger=last-token",
        "--k=3",
        "--retention=0.05",
        "--limit=7",
    )
    c = plan.config
    assert (c.cluster_ratio, c.keep_ratio, c.layer, c.tau, c.scorer, c.merger, c.k) == (
        0.4,
        0.25,
        2,
        0.6,
        "sim",
        "last-token",
        3,
    )
    assert isinstance(c.layer, int) and c.retention == 0.05
    assert plan.benchmarks[0].limit == 7
    assert resolve("--cluster-ratio", "0.4").config.cluster_ratio == 0.4
    with pytest.raises(SystemExit):
        resolve("--layer=2.5")


def test_defaults_come_from_the_benchmark() -> None:
    assert resolve().config == CompressionConfig(layer=3)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--scorer=nope"],
            "unknown scorer 'nope'; known scorers: " + re.escape(", ".join(SCORERS.names())),
        ),
        (["--merger=fancy"], "unknown merger"),
        (["--retention=1.5"], r"retention must be in \(0, 1\]"),
        (["--tau=2"], r"--tau must be in \(0, 1\]"),
        (["--k=0"], "k .* must be >= 1"),
        (["--cluster-ratio=1.2"], "cluster_ratio"),
        (["--layer=4"], r"K must be in \[0, 3\]"),
        (["--paper-layer=30"], r"paper layer K must be in \[0, 28\]"),
        (["--layer=1", "--paper-layer=7"], "not both"),
        (["--modules=attn+magic"], "unknown --modules"),
        (["--modules=cluster", "--cluster-ratio=0.3"], "sets cluster_ratio=1.0"),
        (["--split=val"], "--split is not a parameter of benchmark"),
        (["--data=/nonexistent/toy.json"], "does not exist"),
        (["--benchmark=nosuch"], "unknown benchmark 'nosuch'"),
        (["--benchmark=os:path"], "not a subclass"),
    ],
)
def test_bad_input_fails_before_any_model_is_loaded(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve(*flags)
    assert ToyBenchmark.loads == 0 and ToyBenchmark.evaluations == 0


def test_cli_error_exits_2_with_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        runner.main(["--benchmark", TOY, "--recycler", "kmeans", "--no-store"])
    assert exc.value.code == 2
    known = ", ".join(RECYCLERS.names())
    assert f"unknown recycler 'kmeans'; known recyclers: {known}" in capsys.readouterr().err
    assert ToyBenchmark.loads == 0


def test_paper_layer_keeps_the_relative_depth() -> None:
    def reference(k: int, layers: int) -> int:
        exact = Fraction(k * layers, 28)
        nearest = math.floor(exact + Fraction(1, 2))  # half up
        return min(nearest, layers - 1)

    for layers in (1, 2, 4, 6, 24, 28, 32):
        for k in range(29):
            assert map_paper_layer(k, layers) == reference(k, layers), (k, layers)
    assert [map_paper_layer(k, 28) for k in (2, 7, 14, 18, 21)] == [2, 7, 14, 18, 21]
    assert resolve("--paper-layer=18").config.layer == 3
    assert resolve("--paper_layer=7").config.layer == 1


@pytest.mark.parametrize("row", runner.MODULE_ROWS)
def test_modules_flag_realises_the_table5_rows(row: str) -> None:
    plan = resolve(f"--modules={row}", "--retention=0.02", "--merger=none")
    expected = TABLE5_ROWS[runner.MODULE_ROWS[row]]
    assert plan.config == CompressionConfig(layer=3).replace(
        scorer=expected.scorer,
        recycler=expected.recycler,
        cluster_ratio=expected.cluster_ratio,
        retention=0.02,
        merger="none",
    )


# --------------------------------------------------------------------------------------------
# One run: record, JSON, store
# --------------------------------------------------------------------------------------------


def test_run_writes_the_record_and_reuses_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, store = tmp_path / "run.json", tmp_path / "store.jsonl"
    runner.main(
        [
            "--benchmark",
            TOY,
            "--scorer",
            "attn+sim",
            "--recycler",
            "dpc",
            "--store",
            str(store),
            "--output",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    config = CompressionConfig(layer=3)
    vanilla = CompressionConfig(retention=1.0, merger="none")
    alpha, vanilla_alpha = toy_score(config), toy_score(vanilla)
    assert record["config"] == config.to_dict()
    assert record["scores"] == pytest.approx({"Alpha": alpha, "Beta": alpha - 7 + 1.5})
    assert record["avg"] == pytest.approx(alpha - 2.75)
    assert record["pct_of_uncompressed"] == pytest.approx(
        100 * (alpha - 2.75) / (vanilla_alpha - 2.75)
    )
    spec = ToyBenchmark().flops_spec()
    assert record["flops"]["tflops"] == pytest.approx(flops.count(config, spec).tera)
    assert record["flops"]["llm_visual_tokens"] == 8 * 1  # ceil(0.02 * 49) = 1 per frame
    assert record["flops"]["after_merge_tokens"] == 4
    assert record["tokens"] == {"llm_visual": 8.0}
    assert record["timings"]["wall"] >= 0 and record["n"] == 10
    assert record["key"] == run_key(
        config.to_dict(), [{"name": "toy", "limit": None, "data": None}]
    )
    assert "| Alpha | Beta | Avg. | % | FLOPs (T)" in printed
    assert ToyBenchmark.evaluations == 2  # baseline + run
    assert len(ResultStore(store)) == 2

    runner._BENCH_CACHE.clear()
    again = runner.main(["--benchmark", TOY, "--store", str(store), "--quiet"])
    assert ToyBenchmark.evaluations == 2  # both from the store
    assert again["avg"] == pytest.approx(record["avg"])
    runner.main(["--benchmark", TOY, "--store", str(store), "--quiet", "--force"])
    assert ToyBenchmark.evaluations == 3  # the run again, not the baseline
    assert len(ResultStore(store)) == 2 and len(store.read_text().splitlines()) == 3


def test_store_repairs_a_line_cut_by_a_kill_once(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    store = ResultStore(path)
    assert store.append({"key": "a", "avg": 1.0})
    with path.open("a") as fh:
        fh.write('{"key": "b", "avg": 2')  # killed mid-write: no newline, invalid JSON
    with pytest.warns(UserWarning, match=r"moved it to .*s\.jsonl\.broken"):
        assert sorted(store.records()) == ["a"]
    # repaired: the broken line is kept aside, the store ends on its last complete record
    assert (tmp_path / "s.jsonl.broken").read_text() == '{"key": "b", "avg": 2\n'
    assert path.read_text() == '{"avg": 1.0, "key": "a"}\n'
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on any later read
        assert sorted(store.records()) == ["a"]
        assert store.append({"key": "c", "avg": 3.0})
        assert sorted(store.records()) == ["a", "c"]
        assert not store.append({"key": "a", "avg": 9.0})
        assert path.read_text().splitlines()[-1] == '{"avg": 3.0, "key": "c"}'
        assert store.append({"key": "a", "avg": 9.0}, replace=True)
        assert store.get("a") == {"key": "a", "avg": 9.0}


def test_store_keeps_a_complete_last_record_that_only_lacks_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"key": "a", "avg": 1.0}')
    store = ResultStore(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.append({"key": "b", "avg": 2.0})
        assert sorted(store.records()) == ["a", "b"]
    assert not (tmp_path / "s.jsonl.broken").exists()


def test_run_key_depends_on_every_config_value_and_the_benchmark() -> None:
    base = CompressionConfig()
    bench = [{"name": "lab", "split": "test", "limit": None}]
    keys = {run_key(base.to_dict(), bench)}
    for change in (
        {"tau": 0.6},
        {"k": 4},
        {"lam": 0.25},
        {"layer": 7},
        {"merger": "none"},
        {"cluster_ratio": 0.2},
        {"keep_ratio": 0.25},
        {"retention": 0.05},
    ):
        keys.add(run_key(base.replace(**change).to_dict(), bench))
    keys.add(run_key(base.to_dict(), [{**bench[0], "limit": 5}]))
    assert len(keys) == 10
    assert run_key({"lam": 1}, bench) == run_key({"lam": 1.0}, bench)


# --------------------------------------------------------------------------------------------
# Sweeps and tables
# --------------------------------------------------------------------------------------------

#: the paper's grids, copied from the paper's tables (independent of ablations/tables.py)
PAPER_GRIDS = {
    "table5": (
        "modules",
        ["attn", "sim", "cluster", "attn+sim", "attn+cluster", "sim+cluster", "attn+sim+cluster"],
        "none",
    ),
    "s5": ("paper-layer", [2, 7, 14, 18, 21], "text-aware"),
    "s6": ("tau", [0.5, 0.6, 0.7, 0.8, 0.9], "none"),
    "s7": ("cluster-ratio", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], "none"),
    "s8": ("lam", [0, 0.25, 0.5, 0.75, 1], "text-aware"),
}


@pytest.mark.parametrize("name", PAPER_GRIDS)
def test_sweep_yaml_expands_to_the_papers_grid(name: str) -> None:
    path = ROOT / "ablations" / "sweeps" / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["method"] == "grid" and data["program"] == "ablations/run.py"
    assert "${args}" in data["command"]
    parameter, values, merger = PAPER_GRIDS[name]
    points = sweep_files.expand_grid(sweep_files.load_sweep(path))
    assert [p[parameter] for p in points] == values
    assert all(p["retention"] == 0.02 and p["merger"] == merger for p in points)
    assert all(set(p) == {parameter, "retention", "merger"} for p in points)
    assert path.read_text() == sweep_files.sweep_yaml(
        paper_tables.TABLES[name]
    )  # regenerated, in sync
    assert all(a.startswith("--") and "=" in a for p in points for a in sweep_files.to_argv(p))


def test_sweep_rejects_what_a_grid_cannot_expand(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: bayes\nparameters: {tau: {min: 0.5, max: 0.9}}\n")
    with pytest.raises(ValueError, match="method 'grid' only"):
        sweep_files.load_sweep(bad)
    for table, flag, message in (
        ("s6", "--tau=0.5", "what this sweep varies"),
        ("s5", "--retention=3", "grid point"),
    ):
        with pytest.raises(ValueError, match=message):
            sweeper.run_sweep(
                table,
                ["--benchmark", TOY, flag],
                store_path=str(tmp_path / "s.jsonl"),
                progress=False,
            )
    assert ToyBenchmark.loads == 0


@pytest.mark.parametrize("name", PAPER_GRIDS)
def test_each_table_runs_end_to_end(name: str, tmp_path: Path) -> None:
    store, out_dir = tmp_path / "store.jsonl", tmp_path / "tables"
    rendered = sweeper.run_sweep(
        name,
        ["--benchmark", TOY, "--limit=3"],
        store_path=str(store),
        out_dir=str(out_dir),
        wandb="disabled",
        progress=False,
    )
    table = paper_tables.TABLES[name]
    parameter, values, merger = PAPER_GRIDS[name]
    assert rendered is not None and rendered.missing == 0
    assert len(rendered.rows) == 1 + len(values)
    header = rendered.header
    col = {h: i for i, h in enumerate(header)}
    vanilla = CompressionConfig(retention=1.0, merger="none")
    vanilla_avg = toy_score(vanilla) - 7 / 2 + 3 / 4
    assert rendered.rows[0][col["Avg."]] == pytest.approx(vanilla_avg)
    for row, value in zip(rendered.rows[1:], values, strict=True):
        argv = [*sweep_files.to_argv({parameter: value, "retention": 0.02, "merger": merger})]
        config = resolve(*argv).config
        expected = toy_score(config) - 3.5 + 1.5 * config.lam
        assert row[col["Avg."]] == pytest.approx(expected)
        assert row[col["Avg."]] == pytest.approx((row[col["Alpha"]] + row[col["Beta"]]) / 2)
        assert row[col["%"]] == pytest.approx(100 * expected / vanilla_avg)
        assert row[col["FLOPs (T)"]] == pytest.approx(
            flops.count(config, ToyBenchmark().flops_spec()).tera, rel=1e-2
        )
        assert row[col["paper Avg."]] == table.paper[value][5]
    if name == "s5":  # the mapped K is shown beside the paper's
        assert [r[col["layer"]] for r in rendered.rows[1:]] == [0, 1, 2, 3, 3]
    if name == "s7":
        assert rendered.rows[3][col["paper MVBench"]] == 52.9  # ratio 0.3 = Ours (w/o M) at 2 %
    assert ToyBenchmark.evaluations == len(set(map(str, values))) + 1 - (name == "s5")
    md = (out_dir / f"{name}-benchmark-{TOY.replace(':', '_')}-limit_3.md").read_text()
    assert md.count("\n|") == 2 + 1 + len(values) and "paper %" in md  # header, rule, rows
    csv_path = out_dir / f"{name}-benchmark-{TOY.replace(':', '_')}-limit_3.csv"
    parsed = list(csv.reader(io.StringIO(csv_path.read_text())))
    assert parsed[0] == header and len(parsed) == len(values) + 2


def test_an_interrupted_grid_resumes_without_redoing_or_losing_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, log = tmp_path / "store.jsonl", tmp_path / "evaluated.jsonl"
    monkeypatch.setenv("TOY_LOG", str(log))
    monkeypatch.setenv("TOY_RAISE_AFTER", "3")
    args = ["--benchmark", TOY]
    with pytest.raises(RuntimeError, match="injected"):
        sweeper.run_sweep("s6", args, store_path=str(store), wandb="disabled", progress=False)
    assert len(ResultStore(store)) == 3  # baseline + 2 rows, each fsync'd when it finished
    monkeypatch.delenv("TOY_RAISE_AFTER")
    rendered = sweeper.run_sweep(
        "s6", args, store_path=str(store), out_dir=str(tmp_path), wandb="disabled", progress=False
    )
    assert rendered is not None and rendered.missing == 0
    keys = [json.loads(line)["key"] for line in store.read_text().splitlines()]
    assert len(keys) == 6 == len(set(keys))
    evaluated = log.read_text().splitlines()
    assert len(evaluated) == 6 == len(set(evaluated))  # nothing was evaluated twice


def test_a_grid_killed_by_sigkill_finishes_after_a_restart(tmp_path: Path) -> None:
    store, log = tmp_path / "store.jsonl", tmp_path / "evaluated.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "ablations" / "sweep.py"),
        "s7",
        "--benchmark",
        "tests.test_ablations:ToyBenchmark",
        "--store",
        str(store),
        "--out-dir",
        str(tmp_path),
        "--wandb",
        "disabled",
        "--quiet",
    ]
    killed = _toy_run(cmd, TOY_LOG=str(log), TOY_KILL_AFTER="3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(ResultStore(store)) == 3
    done = _toy_run(cmd, TOY_LOG=str(log))
    assert done.returncode == 0, done.stderr
    keys = [json.loads(line)["key"] for line in store.read_text().splitlines()]
    assert len(keys) == 1 + 7 == len(set(keys))
    assert len(log.read_text().splitlines()) == 8  # the 3 stored runs were not redone
    csv_rows = list(
        csv.reader(
            io.StringIO(
                (tmp_path / "s7-benchmark-tests.test_ablations_ToyBenchmark.csv").read_text()
            )
        )
    )
    assert len(csv_rows) == 1 + 8 and all(r[1] != "" for r in csv_rows[1:])


def test_tables_cli_renders_from_the_store_without_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store.jsonl"
    runner.main(
        [
            "--benchmark",
            TOY,
            "--store",
            str(store),
            "--quiet",
            "--tau=0.6",
            "--merger=none",
            "--retention=0.02",
        ]
    )
    evaluations = ToyBenchmark.evaluations
    tables.main(["s6", "--benchmark", TOY, "--store", str(store)])
    text = capsys.readouterr().out
    assert ToyBenchmark.evaluations == evaluations
    assert "4 run(s) not in the store yet" in text
    row = next(line for line in text.splitlines() if line.startswith("| tau = 0.6"))
    assert "51.7" in row and row.count(" - ") < 3  # ours present, beside the paper's 51.7


# --------------------------------------------------------------------------------------------
# W&B
# --------------------------------------------------------------------------------------------


def test_wandb_mode_never_needs_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from ablations import wandb_log

    assert resolve_mode("auto") == "disabled"  # the fixture's WANDB_MODE
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setattr(wandb_log, "_has_api_key", lambda: False)
    monkeypatch.setattr(wandb_log, "_server_reachable", lambda timeout=1.0: True)
    assert resolve_mode("auto") == "offline"  # no credentials
    monkeypatch.setattr(wandb_log, "_has_api_key", lambda: True)
    monkeypatch.setattr(wandb_log, "_server_reachable", lambda timeout=1.0: False)
    assert resolve_mode("auto") == "offline"  # no network
    monkeypatch.setattr(wandb_log, "_server_reachable", lambda timeout=1.0: True)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("offline") == "offline"
    with pytest.raises(ValueError, match="wandb mode must be one of"):
        resolve_mode("cloud")


def test_wandb_metrics_cover_scores_flops_tokens_latency() -> None:
    record = {
        "scores": {"A": 50.0, "B": 40.0},
        "avg": 45.0,
        "pct_of_uncompressed": 90.0,
        "flops": {"tflops": 1.2, "ratio": 0.029},
        "tokens": {"llm_visual": 128.0},
        "timings": {"wall": 3.0},
        "n": 12,
    }
    assert metrics_of(record) == {
        "score/A": 50.0,
        "score/B": 40.0,
        "avg_score": 45.0,
        "pct_of_uncompressed": 90.0,
        "flops/tflops": 1.2,
        "flops/ratio": 0.029,
        "tokens/llm_visual": 128.0,
        "latency_s/wall": 3.0,
        "n": 12,
    }


def test_wandb_offline_run_is_written_locally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    runner.main(["--benchmark", TOY, "--no-store", "--quiet", "--no-baseline"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def _offline_wandb(monkeypatch: pytest.MonkeyPatch, folder: Path) -> Path:
    """W&B in offline mode writing under ``folder`` with no credentials; returns the runs' dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(folder / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(folder / "config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(folder))  # no ~/.netrc
    return folder / "wandb"


def test_an_offline_sweep_leaves_runs_and_its_table_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W&B's default for a user without an account: every grid point is an offline run with its
    metrics, the table run holds every row of the printed table (Table 5's "Vanilla" row has no
    cluster ratio: the cell wandb.Table refused before the fix)."""
    from ablations.wandb_log import read_offline_run

    runs_dir = _offline_wandb(monkeypatch, tmp_path / "w")
    store = tmp_path / "store.jsonl"
    rendered = sweeper.run_sweep(
        "table5",
        ["--benchmark", TOY, "--limit=3"],
        store_path=str(store),
        out_dir=str(tmp_path / "tables"),
        progress=False,
    )
    assert rendered is not None and rendered.missing == 0
    import wandb

    wandb.teardown()  # wandb's service writes behind the process: wait for it, as an exit does
    runs = [read_offline_run(d) for d in sorted(runs_dir.glob("offline-run-*"))]
    assert runs and all(r["finished"] for r in runs)
    points = [r for r in runs if r["job_type"] == "ablation"]
    (table_run,) = [r for r in runs if r["job_type"] == "table"]
    stored = ResultStore(store).records()
    assert len(points) == len(tables.TABLES["table5"].values) == len(stored) - 1
    for run in points:
        record = stored[run["config"]["key"]]
        assert run["group"] == "ustc-table5" and run["name"].startswith("ustc-table5 modules=")
        assert run["config"]["compression"] == record["config"]
        assert run["summary"]["avg_score"] == pytest.approx(record["avg"])
        for column, value in record["scores"].items():
            assert run["history"][0][f"score/{column}"] == pytest.approx(value)
        assert run["summary"]["flops/tflops"] == pytest.approx(record["flops"]["tflops"])
    logged = table_run["tables"]["table5"]
    assert logged["columns"] == rendered.header
    assert len(logged["data"]) == len(rendered.rows) == 8
    for got, want in zip(logged["data"], rendered.rows, strict=True):
        for logged_cell, cell in zip(got, want, strict=True):
            if isinstance(cell, str):  # "-" (not applicable) is missing in a numeric column
                assert logged_cell == cell or (cell == "-" and logged_cell is None)
            else:
                assert logged_cell == pytest.approx(cell)
    ratio = rendered.header.index("cluster_ratio")
    assert logged["data"][0][ratio] is None and rendered.rows[0][ratio] == "-"  # Vanilla
    assert all(isinstance(row[ratio], float) for row in logged["data"][1:])


def test_table_cells_keep_numbers_and_turn_mixed_columns_into_text() -> None:
    from ablations.wandb_log import table_cells

    rows = [["Vanilla", "-", "-", 1.5, True, "x"], ["Attn", 0.3, 2, 7, False, 2.0]]
    assert table_cells(rows) == [
        ["Vanilla", None, None, 1.5, True, "x"],  # "-" in a column of numbers: missing
        ["Attn", 0.3, 2, 7, False, "2.0"],  # text and a number: text
    ]


def test_online_without_credentials_stops_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _offline_wandb(monkeypatch, tmp_path)
    store = tmp_path / "store.jsonl"
    for env, flags in (("online", []), ("offline", ["--wandb", "online"])):
        monkeypatch.setenv("WANDB_MODE", env)
        with pytest.raises(SystemExit) as exit_info:
            runner.main(["--benchmark", TOY, "--store", str(store), "--quiet", *flags])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "no W&B API key" in err and "--wandb offline" in err
        with pytest.raises(SystemExit):
            sweeper.main(["s7", "--benchmark", TOY, "--store", str(store), "--quiet", *flags])
        assert "no W&B API key" in capsys.readouterr().err
    # a key but no server (a closed local port: refused at once, no 30 s wait per run)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_MODE", "online")
    start = time.perf_counter()
    with pytest.raises(SystemExit):
        runner.main(["--benchmark", TOY, "--store", str(store), "--quiet"])
    assert "does not answer" in capsys.readouterr().err
    assert time.perf_counter() - start < 10
    assert ToyBenchmark.evaluations == 0 and not store.exists()


def test_online_logging_that_fails_mid_sweep_falls_back_to_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import wandb

    from ablations import wandb_log

    runs_dir = _offline_wandb(monkeypatch, tmp_path)
    real_init = wandb_log._init

    def init(mode: str, project: str, **kwargs: object) -> object:
        if mode == "online":  # the network went away after the preflight check
            raise wandb.errors.CommError("Timed out while retrying")
        return real_init(mode, project, **kwargs)

    monkeypatch.setattr(wandb_log, "_init", init)
    record = runner.main(["--benchmark", TOY, "--no-store", "--quiet", "--no-baseline"])
    assert record is not None
    assert wandb_log.log_run(record, mode="online") == "offline"
    assert "logged offline instead" in capsys.readouterr().err
    wandb.teardown()
    runs = [wandb_log.read_offline_run(d) for d in runs_dir.glob("offline-run-*")]
    assert [r["summary"]["avg_score"] for r in runs] == [pytest.approx(record["avg"])] * 2


# --------------------------------------------------------------------------------------------
# Bad input and faults
# --------------------------------------------------------------------------------------------


def test_output_that_cannot_be_written_is_refused_before_any_model_loads(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = {
        str(tmp_path): "is a directory",
        str(tmp_path / "new") + "/": "is a directory",
        str(a_file / "run.json"): "is a file",
        "/proc/ustc-test-dir/run.json": "cannot create files in /proc",
    }
    for output, message in cases.items():
        with pytest.raises(ValueError, match=message):
            resolve("--output", output)
    assert ToyBenchmark.loads == 0 and ToyBenchmark.evaluations == 0
    resolve("--output", str(tmp_path / "deeper" / "run.json"))  # a new directory is fine


def test_output_error_from_the_cli_comes_before_the_evaluation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--benchmark", TOY, "--no-store", "--output", str(tmp_path), "--quiet"])
    assert exit_info.value.code == 2
    assert "is a directory" in capsys.readouterr().err
    assert ToyBenchmark.evaluations == 0


@pytest.mark.parametrize("extra", [["--limit", "5"], []])
def test_an_empty_benchmark_name_says_what_is_allowed(extra: list[str]) -> None:
    with pytest.raises(ValueError, match=r"--benchmark '' names no benchmark; .*lab"):
        runner.resolve(["--benchmark", "", *extra])


def _sweep_cmd(store: Path, out: Path, table: str = "s7") -> list[str]:
    return [
        sys.executable,
        str(ROOT / "ablations" / "sweep.py"),
        table,
        "--benchmark",
        "tests.test_ablations:ToyBenchmark",
        "--store",
        str(store),
        "--out-dir",
        str(out),
        "--wandb",
        "disabled",
        "--quiet",
    ]


def _toy_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _toy_run(cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """``cmd`` run from the repository root with ``_toy_env(**env)``, its output captured."""
    return subprocess.run(
        cmd, cwd=ROOT, env=_toy_env(**env), capture_output=True, text=True, timeout=120
    )


def test_two_sweeps_on_one_grid_split_it(tmp_path: Path) -> None:
    store, log = tmp_path / "store.jsonl", tmp_path / "evaluated.jsonl"
    env = _toy_env(TOY_LOG=str(log), TOY_SLEEP="1.0")
    procs = [
        subprocess.Popen(
            _sweep_cmd(store, tmp_path / f"out{i}"),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    evaluated = [json.loads(line) for line in log.read_text().splitlines()]
    configs = [json.dumps({k: v for k, v in e.items() if k != "pid"}) for e in evaluated]
    assert len(configs) == 1 + 7 == len(set(configs)), "a grid point was evaluated twice"
    assert {e["pid"] for e in evaluated} == {p.pid for p in procs}, "one process did everything"
    keys = [json.loads(line)["key"] for line in store.read_text().splitlines()]
    assert len(keys) == 8 == len(set(keys))
    for i in range(2):  # both wrote the complete table
        rows = tmp_path / f"out{i}" / "s7-benchmark-tests.test_ablations_ToyBenchmark.csv"
        assert all(r[1] != "" for r in list(csv.reader(io.StringIO(rows.read_text())))[1:])
    assert not list((tmp_path / "store.jsonl.claims").glob("*.claim"))


def test_a_claim_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    from ablations.store import ClaimedElsewhere, Claims

    store = tmp_path / "store.jsonl"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claims = Claims(store)
    plan = resolve("--store", str(store))
    claims.dir.mkdir(parents=True)
    for key in (plan.baseline_key(), plan.key):
        record = {**claims.me, "pid": dead.pid, "time": time.time(), "key": key}
        claims.path(key).write_text(json.dumps(record))
    record = runner.run_plan(plan, ResultStore(store), claims)
    assert record["pct_of_uncompressed"] is not None and ToyBenchmark.evaluations == 2
    assert not list(claims.dir.glob("*"))
    # a live one is respected: this test's own pid, as another process on this host would be
    live = {**claims.me, "pid": os.getppid(), "time": time.time(), "key": "k1"}
    claims.path("k1").write_text(json.dumps(live))
    with pytest.raises(ClaimedElsewhere, match=f"pid {os.getppid()}"):
        claims.acquire("k1")
    # and so is an old one from another host only once it is older than stale_after
    other = {"host": "elsewhere", "pid": 1, "time": time.time(), "key": "k2"}
    claims.path("k2").write_text(json.dumps(other))
    with pytest.raises(ClaimedElsewhere):
        claims.acquire("k2")
    os.utime(claims.path("k2"), (time.time() - 100, time.time() - 100))
    Claims(store, stale_after=50).acquire("k2")


def test_ctrl_c_says_what_is_stored_and_how_to_resume(tmp_path: Path) -> None:
    store = tmp_path / "store.jsonl"
    cmd = _sweep_cmd(store, tmp_path)
    result = _toy_run(cmd, TOY_SIGINT_AFTER="3")
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr
    stored = f"interrupted: 2 of 7 grid points are stored in {store} (with the uncompressed run)"
    assert stored in result.stderr
    assert "resume with" in result.stderr and "ablations/sweep.py s7 --benchmark" in result.stderr
    assert len(ResultStore(store)) == 3
    assert not list((tmp_path / "store.jsonl.claims").glob("*.claim"))  # the claim was released
    done = _toy_run(cmd)
    assert done.returncode == 0, done.stderr
    assert len(ResultStore(store)) == 8


def _run_cmd(store: Path | str, *flags: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "ablations" / "run.py"),
        "--benchmark",
        "tests.test_ablations:ToyBenchmark",
        "--store",
        str(store),
        "--wandb",
        "disabled",
        *flags,
    ]


def _one_line_error(result: subprocess.CompletedProcess[str], prog: str) -> str:
    """The error of a refused command: exit 2, no traceback, one line on stderr."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    return lines[0]


def test_ctrl_c_during_run_py_says_what_is_stored(tmp_path: Path) -> None:
    """Ctrl-C while the run itself is evaluated: the uncompressed row, finished first, stays in
    the store and the message says so; the rerun evaluates only the run."""
    store, log = tmp_path / "store.jsonl", tmp_path / "evaluated.jsonl"
    cmd = _run_cmd(store, "--retention", "0.05")
    result = _toy_run(cmd, TOY_SIGINT_AFTER="1", TOY_LOG=str(log))
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr
    assert (
        f"interrupted: {store} keeps its 1 stored row(s), uncompressed among them; this run "
        "not stored; the same command resumes" in result.stderr
    )
    assert len(ResultStore(store)) == 1 and len(log.read_text().splitlines()) == 1
    done = _toy_run(cmd, TOY_LOG=str(log))
    assert done.returncode == 0, done.stderr
    assert len(ResultStore(store)) == 2  # the uncompressed row and the run (no toy oracle)
    assert len(log.read_text().splitlines()) == 2  # the uncompressed row was not redone


def test_a_directory_as_store_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    for store in (str(folder), str(tmp_path / "new") + "/"):
        result = _toy_run(_run_cmd(store, "--quiet"))
        line = _one_line_error(result, "ablations/run.py")
        assert "is a directory; give a file name, e.g." in line and "ablations.jsonl" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no lock file, nothing
    assert not any(folder.iterdir())
    with pytest.raises(ValueError, match="--store .* is a directory"):
        sweeper.plans_for(tables.get_table("s7").sweep(), ["--benchmark", TOY], str(folder))


def test_a_sweep_yaml_with_a_syntax_error_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nparameters:\n  tau: {values: [0.5, 0.7]\n")
    cmd = [sys.executable, str(ROOT / "ablations" / "sweep.py"), str(bad), "--store"]
    result = _toy_run([*cmd, str(tmp_path / "s.jsonl")])
    line = _one_line_error(result, "ablations/sweep.py")
    assert f"{bad}: not valid YAML at line 4, column 1" in line
    with pytest.raises(ValueError, match="cannot read the sweep file"):
        sweep_files.load_sweep(tmp_path / "missing.yaml")
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tau", "-0.5"], r"--tau must be in \(0, 1\], got -0.5: Eq. 2 admits"),
        (["--tau", "0"], r"--tau must be in \(0, 1\]"),
        (["--retention", "0"], r"retention must be in \(0, 1\]"),
        (["--cluster-ratio", "1.5"], r"cluster_ratio must be in \[0, 1\]"),
        (["--k", "0"], r"k \(DPC-KNN neighbours\) must be >= 1"),
        (["--lam", "-0.1"], r"lam must be in \[0, 1\]"),
        (["--keep-ratio", "0"], r"keep_ratio must be in \(0, 1\]"),
        (["--layer", "4"], r"K must be in \[0, 3\]"),
        (["--paper-layer", "29"], r"paper layer K must be in \[0, 28\]"),
        (["--method", "fastvid", "--anchor-stride", "0"], r"anchor_stride must be an integer >= 1"),
        (["--method", "fastvid", "--salient-ratio", "2"], r"salient_ratio must be in \[0, 1\]"),
        (
            ["--method", "flashvid", "--selection-ratio", "2"],
            r"selection_ratio must be in \[0, 1\]",
        ),
        (["--method", "holitom", "--max-window", "0"], r"max_window must be an integer >= 1"),
        (["--method", "sttm", "--spatial-tau", "1.5"], r"spatial_tau must be in \[-1, 1\]"),
        (["--method", "visionzip", "--contextual-ratio", "-1"], r"contextual_ratio must be in"),
    ],
)
def test_every_numeric_flag_is_range_checked_before_any_model(
    flags: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        resolve(*flags)
    assert ToyBenchmark.loads == 0 and ToyBenchmark.evaluations == 0
    resolve("--tau", "1")  # the top of the range turns the filter off, and is allowed


def test_layer_help_states_the_k_the_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        runner.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    lab_k = runner.resolve([]).config.layer  # what `python ablations/run.py` runs
    assert (
        f"--layer LAYER (default on --benchmark lab: {lab_k}, its mapping of the paper's 18)"
        in (help_text)
    )
    with pytest.raises(SystemExit):
        runner.main(["--benchmark", TOY, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--layer LAYER (default on --benchmark" in help_text and ": 3, its mapping" in help_text


# --------------------------------------------------------------------------------------------
# Baselines run as their papers describe
# --------------------------------------------------------------------------------------------

PUBLISHED_IN_LLM = {
    "visionzip": {"merger": "none"},
    "fastvid": {"merger": "none"},
    "flashvid": {"merger": "none"},
    "sttm": {"merger": "none"},
    "uniform": {"merger": "none"},
    "holitom": {"merger": "last-token", "keep_ratio": 0.5},
}


def test_every_baseline_method_declares_its_in_llm_stage() -> None:
    from ustc.registry import METHODS, method_in_llm

    for name in METHODS.names():
        if name == "ustc":
            assert method_in_llm(name) == {}  # the config's default: the paper's merger
        else:
            assert method_in_llm(name) == PUBLISHED_IN_LLM[name], name


@pytest.mark.parametrize("method", sorted(PUBLISHED_IN_LLM))
def test_a_baseline_runs_without_our_merger_unless_asked(method: str) -> None:
    config = resolve("--method", method).config
    for name, value in PUBLISHED_IN_LLM[method].items():
        assert getattr(config, name) == value
    assert resolve("--method", method, "--merger", "text-aware").config.merger == "text-aware"
    assert resolve("--method", method, "--merger", "none").config.merger == "none"
    assert resolve().config.merger == "text-aware"  # ustc's own method keeps its merger


def test_the_header_line_says_what_ran(capsys: pytest.CaptureFixture[str]) -> None:
    runner.main(["--benchmark", TOY, "--method", "visionzip", "--no-store", "--wandb", "disabled"])
    header = capsys.readouterr().out.splitlines()[0]
    assert "method=visionzip merger=none [visionzip's published in-LLM stage" in header
    assert "scorer=" not in header  # visionzip has no scorer, pool or recycler
    runner.main(
        ["--benchmark", TOY, "--method", "visionzip", "--merger", "text-aware", "--no-store"]
    )
    header = capsys.readouterr().out.splitlines()[0]
    assert "merger=text-aware(K=3, R=0.5, lambda=0.5) [in-LLM stage as given" in header
    runner.main(["--benchmark", TOY, "--no-store"])
    header = capsys.readouterr().out.splitlines()[0]
    assert "method=ustc scorer=attn+sim" in header and "merger=text-aware" in header


def test_presets_baseline_is_the_published_configuration() -> None:
    from ustc.presets import baseline

    assert baseline("visionzip").merger == "none"
    assert (
        baseline("holitom", 0.05).keep_ratio == 0.5 and baseline("holitom").merger == "last-token"
    )
    assert baseline("visionzip", merger="text-aware").merger == "text-aware"


def test_the_main_job_prints_the_uncompressed_row_and_the_papers_figure_above_the_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    record = runner.main(["--benchmark", TOY, "--no-store", "--wandb", "disabled"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == [
        "",
        "uncompressed",
        "paper, LLaVA-OV-7B (Table 1, Ours at 2 %/1 %)",
        "this run",
    ]
    uncompressed = [c.strip() for c in rows[1].split("|")[1:-1]]
    assert uncompressed[3:5] == [f"{record['baseline']['avg']:.1f}", "100.0"]
    assert uncompressed[6] == "392/392"
    assert [c.strip() for c in rows[2].split("|")[1:-1]][3:5] == ["50.7", "90.1"]
    assert f"| {record['avg']:.1f} | {record['pct_of_uncompressed']:.1f} |" in rows[3]


def test_the_papers_figure_is_found_only_for_a_setting_it_prints() -> None:
    from ablations.paper_tables import paper_figure

    assert paper_figure(CompressionConfig(retention=0.02, merger="none")) == (
        "Table 1, Ours (w/o M) at 2 %",
        paper_tables.TABLES["table5"].paper["attn+sim+cluster"],
    )
    label, row = paper_figure(CompressionConfig(retention=0.02, merger="none", cluster_ratio=0.6))
    assert label == "Table S7, cluster-ratio = 0.6" and row[-1] == 88.7
    assert paper_figure(TABLE5_ROWS[(False, True, False)])[1][-2:] == (49.2, 87.5)
    assert paper_figure(CompressionConfig(retention=0.05, merger="none")) is None
    assert paper_figure(CompressionConfig(retention=0.02, merger="none", k=7)) is None
    assert paper_figure(CompressionConfig(retention=0.02, method="visionzip")) is None


def test_the_main_job_on_the_lab_prints_the_oracle_and_stores_it_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lab knows its evidence: the main job prints the oracle at the run's retention, between
    the paper's figure and the run, and a second run reads it from the store."""
    from ustc.evaluation import LabBenchmark

    argv = ["--limit", "5", "--store", str(tmp_path / "store.jsonl"), "--wandb", "disabled"]
    record = runner.main(argv)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    labels = [r.split("|")[1].strip() for r in rows]
    assert labels[-2:] == ["oracle (keeps the evidence)", "this run"]
    cells = [c.strip() for c in rows[-2].split("|")[1:-1]]
    oracle = record["oracle"]
    assert cells[-5:-3] == [
        f"{oracle['avg']:.1f}",
        f"{100 * oracle['avg'] / record['baseline']['avg']:.1f}",
    ]
    assert cells[-2] == f"{record['flops']['llm_visual_tokens']}/{record['flops']['visual_tokens']}"

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the stored oracle should have been used")

    monkeypatch.setattr(LabBenchmark, "oracle", fail)
    again = runner.main(argv)
    assert again["oracle"]["key"] == oracle["key"] and again["oracle"]["avg"] == oracle["avg"]
    with pytest.raises(AssertionError, match="stored oracle"):  # another budget: evaluated
        runner.main([*argv, "--retention", "0.1"])


def test_the_lab_benchmark_is_identified_by_its_weights(tmp_path: Path) -> None:
    """Retrained weights in the same folder are another benchmark in the results store."""
    import shutil

    from ustc.evaluation import LabBenchmark
    from ustc.lab.model import weights_path

    folder = tmp_path / "weights"
    shutil.copytree(weights_path(), folder)
    before = LabBenchmark(model=str(folder)).spec()
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    after = LabBenchmark(model=str(folder)).spec()
    assert before["weights"] != after["weights"]
    assert {k: v for k, v in before.items() if k != "weights"} == {
        k: v for k, v in after.items() if k != "weights"
    }


# --------------------------------------------------------------------------------------------
# Progress bars
# --------------------------------------------------------------------------------------------


def test_progress_bars_name_the_table_row_and_benchmark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On the lab benchmark (2 questions): every bar says what it evaluates, where it used to
    say "lab eval" for all of them."""
    store = str(tmp_path / "store.jsonl")
    runner.main(["--limit", "2", "--store", store, "--wandb", "disabled"])
    err = capsys.readouterr().err
    where = "lab test (first 2)"
    for label in ("uncompressed", "oracle r=0.02", "r=0.02 attn+sim/greedy/dpc text-aware"):
        assert f"{label} · {where}:" in err, err[-2000:]
    # two rows of Table 5 in a fresh store (so that its uncompressed row is run too)
    sweep = tmp_path / "table5.yaml"
    rows = tables.TABLES["table5"].sweep()
    rows["parameters"]["modules"]["values"] = ["attn", "attn+sim+cluster"]
    sweep.write_text(yaml.safe_dump(rows))
    sweeper.run_sweep(
        str(sweep),
        ["--limit=2"],
        store_path=str(tmp_path / "sweep.jsonl"),
        out_dir=str(tmp_path),
        wandb="disabled",
    )
    err = capsys.readouterr().err
    assert "ustc-table5:" in err  # the sweep's own bar
    for row in ("uncompressed", "modules=attn", "modules=attn+sim+cluster"):
        assert f"ustc-table5 {row} · {where}:" in err, err[-2000:]
    assert "lab eval" not in err
