"""The W&B sweep files of the tables (``ablations/sweeps/*.yaml``): writing them from
:data:`ablations.paper_tables.TABLES`, reading one back, and its grid as ``run.py`` flags."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import yaml

from ablations.paper_tables import TABLES, TableDef

SWEEP_DIR = Path(__file__).resolve().parent / "sweeps"


def sweep_path(table: TableDef) -> Path:
    return SWEEP_DIR / f"{table.name}.yaml"


def sweep_yaml(table: TableDef) -> str:
    header = (
        f"# {table.title}.\n# Generated from ablations/tables.py (python ablations/tables.py "
        "--write-sweeps); run with\n#   wandb sweep ablations/sweeps/"
        f"{table.name}.yaml && wandb agent <entity/project/id>\n# or without a W&B server:"
        f"\n#   python ablations/sweep.py ablations/sweeps/{table.name}.yaml\n"
    )
    return header + yaml.safe_dump(
        table.sweep(), sort_keys=False, default_flow_style=None, width=100
    )


def write_sweeps() -> list[Path]:
    SWEEP_DIR.mkdir(parents=True, exist_ok=True)
    paths = []
    for table in TABLES.values():
        path = sweep_path(table)
        path.write_text(sweep_yaml(table))
        paths.append(path)
    return paths


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read a sweep YAML; only ``method: grid`` with ``value``/``values`` parameters is supported
    by the local runner (the paper's tables need nothing else)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read the sweep file {path} ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict) or not isinstance(data.get("parameters"), dict):
        raise ValueError(f"{path}: not a W&B sweep file (no 'parameters')")
    if data.get("method", "grid") != "grid":
        raise ValueError(
            f"{path}: the local runner expands method 'grid' only, got {data.get('method')!r}"
        )
    for name, spec in data["parameters"].items():
        if not isinstance(spec, dict) or not ({"value", "values"} & set(spec)):
            raise ValueError(f"{path}: parameter {name!r} needs 'value' or 'values' for a grid")
    return data


def expand_grid(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Cartesian product of the ``values`` lists (in file order), each with the ``value``
    constants: the runs ``wandb agent`` would make of a grid sweep."""
    params = sweep["parameters"]
    names = list(params)
    choices = [
        params[n]["values"] if "values" in params[n] else [params[n]["value"]] for n in names
    ]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


def to_argv(point: dict[str, Any]) -> list[str]:
    """A grid point as the ``--name=value`` flags W&B's ``${args}`` would pass."""
    return [f"--{name}={value}" for name, value in point.items()]
