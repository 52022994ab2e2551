"""One ablation run: ``python ablations/run.py --scorer attn+sim --recycler dpc``.

Every field of :class:`~ustc.config.CompressionConfig`, every constructor parameter of every
registered strategy (:data:`ustc.registry.REGISTRIES`) and of every benchmark
(:data:`ustc.evaluation.BENCHMARKS`) is a flag, generated from the registries: a strategy
registered with a new parameter ``alpha`` gets ``--alpha`` without a CLI edit.  Names map to flags
with dashes (``cluster_ratio`` -> ``--cluster-ratio``; ``--cluster_ratio`` works too) and
``--name=value`` works as W&B sweeps pass it.

Order of work, so that a mistake costs a second and not a model load:
  flags -> CompressionConfig (unknown names, impossible values) -> benchmark.check() (missing
  package or data) -> the uncompressed baseline (once, from the store) -> the run -> store,
  W&B, table, ``--output`` JSON.

Options that are not configuration:
  --benchmark NAMES   comma-separated registered names or package.module:Class (default: lab)
  --paper-layer K     the paper's K, mapped to the model's depth (see ustc.evaluation)
  --modules ROW       a Table 5 row: attn, sim, cluster, attn+sim, attn+cluster, sim+cluster,
                      attn+sim+cluster (sets scorer, recycler, cluster_ratio)
  --store PATH        JSONL results store (default results/ablations.jsonl); --no-store
  --force             rerun even when the store has this run
  --no-baseline       skip the uncompressed run (no "% of uncompressed")
  --output PATH       write the run's record as JSON
  --wandb MODE        auto (default), online, offline, disabled
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import tempfile
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablations.store import Claims, ResultStore, run_key  # noqa: E402
from ablations.wandb_log import MODES, log_run, preflight  # noqa: E402
from ustc import strategies  # noqa: E402, F401  (registers the built-in strategies)
from ustc.config import CompressionConfig  # noqa: E402
from ustc.evaluation import (  # noqa: E402
    BENCHMARKS,
    Benchmark,
    BenchmarkResult,
    build_benchmarks,
    constructor_params,
    load_benchmark_class,
    map_paper_layer,
)
from ustc.presets import TABLE5_ROWS  # noqa: E402
from ustc.registry import IN_LLM_FIELDS, METHODS, REGISTRIES, Param, method_in_llm  # noqa: E402

DEFAULT_STORE = "results/ablations.jsonl"

#: the uncompressed model every "% of uncompressed" refers to
VANILLA = CompressionConfig(retention=1.0, merger="none")

#: Table 5's (Attn, Sim, Cluster) marks by row name
MODULE_ROWS: dict[str, tuple[bool, bool, bool]] = {
    "attn": (True, False, False),
    "sim": (False, True, False),
    "cluster": (False, False, True),
    "attn+sim": (True, True, False),
    "attn+cluster": (True, False, True),
    "sim+cluster": (False, True, True),
    "attn+sim+cluster": (True, True, True),
}
#: the config fields a Table 5 row decides
MODULE_FIELDS = ("scorer", "recycler", "cluster_ratio")

#: flags whose useful range is narrower than what the library accepts: (range, why)
FLAG_RANGES: dict[str, tuple[str, str]] = {
    "tau": (
        "(0, 1]",
        "Eq. 2 admits a token while its largest cosine similarity to the pool is below tau; "
        "at tau <= 0 almost no token is admitted and the recycler fills the budget (tau 1 turns "
        "the redundancy filter off)",
    ),
}

CONFIG_FIELDS: dict[str, Any] = {
    f.name: f.type for f in fields(CompressionConfig) if f.name != "params"
}


# --------------------------------------------------------------------------------------------
# Flags generated from the registries
# --------------------------------------------------------------------------------------------


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_int(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    # sweeps may pass 18.0 for 18; 18.5 is an error, not a silent truncation
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(value)


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _resolve_annotation(annotation: Any) -> Any:
    if isinstance(annotation, str):
        return {"int": int, "float": float, "str": str, "bool": bool}.get(
            annotation.replace(" | None", "").strip(), str
        )
    return annotation


def converter(annotation: Any) -> tuple[Any, bool]:
    """(text -> value, optional) for a parameter annotation; ``X | None`` accepts ``none``."""
    annotation = _resolve_annotation(annotation)
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else str
    base = {bool: _parse_bool, int: _parse_int, float: _parse_float}.get(annotation, str)
    if not optional:
        return base, False

    def parse_optional(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else base(text)

    parse_optional.__name__ = getattr(base, "__name__", "value")
    return parse_optional, True


def strategy_params() -> dict[str, Param]:
    """Constructor parameters of every registered strategy that are not config fields."""
    out: dict[str, Param] = {}
    for registry in REGISTRIES.values():
        for name in registry.names():
            for param in registry.params(name):
                if param.name not in CONFIG_FIELDS:
                    out.setdefault(param.name, param)
    return out


def benchmark_params(extra: Sequence[type[Benchmark]] = ()) -> dict[str, Param]:
    """Constructor parameters of every registered benchmark and of the ``extra`` classes."""
    out: dict[str, Param] = {}
    for name in BENCHMARKS.names():
        for param in BENCHMARKS.params(name):
            out.setdefault(param.name, param)
    for cls in extra:
        hints = typing.get_type_hints(cls.__init__)
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                out.setdefault(p.name, Param(p.name, hints.get(p.name, p.annotation), p.default))
    return out


def _named_benchmarks(argv: Sequence[str] | None) -> list[type[Benchmark]]:
    """Benchmark classes given by import path (``--benchmark pkg.mod:Class``): their
    constructor parameters become flags too."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--benchmark", default="lab")
    known, _ = pre.parse_known_args(argv)
    names = [n.strip() for n in known.benchmark.split(",") if ":" in n]
    out = []
    for name in names:
        try:
            out.append(load_benchmark_class(name))
        except ValueError:
            pass  # reported with context by resolve_args
    return out


def _owners(registry_kind: str) -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    registry = REGISTRIES[registry_kind]
    for name in registry.names():
        for param in registry.params(name):
            owners.setdefault(param.name, []).append(name)
    return owners


def _option_strings(name: str) -> list[str]:
    dashed = "--" + name.replace("_", "-")
    return [dashed] if "_" not in name else [dashed, "--" + name]


class OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage of 40 flags would bury it)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def _benchmark_default(argv: Sequence[str] | None) -> tuple[str, CompressionConfig | None]:
    """The first benchmark ``argv`` names and its default config (None when it cannot be
    built without arguments): what a run starts from, for the flags' help."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--benchmark", default="lab")
    known, _ = pre.parse_known_args(argv)
    name = (known.benchmark.split(",")[0] or "lab").strip()
    try:
        return name, load_benchmark_class(name)().default_config()
    except Exception:  # a benchmark that needs arguments or data: the help says less
        return name, None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The CLI; ``argv`` only serves to find benchmarks given by import path and the
    benchmark whose defaults the help states."""
    extra_benchmarks = _named_benchmarks(argv)
    bench_name, bench_defaults = _benchmark_default(argv)
    parser = OneLineErrors(
        prog="ablations/run.py",
        description="Run one configuration of the compression on a benchmark and record it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags are generated from ustc.registry.REGISTRIES and ustc.evaluation.BENCHMARKS.",
    )
    defaults = CompressionConfig()
    config_group = parser.add_argument_group("compression (CompressionConfig fields)")
    for name, annotation in CONFIG_FIELDS.items():
        if name in REGISTRIES:
            known = ", ".join(REGISTRIES[name].names())
            config_group.add_argument(
                *_option_strings(name),
                dest=name,
                default=None,
                metavar="NAME",
                help=f"{name}: {known} (default {getattr(defaults, name)})",
            )
            continue
        parse, _ = converter(annotation)
        owners = [f"{kind} {n}" for kind in REGISTRIES for n in _owners(kind).get(name, [])]
        paper = getattr(defaults, name)
        runs = paper if bench_defaults is None else getattr(bench_defaults, name)
        default = (
            f"default {paper}"
            if runs == paper
            else f"default on --benchmark {bench_name}: {runs}, its mapping of the paper's {paper}"
        )
        if name in FLAG_RANGES:
            default += f"; in {FLAG_RANGES[name][0]}"
        config_group.add_argument(
            *_option_strings(name),
            dest=name,
            type=parse,
            default=None,
            help=f"({default})" + (f"; used by {', '.join(owners)}" if owners else ""),
        )
    strategy_group = parser.add_argument_group("strategy parameters (CompressionConfig.params)")
    for name, param in strategy_params().items():
        parse, _ = converter(param.annotation)
        owners = [f"{kind} {n}" for kind in REGISTRIES for n in _owners(kind).get(name, [])]
        strategy_group.add_argument(
            *_option_strings(name),
            dest=name,
            type=parse,
            default=None,
            help=f"used by {', '.join(owners)}",
        )
    bench_group = parser.add_argument_group("benchmark")
    bench_group.add_argument(
        "--benchmark",
        default="lab",
        help=f"comma-separated: {', '.join(BENCHMARKS.names())}, or "
        "package.module:Class (default lab)",
    )
    for name, param in benchmark_params(extra_benchmarks).items():
        if name in CONFIG_FIELDS or name in strategy_params():
            raise ValueError(f"benchmark parameter {name!r} clashes with a compression flag")
        parse, _ = converter(param.annotation)
        users = [b for b in BENCHMARKS.names() if name in {p.name for p in BENCHMARKS.params(b)}]
        users += [c.registered_name for c in extra_benchmarks if name in constructor_params(c)]
        help_text = (
            "model spec or path (benchmark's default model when omitted)"
            if name == "model"
            else f"used by {', '.join(users)}"
        )
        bench_group.add_argument(
            *_option_strings(name), dest=name, type=parse, default=None, help=help_text
        )
    special = parser.add_argument_group("ablation shortcuts")
    special.add_argument(
        "--paper-layer",
        "--paper_layer",
        dest="paper_layer",
        type=_parse_int,
        default=None,
        help="the paper's K (of 28 layers), mapped to the same relative depth of the evaluated LLM",
    )
    special.add_argument(
        "--modules", default=None, metavar="ROW", help=f"Table 5 row: {', '.join(MODULE_ROWS)}"
    )
    out = parser.add_argument_group("output")
    out.add_argument("--store", default=DEFAULT_STORE, help="JSONL results store")
    out.add_argument("--no-store", "--no_store", dest="no_store", action="store_true")
    out.add_argument("--force", action="store_true", help="rerun even if stored")
    out.add_argument("--no-baseline", "--no_baseline", dest="no_baseline", action="store_true")
    out.add_argument("--output", default=None, help="write the run record as JSON")
    out.add_argument("--wandb", default="auto", choices=MODES)
    out.add_argument(
        "--wandb-project", "--wandb_project", dest="wandb_project", default="ustc-ablations"
    )
    out.add_argument("--wandb-group", "--wandb_group", dest="wandb_group", default=None)
    out.add_argument("--quiet", action="store_true", help="no progress bars, no table")
    out.add_argument("--list", action="store_true", help="list strategies and benchmarks")
    return parser


# --------------------------------------------------------------------------------------------
# Resolution: flags -> config + benchmarks, every check before any model
# --------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """A validated run: nothing is loaded yet."""

    config: CompressionConfig
    benchmarks: list[Benchmark]
    args: argparse.Namespace
    #: what the progress bars call this run (a sweep: ``ustc-table5 modules=attn``)
    label: str = ""
    #: what they call its uncompressed run (a sweep: ``ustc-table5 uncompressed``)
    baseline_label: str = "uncompressed"

    @property
    def key(self) -> str:
        return run_key(self.config.to_dict(), [b.spec() for b in self.benchmarks])

    def baseline_key(self) -> str:
        return run_key(VANILLA.to_dict(), [b.spec() for b in self.benchmarks])


_BENCH_CACHE: dict[str, Benchmark] = {}


def _cached(benches: list[Benchmark]) -> list[Benchmark]:
    """Reuse benchmark objects (and the models they hold) across runs of one process."""
    out = []
    for bench in benches:
        tag = json.dumps(
            [type(bench).__module__, type(bench).__qualname__, bench.spec()],
            sort_keys=True,
            default=str,
        )
        out.append(_BENCH_CACHE.setdefault(tag, bench))
    return out


def resolve(argv: Sequence[str] | None = None) -> RunPlan:
    """Parse and validate; raises ``ValueError`` (or exits on a malformed flag).  Loads no model."""
    args = build_parser(argv).parse_args(argv)
    return resolve_args(args)


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def resolve_args(args: argparse.Namespace) -> RunPlan:
    names = [n.strip() for n in args.benchmark.split(",") if n.strip()]
    if not names:
        raise ValueError(
            f"--benchmark {args.benchmark!r} names no benchmark; give one or more, "
            f"comma-separated, of: {', '.join(BENCHMARKS.names())}, or package.module:Class "
            "(leave the flag out for the default, lab)"
        )
    classes = [load_benchmark_class(n) for n in names]
    bench_values = _given(args, list(benchmark_params(classes)))
    accepted = set().union(*(constructor_params(c) for c in classes)) if classes else set()
    stray = sorted(set(bench_values) - accepted)
    if stray:
        flags = ", ".join(_option_strings(s)[0] for s in stray)
        raise ValueError(
            f"{flags} is not a parameter of benchmark {args.benchmark!r}; "
            f"it takes: {', '.join(sorted(accepted)) or 'nothing'}"
        )
    benches = _cached(build_benchmarks(names, bench_values))

    base = benches[0].default_config()
    changes = _given(args, list(CONFIG_FIELDS))
    if args.modules is not None:
        if args.modules not in MODULE_ROWS:
            raise ValueError(
                f"unknown --modules {args.modules!r}; Table 5 rows: {', '.join(MODULE_ROWS)}"
            )
        row = TABLE5_ROWS[MODULE_ROWS[args.modules]]
        for name in MODULE_FIELDS:
            value = getattr(row, name)
            if name in changes and changes[name] != value:
                raise ValueError(
                    f"--modules {args.modules} sets {name}={value!r}, but "
                    f"--{name.replace('_', '-')}={changes[name]!r} was also given"
                )
            changes[name] = value
    if args.paper_layer is not None:
        if "layer" in changes:
            raise ValueError(
                "give either --layer (this model's K) or --paper-layer (the "
                "paper's K, mapped), not both"
            )
        layers = benches[0].llm_layers()
        if layers is None:
            raise ValueError(
                f"--paper-layer needs the LLM depth of benchmark "
                f"{benches[0].registered_name!r}, which it does not report; "
                "give --layer instead"
            )
        changes["layer"] = map_paper_layer(args.paper_layer, layers)
    method = changes.get("method", base.method)
    if method in METHODS:
        # a baseline runs with the in-LLM stage of its paper; an explicit flag wins
        for name, value in method_in_llm(method).items():
            changes.setdefault(name, value)
    extra = _given(args, list(strategy_params()))
    params = {**base.params, **extra}
    if "tau" in changes and not 0.0 < changes["tau"] <= 1.0:
        raise ValueError(
            f"--tau must be in {FLAG_RANGES['tau'][0]}, got {changes['tau']:g}: "
            f"{FLAG_RANGES['tau'][1]}"
        )
    config = base.replace(**changes, params=params)
    for kind, registry in REGISTRIES.items():
        # each selected strategy checks its own parameters (FastVID's anchor_stride >= 1, ...)
        registry.build_from(getattr(config, kind), config.strategy_values())
    if _given(args, list(IN_LLM_FIELDS)):
        args.in_llm_source = "given"
    elif method in METHODS and method_in_llm(method):
        args.in_llm_source = "method"
    else:
        args.in_llm_source = "default"

    for bench in benches:
        layers = bench.llm_layers()
        if layers is not None and config.merger != "none" and config.layer >= layers:
            raise ValueError(
                f"layer K={config.layer} is not a layer of the {layers}-layer LLM of benchmark "
                f"{bench.registered_name!r}: K must be in [0, {layers - 1}] (use --paper-layer "
                "to map the paper's K to this depth)"
            )
    if getattr(args, "output", None):
        check_output_path(args.output)
    if not getattr(args, "no_store", False):
        check_output_path(args.store, "--store", "ablations.jsonl")
    for bench in benches:
        bench.check()
    return RunPlan(config, benches, args)


def check_output_path(output: str, flag: str = "--output", example: str = "run.json") -> None:
    """Raise ``ValueError`` unless ``output`` can be written as a file: not a directory, and
    either a writable file or a name in a directory that exists (or can be created) and is
    writable.  Checked before any model loads, so that a typo does not cost the evaluation
    (``flag`` names the option in the message: ``--output``, ``--store``)."""
    path = Path(output)
    if output.endswith(("/", "\\")) or path.is_dir():
        raise ValueError(
            f"{flag} {output!r} is a directory; give a file name, e.g. {path / example}"
        )
    if path.exists():
        try:
            with path.open("a"):
                pass
        except OSError as exc:
            raise ValueError(f"{flag} {output!r} exists and cannot be written ({exc})") from None
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(
            f"{flag} {output!r}: {parent} is a file, so no directory can be made under it"
        )
    try:  # a real probe: permission bits say nothing for root or on a read-only file system
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise ValueError(
            f"{flag} {output!r}: cannot create files in {parent} ({exc.strerror or exc}); "
            "give a path in a writable directory"
        ) from None


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _merge_results(benches: list[Benchmark], results: list[BenchmarkResult]) -> dict[str, Any]:
    scores: dict[str, float] = {}
    tokens: dict[str, float] = {}
    timings: dict[str, float] = {}
    details: dict[str, Any] = {}
    several = len(benches) > 1
    for bench, res in zip(benches, results, strict=True):
        prefix = f"{bench.registered_name}/" if several else ""
        for column, value in res.scores.items():
            scores[f"{bench.registered_name}/{column}" if column in scores else column] = value
        tokens.update({prefix + k: v for k, v in res.tokens.items()})
        timings.update({prefix + k: v for k, v in res.timings.items()})
        details[bench.registered_name] = res.details
    return {
        "scores": scores,
        "tokens": tokens,
        "timings": timings,
        "n": sum(r.n for r in results),
        "details": details,
    }


def flops_of(config: CompressionConfig, bench: Benchmark) -> dict[str, Any] | None:
    """Eq. S3 FLOPs (``ustc.flops``) of the evaluated LLM, and the planned token counts."""
    spec = bench.flops_spec()
    if spec is None:
        return None
    from ustc import flops

    # ustc.flops' default merge_at is the convention the model adapters follow
    try:
        ours = flops.count(config, spec, counter="eq-s3")
        vanilla = flops.count(VANILLA, spec, counter="eq-s3")
    except ValueError as exc:
        return {"model": spec.name, "error": str(exc)}
    entering = config.budget(spec.frames, spec.tokens_per_frame)
    return {
        "model": spec.name,
        "counter": "eq-s3",
        "merge_at": inspect.signature(flops.count).parameters["merge_at"].default,
        "tflops": ours.tera,
        "ratio": ours.ratio(vanilla),
        "vanilla_tflops": vanilla.tera,
        "visual_tokens": spec.visual_tokens,
        "llm_visual_tokens": entering,
        "after_merge_tokens": config.kept_after_merge(entering),
    }


def _evaluate(plan: RunPlan, config: CompressionConfig, progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    label = plan.baseline_label if config == VANILLA else plan.label or short_label(config)
    results = [b.evaluate(config, progress=progress and label) for b in plan.benchmarks]
    merged = _merge_results(plan.benchmarks, results)
    avg = sum(merged["scores"].values()) / len(merged["scores"])
    merged["timings"]["wall"] = time.perf_counter() - start
    return {
        "key": run_key(config.to_dict(), [b.spec() for b in plan.benchmarks]),
        "config": config.to_dict(),
        "benchmarks": [b.spec() for b in plan.benchmarks],
        "avg": avg,
        "columns": list(merged["scores"]),  # table order (the store sorts dict keys)
        "flops": flops_of(config, plan.benchmarks[0]),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **merged,
    }


def run_plan(
    plan: RunPlan,
    store: ResultStore | None = None,
    claims: Claims | None = None,
    baseline: str = "run",
) -> dict[str, Any]:
    """Baseline (stored once) + this run; returns the run's record with ``pct_of_uncompressed``.

    claims: when given, each run that has to be evaluated is claimed first
    (:class:`ablations.store.Claims`); a key another live process holds raises
    :class:`ablations.store.ClaimedElsewhere` before anything is evaluated for it.
    baseline: ``run`` (the uncompressed run, from the store or evaluated) or ``if-stored`` (only
    from the store: a sweep runs it as a grid point of its own).
    """
    args = plan.args
    progress = not args.quiet

    def stored_or_run(
        config: CompressionConfig, key: str, force: bool
    ) -> tuple[dict[str, Any], bool]:
        if store is not None and not force:
            hit = store.get(key)
            if hit is not None:
                return hit, True
        if claims is None:
            record = _evaluate(plan, config, progress)
            if store is not None:
                store.append(record, replace=force)
            return record, False
        claims.acquire(key)
        try:
            if store is not None and not force:  # finished by another process meanwhile
                hit = store.get(key)
                if hit is not None:
                    return hit, True
            record = _evaluate(plan, config, progress)
            if store is not None:
                store.append(record, replace=force)
        finally:
            claims.release(key)
        return record, False

    reference = None
    if not args.no_baseline:
        if baseline == "run":
            reference, _ = stored_or_run(VANILLA, plan.baseline_key(), force=False)
        elif store is not None:
            reference = store.get(plan.baseline_key())
    record, cached = stored_or_run(plan.config, plan.key, force=args.force)
    record = dict(record)
    record["cached"] = cached
    if reference is not None and reference["avg"] > 0:
        record["baseline"] = {
            "key": reference["key"],
            "avg": reference["avg"],
            "scores": reference["scores"],
            "timings": reference.get("timings", {}),
        }
        record["pct_of_uncompressed"] = 100.0 * record["avg"] / reference["avg"]
    else:
        record["pct_of_uncompressed"] = None
    return record


def run_baseline(plan: RunPlan, store: ResultStore, claims: Claims | None = None) -> dict[str, Any]:
    """The uncompressed run of ``plan``'s benchmarks, from the store or evaluated and stored
    (claimed first when ``claims`` is given).  Returns its record with ``cached``."""
    key = plan.baseline_key()
    hit = store.get(key)
    if hit is not None:
        return {**hit, "cached": True}
    if claims is not None:
        claims.acquire(key)
    try:
        hit = store.get(key)
        if hit is not None:
            return {**hit, "cached": True}
        record = _evaluate(plan, VANILLA, not plan.args.quiet)
        store.append(record)
    finally:
        if claims is not None:
            claims.release(key)
    return {**record, "cached": False}


def oracle_of(plan: RunPlan, store: ResultStore | None) -> dict[str, Any] | None:
    """The benchmarks' evidence-keeping selection at the run's retention
    (:meth:`ustc.evaluation.Benchmark.oracle`), from the store or evaluated and stored; None
    when a benchmark does not know where its evidence is."""
    retention = plan.config.retention
    config = {"selector": "oracle", "retention": retention}
    specs = [b.spec() for b in plan.benchmarks]
    key = run_key(config, specs)
    hit = store.get(key) if store is not None else None
    if hit is not None:
        return hit
    start = time.perf_counter()
    label = f"oracle r={retention:g}"
    results = [b.oracle(retention, progress=not plan.args.quiet and label) for b in plan.benchmarks]
    if any(r is None for r in results):
        return None
    merged = _merge_results(plan.benchmarks, [r for r in results if r is not None])
    merged["timings"]["wall"] = time.perf_counter() - start
    record = {
        "key": key,
        "config": config,
        "benchmarks": specs,
        "avg": sum(merged["scores"].values()) / len(merged["scores"]),
        "columns": list(merged["scores"]),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **merged,
    }
    if store is not None:
        store.append(record)
    return record


def format_record(record: dict[str, Any]) -> str:
    """A short Markdown table of one run: the uncompressed model's row (when the record has its
    baseline), the paper's printed figure for the same setting (when the paper prints one), then
    the run."""
    from ablations.tables import paper_figure

    cols = record.get("columns") or list(record["scores"])
    head = ["", *cols, "Avg.", "%", "FLOPs (T)", "tokens", "time (s)"]
    flops = record.get("flops") or {}
    tokens = flops.get("llm_visual_tokens")
    tok = "-" if tokens is None else f"{tokens}/{flops.get('visual_tokens')}"
    if flops.get("after_merge_tokens") not in (None, tokens):
        tok += f" -> {flops['after_merge_tokens']}"
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    baseline = record.get("baseline")
    if baseline is not None:
        full = flops.get("visual_tokens")
        row = ["uncompressed"] + [
            "-" if baseline["scores"].get(c) is None else f"{baseline['scores'][c]:.1f}"
            for c in cols
        ]
        row += [
            f"{baseline['avg']:.1f}",
            "100.0",
            "-" if flops.get("vanilla_tflops") is None else f"{flops['vanilla_tflops']:.3g}",
            "-" if full is None else f"{full}/{full}",
            f"{baseline.get('timings', {}).get('wall', float('nan')):.1f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
        try:
            config = CompressionConfig.from_dict(record["config"])
        except Exception:  # a record of another version: no paper figure, nothing else lost
            config = None
        paper = paper_figure(config) if config is not None else None
        if paper is not None:
            label, printed = paper
            row = [f"paper, LLaVA-OV-7B ({label})"] + ["-"] * len(cols)
            row += [f"{printed[-2]:.1f}", f"{printed[-1]:.1f}", "-", "-", "-"]
            lines.append("| " + " | ".join(row) + " |")
    oracle = record.get("oracle")
    if oracle is not None:
        row = ["oracle (keeps the evidence)"]
        row += [
            "-" if oracle["scores"].get(c) is None else f"{oracle['scores'][c]:.1f}" for c in cols
        ]
        pct = "-" if baseline is None else f"{100.0 * oracle['avg'] / baseline['avg']:.1f}"
        kept = "-" if tokens is None else f"{tokens}/{flops.get('visual_tokens')}"  # no merging
        row += [f"{oracle['avg']:.1f}", pct, "-", kept, f"{oracle['timings'].get('wall', 0.0):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    row = (
        ["this run"]
        + [f"{record['scores'][c]:.1f}" for c in cols]
        + [
            f"{record['avg']:.1f}",
            "-"
            if record.get("pct_of_uncompressed") is None
            else f"{record['pct_of_uncompressed']:.1f}",
            "-" if flops.get("tflops") is None else f"{flops['tflops']:.3g}",
            tok,
            f"{record['timings'].get('wall', float('nan')):.1f}",
        ]
    )
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def short_label(config: CompressionConfig) -> str:
    """A few words naming a run for its progress bar: ``r=0.02 attn+sim/greedy/dpc text-aware``
    (ustc's method) or ``r=0.02 visionzip none``."""
    c = config
    stages = f"{c.scorer}/{c.pool}/{c.recycler}" if c.method == "ustc" else c.method
    return f"r={c.retention:g} {stages} {c.merger}"


def describe_config(config: CompressionConfig, in_llm_source: str = "default") -> str:
    """One line saying what runs: the method and its own parameters (the scorer, pool and
    recycler only for ustc's method, the only one that uses them), then the in-LLM stage and
    where it came from (``in_llm_source``: ``method``, the baseline's published in-LLM stage;
    ``given``, flags on the command line; ``default``, the config's default)."""
    c = config
    if c.method == "ustc":
        text = (
            f"r={c.retention:g} method=ustc scorer={c.scorer} pool={c.pool}(tau={c.tau:g}) "
            f"recycler={c.recycler}"
        )
        if c.recycler != "none":
            text += f"(cluster_ratio={c.cluster_ratio:g}, k={c.k})"
    else:
        text = f"r={c.retention:g} method={c.method}"
    text += f" merger={c.merger}"
    if c.merger != "none":
        text += f"(K={c.layer}, R={c.keep_ratio:g}"
        text += f", lambda={c.lam:g})" if c.merger == "text-aware" else ")"
    if c.method != "ustc":
        text += {
            "method": f" [{c.method}'s published in-LLM stage; --merger text-aware adds ustc's]",
            "given": " [in-LLM stage as given on the command line]",
            "default": f" [{c.method} declares no in-LLM stage: the config's default]",
        }[in_llm_source]
    if c.params:
        text += f" params={c.params}"
    return text


def list_everything() -> str:
    lines = []
    for kind, registry in REGISTRIES.items():
        for name in registry.names():
            params = ", ".join(
                p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                for p in registry.params(name)
            )
            lines.append(f"{kind:9s} {name:14s} {params}")
    for name in BENCHMARKS.names():
        params = ", ".join(p.name for p in BENCHMARKS.params(name))
        lines.append(f"{'benchmark':9s} {name:14s} {params}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.list:
        print(list_everything())
        return None
    try:
        plan = resolve_args(args)
        args.wandb = preflight(args.wandb)  # online without credentials stops before any work
    except ValueError as exc:
        parser.error(str(exc))
    store = None if args.no_store else ResultStore(args.store)
    if not args.quiet:
        names = ",".join(b.registered_name for b in plan.benchmarks)
        source = getattr(args, "in_llm_source", "default")
        print(
            f"ustc ablation [{plan.key}] on {names}: {describe_config(plan.config, source)}",
            flush=True,
        )
    try:
        record = run_plan(plan, store)
        if not args.no_baseline and not plan.config.is_identity:
            oracle = oracle_of(plan, store)
            if oracle is not None:
                record["oracle"] = {k: oracle[k] for k in ("key", "avg", "scores", "timings")}
        if not record.pop("cached"):
            log_run(record, mode=args.wandb, project=args.wandb_project, group=args.wandb_group)
        elif not args.quiet:
            print(f"(from the store {args.store}; --force to rerun)")
    except KeyboardInterrupt:
        print(interrupted_message(plan, store), file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    if not args.quiet:
        print(format_record(record))
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, sort_keys=True, default=_json_default))
    return record


def interrupted_message(plan: RunPlan, store: ResultStore | None) -> str:
    """What a Ctrl-C of ``run.py`` leaves: which of the run's rows are stored, and how to go on."""
    if store is None:
        return "\ninterrupted: nothing was stored (--no-store)"
    try:
        records = store.records()
    except Exception as exc:  # the summary must not hide the interruption itself
        return f"\ninterrupted: the store {store.path} keeps every finished run ({exc})"
    rows = [("uncompressed", plan.baseline_key()), ("this run", plan.key)]
    if plan.args.no_baseline:
        rows = rows[1:]
    stored = [name for name, key in rows if key in records]
    missing = [name for name, key in rows if key not in records]
    return (
        f"\ninterrupted: {store.path} keeps its {len(records)} stored row(s)"
        + (f", {' and '.join(stored)} among them" if stored else "")
        + (f"; {' and '.join(missing)} not stored" if missing else "")
        + "; the same command resumes (stored rows are read, not redone)"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


if __name__ == "__main__":
    main()
