"""Resolution: flags -> a validated ``RunPlan`` (config + benchmarks), every check before any
model loads."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablations.flags import (
    CONFIG_FIELDS,
    FLAG_RANGES,
    _option_strings,
    benchmark_params,
    build_parser,
    strategy_params,
)
from ablations.paper_tables import MODULE_FIELDS, MODULE_ROWS
from ablations.store import run_key
from ustc.config import CompressionConfig
from ustc.evaluation import (
    BENCHMARKS,
    Benchmark,
    build_benchmarks,
    constructor_params,
    load_benchmark_class,
    map_paper_layer,
)
from ustc.presets import TABLE5_ROWS
from ustc.registry import IN_LLM_FIELDS, METHODS, REGISTRIES, method_in_llm

#: the uncompressed model every "% of uncompressed" refers to
VANILLA = CompressionConfig(retention=1.0, merger="none")


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
