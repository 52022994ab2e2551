"""The tables CLI: render a paper table from the results store (runs nothing), list the tables,
or regenerate the sweep files.

    python ablations/tables.py s6 [--store PATH] [run.py flags]
    python ablations/tables.py --list
    python ablations/tables.py --write-sweeps

The tables themselves are data in :mod:`ablations.paper_tables`; rendering is
:mod:`ablations.render`, the sweep files :mod:`ablations.sweep_files`.

"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablations.paper_tables import TABLES, get_table  # noqa: E402
from ablations.sweep import collect, run_flags_parser  # noqa: E402
from ablations.sweep_files import write_sweeps  # noqa: E402


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ablations/tables.py",
        description="Render a table from the results store (runs nothing), or write the sweeps.",
    )
    parser.add_argument("table", nargs="?", help=f"one of {', '.join(TABLES)}")
    parser.add_argument(
        "--write-sweeps", action="store_true", help="regenerate ablations/sweeps/*.yaml from TABLES"
    )
    parser.add_argument("--list", action="store_true")
    args, run_flags = parser.parse_known_args(argv)
    if args.write_sweeps:
        for path in write_sweeps():
            print(path)
        return
    if args.list or not args.table:
        for table in TABLES.values():
            print(f"{table.name:7s} {table.parameter:14s} {list(table.values)}  {table.title}")
        return
    table = get_table(args.table)
    opts, rest = run_flags_parser().parse_known_args(run_flags)
    rendered = collect(table, table.sweep(), opts.store, rest)
    print(rendered.markdown())


if __name__ == "__main__":
    main()
