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

Several processes on the same grid and store (one machine, or several on a shared file system)
split the grid: each run is claimed before it starts (:class:`ablations.store.Claims`), a process
skips what another one holds and, once it has nothing left to claim, waits for the others' runs
to be stored before it writes the table.  A claim left by a process that died is taken over.
Ctrl-C stops the sweep with a summary of what is stored and the command that resumes it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablations import run as runner  # noqa: E402
from ablations.paper_tables import TABLES, TableDef, get_table  # noqa: E402
from ablations.render import Rendered, render, write_outputs  # noqa: E402
from ablations.store import ClaimedElsewhere, Claims, ResultStore, describe_owner  # noqa: E402
from ablations.sweep_files import expand_grid, load_sweep, to_argv  # noqa: E402
from ablations.wandb_log import MODES, log_run, log_table, preflight  # noqa: E402


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


def plans_for(
    sweep: dict[str, Any], extra: Sequence[str], store: str, quiet: bool = True
) -> list[runner.RunPlan]:
    """Resolve every grid point (raises before anything runs if one is invalid); ``quiet``
    False: each run draws its own progress bar, under the sweep's."""
    varied = {n for n, p in sweep["parameters"].items() if "values" in p}
    for flag in extra:
        name = flag.lstrip("-").split("=", 1)[0].replace("_", "-")
        if name in {v.replace("_", "-") for v in varied}:
            raise ValueError(f"--{name} is what this sweep varies; it cannot be fixed")
    plans = []
    group = str(sweep.get("name", "sweep"))
    for point in expand_grid(sweep):
        argv = [*to_argv(point), *extra, "--store", store, *(["--quiet"] if quiet else [])]
        try:
            plan = runner.resolve(argv)
        except ValueError as exc:
            raise ValueError(f"grid point {point}: {exc}") from None
        # what the progress bars say: the table and its row (the benchmark adds its name)
        plan.label = f"{group} " + " ".join(f"{n}={point[n]}" for n in sorted(varied))
        plan.baseline_label = f"{group} uncompressed"
        plans.append(plan)
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
    stale_after: float = 24 * 3600,
    poll_seconds: float = 2.0,
) -> Rendered | None:
    """Run every grid point not yet in the store, then write the table.

    Points another live process has claimed are left to it; once nothing is left to claim this
    process waits (polling every ``poll_seconds``) until they are stored.  ``stale_after``: age
    in seconds after which a claim of a process on another host counts as abandoned."""
    sweep, table = _load(source)
    plans = plans_for(sweep, extra, store_path, quiet=not progress)
    wandb = preflight(wandb)  # online without credentials stops here, before any run
    store = ResultStore(store_path)
    done = store.records()
    varied = [n for n, p in sweep["parameters"].items() if "values" in p]
    units: list[tuple[dict[str, Any], runner.RunPlan, str]] = []
    if plans and not plans[0].args.no_baseline:
        # the uncompressed run is a unit of its own, so that a second process need not wait
        units.append(({n: "uncompressed" for n in varied}, plans[0], "baseline"))
    units += [(point, plan, "point") for point, plan in zip(expand_grid(sweep), plans, strict=True)]

    def key_of(plan: runner.RunPlan, kind: str) -> str:
        return plan.baseline_key() if kind == "baseline" else plan.key

    todo = [u for u in units if key_of(u[1], u[2]) not in done]
    group = str(sweep.get("name", Path(source).stem))
    claims = Claims(store_path, stale_after=stale_after)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(units), initial=len(units) - len(todo), desc=group, unit="run")
    told: set[str] = set()
    while todo:
        busy = []
        for point, plan, kind in todo:
            if key_of(plan, kind) in store:  # stored by another process since
                if bar is not None:
                    bar.update(1)
                continue
            if bar is not None:
                bar.set_postfix_str(" ".join(f"{n}={point[n]}" for n in varied))
            try:
                if kind == "baseline":
                    record = runner.run_baseline(plan, store, claims)
                else:
                    record = runner.run_plan(plan, store, claims, baseline="if-stored")
            except ClaimedElsewhere as exc:
                busy.append((point, plan, kind))
                if progress and exc.key not in told:
                    told.add(exc.key)
                    print(
                        f"{group}: {' '.join(f'{n}={point[n]}' for n in varied) or exc.key} is "
                        f"being run by {describe_owner(exc.owner)}; running the others",
                        file=sys.stderr,
                        flush=True,
                    )
                continue
            if not record.pop("cached", True) and kind == "point":
                label = " ".join(f"{n}={point[n]}" for n in varied)
                log_run(record, mode=wandb, project=project, group=group, name=f"{group} {label}")
            if bar is not None:
                bar.update(1)
        if busy and len(busy) == len(todo):
            time.sleep(poll_seconds)  # everything left is in flight elsewhere: wait for it
        todo = busy
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
    if progress:  # printed and written before W&B is asked for anything
        print(rendered.markdown())
        print("written: " + ", ".join(str(p) for p in paths), flush=True)
    log_table(table.name, rendered.header, rendered.rows, mode=wandb, project=project)
    return rendered


def main(argv: Sequence[str] | None = None) -> Rendered | None:
    parser = runner.OneLineErrors(
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
    parser.add_argument(
        "--stale-after",
        "--stale_after",
        dest="stale_after",
        type=float,
        default=24 * 3600,
        help="seconds after which another host's claim on a run counts as abandoned (default 1 day)",
    )
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
            stale_after=args.stale_after,
        )
    except ValueError as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        print(interrupted_message(args.sweep, extra, args.store, argv), file=sys.stderr)
        raise SystemExit(130) from None


def interrupted_message(
    source: str, extra: Sequence[str], store_path: str, argv: Sequence[str] | None
) -> str:
    """What a Ctrl-C leaves: how many runs of the grid are stored, and how to go on."""
    words = list(sys.argv[1:] if argv is None else argv)
    command = "python ablations/sweep.py " + shlex.join(words)
    try:
        sweep, _ = _load(source)
        plans = plans_for(sweep, extra, store_path)
        stored = ResultStore(store_path).records()
        done = sum(plan.key in stored for plan in plans)
        status = f"{done} of {len(plans)} grid points are stored in {store_path}"
        if plans and not plans[0].args.no_baseline:
            has = plans[0].baseline_key() in stored
            status += f" ({'with' if has else 'without'} the uncompressed run)"
    except Exception as exc:  # the summary must not hide the interruption itself
        status = f"the store {store_path} keeps every finished run ({exc})"
    return (
        f"\ninterrupted: {status}; the run in flight was not stored.\n"
        f"resume with the same command (stored runs are skipped):\n  {command}"
    )


if __name__ == "__main__":
    main()
