"""Evaluation tasks behind one interface: the built-in laboratory benchmark and the paper's five
through lmms-eval.  (Speed measurements live in the top-level ``benchmarks/`` scripts; this module
is about accuracy.)

A benchmark is a class registered in :data:`BENCHMARKS` whose typed constructor parameters become
flags of ``ablations/run.py`` (``--limit``, ``--split``, ``--model``, ...), exactly like the
strategies of :mod:`ustc.registry`.  It answers three questions, in this order:

1. :meth:`Benchmark.check`: is everything it needs present (the package, the data)?  It must not
   load a model, so that a missing dataset fails in a second, not after a 15 GB download.
2. :meth:`Benchmark.default_config`: the configuration a run starts from (the lab's micro model
   has fewer LLM layers than LLaVA-OV-7B, so its K differs).
3. :meth:`Benchmark.evaluate`: scores of one :class:`CompressionConfig`, as a
   :class:`BenchmarkResult` whose ``scores`` are the columns of the paper's tables.

Registered benchmarks:

``lab``       the laboratory benchmark of :mod:`ustc.lab` (CPU, about a minute, the default).
``lmms-eval`` MVBench, EgoSchema, MLVU, LongVideoBench and VideoMME through upstream lmms-eval
              with the ``llava_onevision_ustc`` model of :mod:`ustc.lmms_eval`.
``mvbench``, ``egoschema``, ``mlvu``, ``longvideobench``, ``videomme``: one of those five.

A new benchmark is a subclass registered with ``@BENCHMARKS.register("name")`` (or an entry
point in the group ``ustc.benchmark``); ``ablations/run.py --benchmark package.module:Class``
also loads one by import path without registering it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ustc.config import CompressionConfig, round_half_up
from ustc.registry import Registry

#: T of the paper's LLM (Qwen2-7B in LLaVA-OneVision-7B): the depth the paper's K refers to.
PAPER_LLM_LAYERS = 28


def normalized(method: float, random: float, oracle: float) -> float | None:
    """(method - random) / (oracle - random): where a score lies between keeping random tokens
    (0) and keeping the evidence (1), at the same budget and on the same questions.

    Not clipped: below 0 is worse than random tokens, above 1 better than the oracle.  None when
    oracle <= random: the benchmark does not separate the two at that budget, so no method's
    place between them is defined (a table prints it as a dash).  Scores in any one unit (%).
    """
    values = {"method": method, "random": random, "oracle": oracle}
    for name, value in values.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ValueError(f"normalized: {name} must be a finite number, got {value!r}")
    if oracle <= random:
        return None
    return (method - random) / (oracle - random)


@dataclass
class BenchmarkResult:
    """Scores of one configuration on one benchmark.

    scores:  column name -> score in % (the columns of the paper's tables, or the lab's families).
    n:       questions evaluated.
    tokens:  token counts actually observed, e.g. ``visual_in`` (F*P before compression),
             ``llm_visual`` (entering the LLM), ``after_merge`` (from layer K on); mean per video.
    timings: seconds, e.g. ``total``, ``compress``, ``prefill``.
    details: anything else worth keeping (overall accuracy, per-task raw metrics).
    """

    scores: dict[str, float]
    n: int = 0
    tokens: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def average(self) -> float:
        """Avg. Score: the unweighted mean of the columns, as in the paper's tables."""
        if not self.scores:
            raise ValueError("a benchmark result needs at least one score to average")
        return sum(self.scores.values()) / len(self.scores)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scores": dict(self.scores),
            "n": self.n,
            "tokens": dict(self.tokens),
            "timings": dict(self.timings),
            "details": dict(self.details),
        }


class Benchmark(ABC):
    """One evaluation suite.  Subclasses keep every constructor parameter as an attribute of the
    same name: :meth:`spec` reads them back to identify a run (the results store keys on it)."""

    #: set by ``BENCHMARKS.register``; the name in tables and in the store
    registered_name: str = "benchmark"
    #: constructor parameters that do not change a score (where it runs, how fast)
    not_in_spec: tuple[str, ...] = ()

    @property
    @abstractmethod
    def columns(self) -> tuple[str, ...]:
        """The score columns :meth:`evaluate` returns, in table order."""

    def check(self) -> None:
        """Raise ``ValueError`` saying what is missing and how to get it.  Loads no model."""
        return None

    def default_config(self) -> CompressionConfig:
        """Where a run's configuration starts before flags change it: the paper's method."""
        return CompressionConfig()

    def llm_layers(self) -> int | None:
        """T, decoder layers of the evaluated LLM (maps the paper's K), if known without loading."""
        return None

    def flops_spec(self) -> Any:
        """The :class:`ustc.flops.ModelSpec` of the evaluated model, or None if unknown."""
        return None

    @abstractmethod
    def evaluate(
        self, config: CompressionConfig, *, progress: bool | str = True
    ) -> BenchmarkResult:
        """Score ``config``.  May load (and cache) the model on first use.

        progress: False for no progress bar; True for one; a string is what the caller runs
        (``table5 modules=attn``): a benchmark that draws a bar labels it with that and its
        own name."""

    def oracle(self, retention: float, *, progress: bool | str = True) -> BenchmarkResult | None:
        """Scores of a selection that keeps the tokens each question's evidence is in, within
        the budget of ``retention``: whether that budget can hold the evidence at all.  Only a
        benchmark that knows where its evidence is (the lab's generator does) can say; None
        elsewhere."""
        return None

    def spec(self) -> dict[str, Any]:
        """Name and constructor values: what identifies this benchmark in the results store."""
        values = {
            p: getattr(self, p) for p in constructor_params(type(self)) if p not in self.not_in_spec
        }
        return {"name": self.registered_name, **values}


def constructor_params(cls: type) -> list[str]:
    """Names of the constructor parameters of ``cls`` (a benchmark keeps each as an attribute)."""
    import inspect

    return [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def load_benchmark_class(name: str) -> type[Benchmark]:
    """A registered name, or ``package.module:Class`` for a benchmark outside the registry."""
    if ":" not in name:
        return BENCHMARKS.get(name)
    module_name, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"cannot load benchmark {name!r} ({exc}); expected a registered "
            f"name ({', '.join(BENCHMARKS.names())}) or package.module:Class"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Benchmark)):
        raise ValueError(f"{name!r} is not a subclass of ustc.evaluation.Benchmark")
    if "registered_name" not in cls.__dict__:
        cls.registered_name = attr
    return cls


def map_paper_layer(paper_layer: int, llm_layers: int) -> int:
    """K on an LLM of T layers at the same relative depth as the paper's K on its 28-layer LLM.

        K_T = round(K * T / 28), clipped to [0, T - 1]

    The lab's micro LLM has a handful of layers, so several paper K can map to the same layer;
    the table shows the mapped K beside the paper's.
    """
    if isinstance(paper_layer, bool) or not isinstance(paper_layer, int) or paper_layer < 0:
        raise ValueError(f"paper layer K must be an integer >= 0, got {paper_layer!r}")
    if paper_layer > PAPER_LLM_LAYERS:
        raise ValueError(
            f"paper layer K must be in [0, {PAPER_LLM_LAYERS}] (the paper's LLM has "
            f"{PAPER_LLM_LAYERS} layers), got {paper_layer}"
        )
    if llm_layers < 1:
        raise ValueError(f"the LLM needs at least one layer, got {llm_layers}")
    # round half up, not Python's banker's rounding: K = 14 on 4 layers is 2, K = 7 is 1
    mapped = round_half_up(paper_layer * llm_layers / PAPER_LLM_LAYERS)
    return min(max(mapped, 0), llm_layers - 1)


# --------------------------------------------------------------------------------------------
# The laboratory benchmark
# --------------------------------------------------------------------------------------------


@BENCHMARKS.register("lab")
class LabBenchmark(Benchmark):
    """The built-in laboratory benchmark of :mod:`ustc.lab`: a shipped micro LLaVA-OneVision on
    self-generated videos, CPU-sized.  Columns are its question families; Avg. is their mean.

    split: ``test`` (600 questions), ``val`` (300) or ``train`` (needs ``limit``).
    limit: evaluate only the first ``limit`` questions (a reduced benchmark for quick runs).
    model: folder of lab weights (``config.json`` + ``model.safetensors``); None for the shipped.
    """

    def __init__(
        self, split: str = "test", limit: int | None = None, model: str | None = None
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive number of questions, got {limit}")
        self.split = split
        self.limit = limit
        self.model = model
        self._model: Any = None
        self._data: Any = None

    @staticmethod
    def _import(name: str = "ustc.lab") -> Any:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(
                f"the laboratory benchmark needs {name}, which cannot be imported ({exc}); "
                "reinstall ustc (pip install -e .)"
            ) from None

    def _folder(self) -> Path:
        if self.model is not None:
            return Path(self.model)
        return Path(self._import("ustc.lab.model").weights_path())

    def check(self) -> None:
        scenes = self._import("ustc.lab.scenes")
        size = scenes.split_size(self.split)  # raises ValueError naming the known splits
        if size is None and self.limit is None:
            raise ValueError(f"the lab's {self.split!r} split is an unbounded stream: give --limit")
        folder = self._folder()
        missing = [f for f in ("config.json", "model.safetensors") if not (folder / f).is_file()]
        if missing:
            raise ValueError(
                f"no lab weights in {folder} (missing {', '.join(missing)}); train them with "
                "`python -m ustc.lab.train --out ustc/lab/weights` or pass --model FOLDER"
            )

    def default_config(self) -> CompressionConfig:
        return self._import("ustc.lab.model").default_config()

    def _config_json(self) -> dict[str, Any]:
        import json

        path = self._folder() / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def llm_layers(self) -> int | None:
        text = self._config_json().get("text_config") or {}
        layers = text.get("num_hidden_layers")
        return int(layers) if layers else int(self._import("ustc.lab.model").LLM_LAYERS)

    def flops_spec(self) -> Any:
        from ustc.flops import ModelSpec

        values = self._config_json()
        if not values:
            return None
        shape = self._import("ustc.lab.model").LabShape()
        vision = values.get("vision_config") or {}
        side = -(
            -int(vision.get("image_size", shape.size)) // int(vision.get("patch_size", shape.patch))
        )
        frames = int((values.get("lab") or {}).get("frames", shape.frames))
        # LLaVA-OV's 2x bilinear pooling halves each side (rounding up)
        return ModelSpec.from_config(
            values, name="lab", frames=frames, tokens_per_frame=(-(-side // 2)) ** 2
        )

    def _load(self) -> Any:
        if self._model is None:
            self._model = self._import("ustc.lab.model").load_model(self.model)
        return self._model

    def _samples(self) -> Any:
        """The rendered questions, once per process (rendering 600 videos takes 20-40 s; a
        sweep evaluates the same videos for every grid point)."""
        if self._data is None:
            lab_evaluate = self._import("ustc.lab.evaluate")
            self._data = lab_evaluate.samples(self.split, self.limit)
        return self._data

    def _bar(self, progress: bool | str) -> bool | str:
        """The lab's progress bar label: the caller's row, then this benchmark and split."""
        if not progress:
            return False
        name = f"lab {self.split}" + (f" (first {self.limit})" if self.limit else "")
        return f"{progress} · {name}" if isinstance(progress, str) else name

    def evaluate(
        self, config: CompressionConfig, *, progress: bool | str = True
    ) -> BenchmarkResult:
        from ustc.lab.evaluate import evaluate as lab_evaluate

        out = lab_evaluate(
            None if config.is_identity else config,
            progress=self._bar(progress),
            model=self._load(),
            data=self._samples(),
        )
        return _lab_result(out)

    def oracle(self, retention: float, *, progress: bool | str = True) -> BenchmarkResult:
        from ustc.lab.evaluate import evaluate as lab_evaluate
        from ustc.lab.evaluate import oracle_selector

        out = lab_evaluate(
            None,
            progress=self._bar(progress),
            model=self._load(),
            data=self._samples(),
            selector=oracle_selector(retention),
        )
        return _lab_result(out)

    def spec(self) -> dict[str, Any]:
        """Split, limit, folder and a digest of the weights: retrained weights in the same folder
        are another benchmark, so the results store never serves the old model's scores."""
        path = self._folder() / "model.safetensors"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
        return {**super().spec(), "weights": digest}

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self._import("ustc.lab.scenes").FAMILIES)


def _lab_result(out: Any) -> BenchmarkResult:
    """A :class:`ustc.lab.EvalResult` as the benchmark's result."""
    return BenchmarkResult(
        scores={k: float(v) for k, v in out.per_family.items()},
        n=int(out.n),
        tokens=_numbers(out.tokens),
        timings=_numbers(out.timings),
        # the letter chosen for every question: what a reproducibility check compares
        details={
            "overall": float(out.overall),
            "answers": "".join("ABCD"[a] for a in out.answers),
        },
    )


def _numbers(values: Any) -> dict[str, float]:
    """The numeric entries of a dict or dataclass-like object (token counts, timings)."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        values = {k: v for k, v in vars(values).items() if not k.startswith("_")}
    return {
        str(k): float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


# --------------------------------------------------------------------------------------------
# The paper's benchmarks through lmms-eval
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LmmsTask:
    """One of the paper's benchmarks in lmms-eval: task name, metric, HF dataset."""

    column: str
    task: str
    metric: str
    dataset: str


#: The five benchmarks of the paper's tables, in column order.
PAPER_TASKS: dict[str, LmmsTask] = {
    "mvbench": LmmsTask("MVBench", "mvbench", "mvbench_accuracy", "OpenGVLab/MVBench"),
    "egoschema": LmmsTask("EgoSchema", "egoschema", "submission", "lmms-lab/egoschema"),
    "mlvu": LmmsTask("MLVU", "mlvu_dev", "mlvu_percetion_score", "sy1998/MLVU_dev"),
    "longvideobench": LmmsTask(
        "LongVideoBench", "longvideobench_val_v", "lvb_acc", "longvideobench/LongVideoBench"
    ),
    "videomme": LmmsTask("VideoMME", "videomme", "videomme_perception_score", "lmms-lab/Video-MME"),
}


#: substrings of a checkpoint name -> built-in FLOPs spec of ``ustc.flops.MODEL_SPECS``
_CHECKPOINT_SPECS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("onevision", "0.5b"), "llava-onevision-0.5b"),
    (("onevision", "7b"), "llava-onevision-7b"),
    (("llava-video", "7b"), "llava-video-7b"),
    (("qwen2.5-vl", "7b"), "qwen2.5-vl-7b"),
    (("qwen2-vl", "7b"), "qwen2-vl-7b"),
    (("llava-next-video", "7b"), "llava-next-video-7b"),
    (("internvl3-5", "8b"), "internvl3.5-8b"),
    (("internvl3.5", "8b"), "internvl3.5-8b"),
)


def _hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "huggingface"
    )
    return Path(home) / "hub"


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


@BENCHMARKS.register("lmms-eval")
class LmmsEvalBenchmark(Benchmark):
    """The paper's benchmarks through upstream lmms-eval, one ``simple_evaluate`` call for all.

    tasks:      comma-separated keys of :data:`PAPER_TASKS` (all five by default).
    model:      the transformers checkpoint (lmms-eval's ``pretrained``); default
                ``llava-hf/llava-onevision-qwen2-7b-ov-hf``.
    limit:      questions per task (lmms-eval's ``--limit``), None for all.
    frames:     frames sampled per video (the paper: 32).
    batch_size: lmms-eval batch size.
    device:     torch device for the model.
    lmms_model: the lmms-eval model name (the plugin's ``llava_onevision_ustc``).
    """

    not_in_spec = ("batch_size", "device")

    def __init__(
        self,
        tasks: str = ",".join(PAPER_TASKS),
        model: str | None = None,
        limit: int | None = None,
        frames: int = 32,
        batch_size: int = 1,
        device: str = "cuda",
        lmms_model: str = "llava_onevision_ustc",
    ) -> None:
        keys = [t.strip() for t in tasks.split(",") if t.strip()]
        unknown = [t for t in keys if t not in PAPER_TASKS]
        if not keys or unknown:
            raise ValueError(
                f"unknown lmms-eval task(s) {unknown or tasks!r}; known: {', '.join(PAPER_TASKS)}"
            )
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive number of questions, got {limit}")
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.tasks = ",".join(keys)
        self.model = model or "llava-hf/llava-onevision-qwen2-7b-ov-hf"
        self.limit = limit
        self.frames = frames
        self.batch_size = batch_size
        self.device = device
        self.lmms_model = lmms_model

    @property
    def task_keys(self) -> list[str]:
        return self.tasks.split(",")

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(PAPER_TASKS[t].column for t in self.task_keys)

    def check(self) -> None:
        if importlib.util.find_spec("lmms_eval") is None:
            raise ValueError(
                "the lmms-eval benchmarks need lmms-eval: pip install 'ustc[lmms-eval]' "
                "(see docs/ablations.md for an install that keeps your torch)"
            )
        if _offline():
            cache = _hf_hub_cache()
            missing = [
                f"{t} ({PAPER_TASKS[t].dataset})"
                for t in self.task_keys
                if not (cache / f"datasets--{PAPER_TASKS[t].dataset.replace('/', '--')}").is_dir()
            ]
            if missing:
                raise ValueError(
                    f"benchmark data not in the Hugging Face cache {cache} and the hub is offline "
                    f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): {', '.join(missing)}; download them "
                    "once with network access, or point HF_HOME at a cache that has them"
                )

    def default_config(self) -> CompressionConfig:
        return CompressionConfig()

    def llm_layers(self) -> int | None:
        spec = self.flops_spec()
        return None if spec is None else spec.num_layers

    def flops_spec(self) -> Any:
        from ustc.flops import MODEL_SPECS, ModelSpec

        name = self.model.lower().replace("_", "-")
        for parts, key in _CHECKPOINT_SPECS:
            if all(part in name for part in parts):
                return MODEL_SPECS[key].with_video(frames=self.frames)
        path = Path(self.model)
        if (path / "config.json").is_file():
            return ModelSpec.from_config(path, frames=self.frames)
        return None

    def model_args(self, config: CompressionConfig) -> str:
        """``--model_args`` for lmms-eval: checkpoint, sampling and every config value."""
        from ustc.lmms_eval import config_to_model_args

        return (
            f"pretrained={self.model},max_frames_num={self.frames},device={self.device},"
            + config_to_model_args(config)
        )

    def evaluate(
        self, config: CompressionConfig, *, progress: bool | str = True
    ) -> BenchmarkResult:
        self.check()
        from lmms_eval.evaluator import simple_evaluate

        start = time.perf_counter()
        out = simple_evaluate(
            model=self.lmms_model,
            model_args=self.model_args(config),
            tasks=[PAPER_TASKS[t].task for t in self.task_keys],
            batch_size=self.batch_size,
            limit=self.limit,
            device=self.device,
        )
        total = time.perf_counter() - start
        results = (out or {}).get("results", {})
        scores = parse_lmms_results(results, self.task_keys)
        return BenchmarkResult(
            scores=scores,
            n=sum(
                int(v) for v in ((out or {}).get("n-samples") or {}).values() if isinstance(v, int)
            ),
            timings={"total": total},
            details={"lmms_eval_results": _jsonable(results)},
        )


def parse_lmms_results(results: dict[str, Any], task_keys: Sequence[str]) -> dict[str, float]:
    """Pick each paper task's metric from lmms-eval's ``results`` dict, as a percentage.

    lmms-eval keys metrics ``"<metric>,<filter>"`` (e.g. ``"mvbench_accuracy,none"``); some
    tasks report fractions in [0, 1], others percentages: fractions are scaled to %.
    """
    scores: dict[str, float] = {}
    for key in task_keys:
        task = PAPER_TASKS[key]
        block = results.get(task.task)
        if block is None:
            raise ValueError(
                f"lmms-eval returned no results for task {task.task!r}; "
                f"it returned {sorted(results)}"
            )
        value = next(
            (
                v
                for k, v in block.items()
                if k.split(",")[0] == task.metric and isinstance(v, (int, float))
            ),
            None,
        )
        if value is None:
            raise ValueError(
                f"lmms-eval task {task.task!r} has no numeric metric {task.metric!r} "
                f"(EgoSchema's full set is scored by its submission server: use a key with "
                f"answers, or fill the column from the server's score); got {sorted(block)}"
            )
        scores[task.column] = float(value) * (100.0 if value <= 1.0 else 1.0)
    return scores


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def _single_task(key: str) -> type[LmmsEvalBenchmark]:
    task = PAPER_TASKS[key]

    class Single(LmmsEvalBenchmark):
        __doc__ = f"{task.column} alone through lmms-eval (task ``{task.task}``)."

        def __init__(
            self,
            model: str | None = None,
            limit: int | None = None,
            frames: int = 32,
            batch_size: int = 1,
            device: str = "cuda",
            lmms_model: str = "llava_onevision_ustc",
        ) -> None:
            super().__init__(key, model, limit, frames, batch_size, device, lmms_model)

    Single.__name__ = Single.__qualname__ = f"{task.column}Benchmark"
    return BENCHMARKS.register(key)(Single)


for _key in PAPER_TASKS:
    _single_task(_key)


def build_benchmarks(names: str | Sequence[str], values: dict[str, Any]) -> list[Benchmark]:
    """Build each benchmark in ``names`` (comma-separated or a list) with the subset of
    ``values`` its constructor takes."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no benchmark given; known: {', '.join(BENCHMARKS.names())}")
    benches = []
    for name in names:
        cls = load_benchmark_class(name)
        accepted = set(constructor_params(cls))
        bench = cls(**{k: v for k, v in values.items() if k in accepted})
        benches.append(bench)
    return benches
