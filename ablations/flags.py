"""``run.py``'s flags, generated from the registries: every ``CompressionConfig`` field, every
registered strategy's and benchmark's constructor parameter (see run.py's docstring)."""

from __future__ import annotations

import argparse
import inspect
import types
import typing
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from ablations.paper_tables import MODULE_ROWS
from ablations.wandb_log import MODES
from ustc import strategies  # noqa: F401  (registers the built-in strategies)
from ustc.config import CompressionConfig
from ustc.evaluation import (
    BENCHMARKS,
    Benchmark,
    constructor_params,
    load_benchmark_class,
)
from ustc.registry import REGISTRIES, Param

DEFAULT_STORE = "results/ablations.jsonl"

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
