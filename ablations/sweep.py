"""Run a table's grid locally, without a W&B server: the same sweep YAML ``wandb agent`` runs.

    python ablations/sweep.py s6                           # Table S6 on the lab benchmark
    python ablations/sweep.py ablations/sweeps/s6.yaml --limit 100 --store results/s6.jsonl
    python ablations/sweep.py table5 --benchmark lmms-eval --model lmms-lab/llava-onevision-qwen2-7b-ov

The YAML's grid is expanded like W&B does (cartesian product of ``values``, plus the ``value``
constants); any other flag is a ``run.py`` flag given to every run (it may override a constant,
not the varied parameter).  Every run is validated before the first one starts.  Each finished
run is appended (fsync'd) to the results store, so a grid that is interrupted and restarted
redoes only the unfinished runs.  At the end the table is written as Markdown and CSV under
``--out-dir`` and logged as a ``wandb.Table``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablations import run as runner  # noqa: E402
from ablations.store import ResultStore  # noqa: E402
from ablations.tables import (  # noqa: E402
    TABLES,
    Rendered,
    TableDef,
    expand_grid,
    get_table,
    load_sweep,
    render,
    to_argv,
    write_outputs,
)
from ablations.wandb_log import MODES, log_run, log_table  # noqa: E402


def run_flags_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--store", default=runner.DEFAULT_STORE)
    return parser


def _table_of(source: str, sweep: dict[str, Any]) -> TableDef | None:
    name = str(sweep.get("name", "")).removeprefix("ustc-")
    for candidate in (name, Path(source).stem):
        if candidate in TABLES:
            return TABLES[candidate]
    return None


def _load(source: str) -> tuple[dict[str, Any], TableDef | None]:
    if Path(source).suffix in (".yaml", ".yml") or Path(source).is_file():
        sweep = load_sweep(source)
        return sweep, _table_of(source, sweep)
    table = get_table(source)
    return table.sweep(), table


def plans_for(sweep: dict[str, Any], extra: Sequence[str], store: str) -> list[runner.RunPlan]:
    """Resolve every grid point (raises before anything runs if one is invalid)."""
    varied = {n for n, p in sweep["parameters"].items() if "values" in p}
    for flag in extra:
        name = flag.lstrip("-").split("=", 1)[0].replace("_", "-")
        if name in {v.replace("_", "-") for v in varied}:
            raise ValueError(f"--{name} is what this sweep varies; it cannot be fixed")
    plans = []
    for point in expand_grid(sweep):
        argv = [*to_argv(point), *extra, "--store", store, "--quiet"]
        try:
            plans.append(runner.resolve(argv))
        except ValueError as exc:
            raise ValueError(f"grid point {point}: {exc}") from None
    return plans


def collect(
    table: TableDef, sweep: dict[str, Any], store_path: str, extra: Sequence[str]
) -> Rendered:
    """Render ``table`` from the store for the grid ``sweep`` (runs nothing)."""
    store = ResultStore(store_path)
    records = store.records()
    plans = plans_for(sweep, extra, store_path)
    points = expand_grid(sweep)
    by_value: dict[Any, dict[str, Any] | None] = {}
    for point, plan in zip(points, plans, strict=True):
        by_value[point[table.parameter]] = records.get(plan.key)
    baseline = records.get(plans[0].baseline_key()) if plans else None
    return render(table, {v: by_value.get(v) for v in table.values}, baseline)


def run_sweep(
    source: str,
    extra: Sequence[str] = (),
    *,
    store_path: str = runner.DEFAULT_STORE,
    out_dir: str = "results/tables",
    wandb: str = "auto",
    project: str = "ustc-ablations",
    progress: bool = True,
) -> Rendered | None:
    """Run every grid point not yet in the store, then write the table."""
    sweep, table = _load(source)
    plans = plans_for(sweep, extra, store_path)
    store = ResultStore(store_path)
    done = store.records()
    varied = [n for n, p in sweep["parameters"].items() if "values" in p]
    todo = [
        (point, plan)
        for point, plan in zip(expand_grid(sweep), plans, strict=True)
        if plan.key not in done
    ]
    group = str(sweep.get("name", Path(source).stem))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plans), initial=len(plans) - len(todo), desc=group, unit="run")
    for point, plan in todo:
        if bar is not None:
            bar.set_postfix_str(" ".join(f"{n}={point[n]}" for n in varied))
        record = runner.run_plan(plan, store)
        if not record.pop("cached"):
            log_run(record, mode=wandb, project=project, group=group)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if table is None:
        return None
    rendered = collect(table, sweep, store_path, extra)
    stem = (
        table.name
        if not extra
        else f"{table.name}-"
        + "-".join(
            f.lstrip("-").replace("=", "_").replace("/", "_").replace(":", "_") for f in extra
        )
    )
    paths = write_outputs(rendered, out_dir, stem)
    log_table(table.name, rendered.header, rendered.rows, mode=wandb, project=project)
    if progress:
        print(rendered.markdown())
        print("written: " + ", ".join(str(p) for p in paths))
    return rendered


def main(argv: Sequence[str] | None = None) -> Rendered | None:
    parser = argparse.ArgumentParser(
        prog="ablations/sweep.py",
        description="Run a sweep YAML's grid locally (resumable) and write the paper's table.",
        epilog="Other flags are passed to every run (see ablations/run.py --help).",
    )
    parser.add_argument("sweep", help=f"a sweep YAML or a table name ({', '.join(TABLES)})")
    parser.add_argument("--store", default=runner.DEFAULT_STORE, help="JSONL results store")
    parser.add_argument("--out-dir", "--out_dir", dest="out_dir", default="results/tables")
    parser.add_argument("--wandb", default="auto", choices=MODES)
    parser.add_argument(
        "--wandb-project", "--wandb_project", dest="wandb_project", default="ustc-ablations"
    )
    parser.add_argument("--quiet", action="store_true")
    args, extra = parser.parse_known_args(argv)
    try:
        return run_sweep(
            args.sweep,
            extra,
            store_path=args.store,
            out_dir=args.out_dir,
            wandb=args.wandb,
            project=args.wandb_project,
            progress=not args.quiet,
        )
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
