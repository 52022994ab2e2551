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

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the CLI parses and calls; these are also this module's API (sweep.py, docs_tables.py, tests)
from ablations.execute import flops_of, oracle_of, run_baseline, run_plan  # noqa: E402, F401
from ablations.flags import (  # noqa: E402, F401
    CONFIG_FIELDS,
    DEFAULT_STORE,
    FLAG_RANGES,
    OneLineErrors,
    benchmark_params,
    build_parser,
    converter,
    strategy_params,
)
from ablations.output import (  # noqa: E402, F401
    describe_config,
    format_record,
    interrupted_message,
    list_everything,
    short_label,
)
from ablations.paper_tables import MODULE_FIELDS, MODULE_ROWS  # noqa: E402, F401
from ablations.plan import (  # noqa: E402, F401
    _BENCH_CACHE,
    VANILLA,
    RunPlan,
    check_output_path,
    resolve,
    resolve_args,
)
from ablations.store import ResultStore  # noqa: E402
from ablations.wandb_log import log_run, preflight  # noqa: E402


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


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


if __name__ == "__main__":
    main()
