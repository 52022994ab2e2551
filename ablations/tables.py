"""The paper's ablation tables: their grids, their printed numbers, and rendering of ours beside
them (Markdown, CSV, ``wandb.Table``).

=========  ==================================  ===============  ================================
table      varies                              values           fixed
=========  ==================================  ===============  ================================
table5     --modules (Attn, Sim, Cluster)      7 combinations   r = 2 %, no merger (w/o M)
s5         --paper-layer (K)                   2 7 14 18 21     r = 2 %, text-aware merger
s6         --tau                               0.5 ... 0.9      r = 2 %, no merger
s7         --cluster-ratio                     0.1 ... 0.7      r = 2 %, no merger
s8         --lam (lambda)                      0 .25 .5 .75 1   r = 2 %, text-aware merger
sk         --k (DPC-KNN neighbours; not in     3 4 5 7 10       r = 2 %, no merger
           the paper: HoliTom/FlashVID use 7,
           FastVID 4, ustc 5)
=========  ==================================  ===============  ================================

Which rows are "w/o M": the paper's printed rows say so.  S6's tau = 0.7 and S7's 0.3 rows equal
Table 5's full row and "Ours (w/o M)" at 2 % of Table 1 (52.9 57.2 39.5 51.0 51.3); S5's K = 18
and S8's lambda = 0.5 rows equal "Ours" at 2 %/1 % (52.8 57.6 40.3 50.8 51.8), so they merge.

Every table is also a W&B sweep under ``ablations/sweeps/`` (``python ablations/tables.py
--write-sweeps`` regenerates them from :data:`TABLES`; a test checks they agree).  The sweep's
parameters are ``run.py`` flags; ``${args}`` passes them as ``--name=value``.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SWEEP_DIR = Path(__file__).resolve().parent / "sweeps"

#: the paper's benchmark columns
PAPER_COLUMNS = ("MVBench", "EgoSchema", "MLVU", "LongVideoBench", "VideoMME")
#: LLaVA-OV-7B uncompressed: the five columns, Avg. Score, %
PAPER_VANILLA = (58.3, 60.4, 47.7, 56.4, 58.6, 56.3, 100.0)


@dataclass(frozen=True)
class TableDef:
    """One ablation table of the paper.

    name:      short id (``table5``, ``s5`` ...), also the sweep file's stem.
    title:     the paper's caption.
    parameter: the ``run.py`` flag the table varies (without ``--``).
    values:    the paper's grid, in row order.
    fixed:     flags every run of the table gets.
    paper:     value -> the printed row: five benchmark columns, Avg. Score, %.
    show:      config fields printed beside each row (e.g. the mapped layer K).
    """

    name: str
    title: str
    parameter: str
    values: tuple[Any, ...]
    fixed: dict[str, Any]
    paper: dict[Any, tuple[float, ...]]
    show: tuple[str, ...] = ()
    labels: dict[Any, str] = field(default_factory=dict)

    def label(self, value: Any) -> str:
        return self.labels.get(
            value,
            f"{self.parameter} = {value:g}"
            if isinstance(value, (int, float))
            else f"{self.parameter} = {value}",
        )

    def sweep(self) -> dict[str, Any]:
        """The W&B sweep definition (method grid) of this table."""
        params: dict[str, Any] = {self.parameter: {"values": list(self.values)}}
        params.update({k: {"value": v} for k, v in self.fixed.items()})
        return {
            "name": f"ustc-{self.name}",
            "description": self.title,
            "program": "ablations/run.py",
            "method": "grid",
            "metric": {"name": "avg_score", "goal": "maximize"},
            "parameters": params,
            "command": ["${env}", "${interpreter}", "${program}", "${args}"],
        }


_AT_2 = {"retention": 0.02}

TABLES: dict[str, TableDef] = {
    "table5": TableDef(
        name="table5",
        title="Table 5. Module Ablations for Unified Spatiotemporal Token Compression",
        parameter="modules",
        values=(
            "attn",
            "sim",
            "cluster",
            "attn+sim",
            "attn+cluster",
            "sim+cluster",
            "attn+sim+cluster",
        ),
        fixed={**_AT_2, "merger": "none"},
        paper={
            "attn": (41.4, 46.6, 30.8, 44.7, 45.3, 41.8, 74.2),
            "sim": (51.4, 55.1, 38.8, 50.0, 50.9, 49.2, 87.5),
            "cluster": (52.2, 55.0, 36.3, 48.4, 51.3, 48.6, 86.4),
            "attn+sim": (52.1, 56.8, 38.4, 49.9, 51.2, 49.7, 88.2),
            "attn+cluster": (48.3, 51.4, 33.2, 46.4, 49.5, 45.8, 81.3),
            "sim+cluster": (51.8, 55.5, 38.4, 50.6, 51.0, 49.5, 87.9),
            "attn+sim+cluster": (52.9, 57.2, 39.5, 51.0, 51.3, 50.4, 89.5),
        },
        show=("scorer", "recycler", "cluster_ratio"),
        labels={
            "attn": "Attn",
            "sim": "Sim",
            "cluster": "Cluster",
            "attn+sim": "Attn+Sim",
            "attn+cluster": "Attn+Cluster",
            "sim+cluster": "Sim+Cluster",
            "attn+sim+cluster": "Attn+Sim+Cluster",
        },
    ),
    "s5": TableDef(
        name="s5",
        title="Table S5. Performance comparison of different pruning layer K",
        parameter="paper-layer",
        values=(2, 7, 14, 18, 21),
        fixed={**_AT_2, "merger": "text-aware"},
        paper={
            2: (48.7, 52.7, 36.7, 47.8, 49.4, 47.1, 83.6),
            7: (50.3, 54.0, 36.6, 47.8, 49.5, 47.6, 84.6),
            14: (52.9, 55.7, 39.7, 51.1, 51.4, 50.2, 89.1),
            18: (52.8, 57.6, 40.3, 50.8, 51.8, 50.7, 90.1),
            21: (52.8, 57.1, 39.9, 50.3, 51.7, 50.4, 89.5),
        },
        show=("layer",),
        labels={k: f"K = {k}" for k in (2, 7, 14, 18, 21)},
    ),
    "s6": TableDef(
        name="s6",
        title="Table S6. Comparison of tau",
        parameter="tau",
        values=(0.5, 0.6, 0.7, 0.8, 0.9),
        fixed={**_AT_2, "merger": "none"},
        paper={
            0.5: (49.6, 52.9, 39.4, 49.1, 52.3, 48.7, 86.4),
            0.6: (51.7, 55.9, 40.0, 50.7, 52.7, 50.3, 89.4),
            0.7: (52.9, 57.2, 39.5, 51.0, 51.3, 50.4, 89.5),
            0.8: (53.1, 56.4, 38.2, 49.4, 51.3, 49.7, 88.2),
            0.9: (52.1, 52.4, 37.1, 49.7, 50.7, 48.4, 86.0),
        },
    ),
    "s7": TableDef(
        name="s7",
        title="Table S7. Comparison of Cluster Ratio at 2% Tokens",
        parameter="cluster-ratio",
        values=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
        fixed={**_AT_2, "merger": "none"},
        paper={
            0.1: (51.1, 56.5, 39.0, 50.7, 51.6, 49.7, 88.4),
            0.2: (51.6, 56.8, 38.6, 49.9, 51.3, 49.6, 88.2),
            0.3: (52.9, 57.2, 39.5, 51.0, 51.3, 50.4, 89.5),
            0.4: (52.2, 56.5, 38.4, 49.4, 52.0, 49.7, 88.3),
            0.5: (52.4, 56.5, 38.7, 51.2, 52.0, 50.2, 89.1),
            0.6: (52.8, 57.0, 37.6, 51.0, 51.2, 49.9, 88.7),
            0.7: (52.6, 56.1, 36.1, 50.5, 51.3, 49.3, 87.6),
        },
    ),
    "s8": TableDef(
        name="s8",
        title="Table S8. Comparison of lambda",
        parameter="lam",
        values=(0, 0.25, 0.5, 0.75, 1),
        fixed={**_AT_2, "merger": "text-aware"},
        paper={
            0: (52.6, 57.5, 40.4, 50.6, 51.5, 50.5, 89.7),
            0.25: (52.6, 57.5, 40.1, 50.7, 51.5, 50.5, 89.7),
            0.5: (52.8, 57.6, 40.3, 50.8, 51.8, 50.7, 90.1),
            0.75: (52.5, 57.5, 39.9, 50.5, 51.5, 50.4, 89.5),
            1: (52.6, 57.6, 40.0, 50.6, 51.6, 50.5, 89.7),
        },
    ),
    "sk": TableDef(
        name="sk",
        title="Study k. DPC-KNN neighbour count k (not in the paper) at 2% Tokens",
        parameter="k",
        values=(3, 4, 5, 7, 10),
        fixed={**_AT_2, "merger": "none"},
        paper={},
        labels={k: f"k = {k}" for k in (3, 4, 5, 7, 10)},
    ),
}
#: Table 5's rows with the recycler: the only rows the dpc recycler's ``convention`` changes (the
#: others take no convention), run with both conventions in docs/ablations.md
_T5 = TABLES["table5"]
TABLES["table5c"] = replace(
    _T5,
    name="table5c",
    title="Table 5 (rows with clustering). Module Ablations for Unified Spatiotemporal Token "
    "Compression",
    values=tuple(v for v in _T5.values if "cluster" in v),
)
#: the paper prints no row of these (studies of parameters it does not vary)
NOT_IN_PAPER = ("sk",)


def _paper_settings() -> list[tuple[str, dict[str, Any], tuple[float, ...]]]:
    """(label, config fields, printed row) of every setting the paper prints a row for."""
    from ablations.run import MODULE_ROWS  # run.py imports this module lazily: no cycle
    from ustc.presets import TABLE5_ROWS

    out: list[tuple[str, dict[str, Any], tuple[float, ...]]] = [
        # Table 1's rows at 2 %, printed again as S5's K = 18 and Table 5's full row
        ("Table 1, Ours at 2 %/1 %", {**_AT_2, "merger": "text-aware"}, TABLES["s5"].paper[18]),
        (
            "Table 1, Ours (w/o M) at 2 %",
            {**_AT_2, "merger": "none"},
            TABLES["table5"].paper["attn+sim+cluster"],
        ),
    ]
    marks = {v: k for k, v in MODULE_ROWS.items()}
    t5 = TABLES["table5"]
    for row_marks, config in TABLE5_ROWS.items():
        value = marks[row_marks]
        fields = {
            f: getattr(config, f) for f in ("retention", "scorer", "recycler", "cluster_ratio")
        }
        out.append((f"Table 5, {t5.label(value)}", {**fields, "merger": "none"}, t5.paper[value]))
    for name, field_name in (("s6", "tau"), ("s7", "cluster_ratio"), ("s8", "lam")):
        table = TABLES[name]
        for value in table.values:
            fields = {**table.fixed, field_name: value}
            title = table.title.split(".")[0]
            out.append((f"{title}, {table.label(value)}", fields, table.paper[value]))
    return out


def paper_figure(config: Any) -> tuple[str, tuple[float, ...]] | None:
    """The paper's printed row (five columns, Avg., % of uncompressed; LLaVA-OV-7B) for the
    setting of ``config`` (a :class:`~ustc.config.CompressionConfig`), or None when the paper
    prints none.  The layer K is not compared: on another model it is the paper's K mapped."""
    from ustc.config import CompressionConfig

    defaults = CompressionConfig()
    if config.method != "ustc" or config.params:
        return None
    for label, fields, row in _paper_settings():
        wanted = {f.replace("-", "_"): v for f, v in fields.items()}
        every = {
            f: wanted.get(f, getattr(defaults, f))
            for f in ("retention", "scorer", "pool", "tau", "recycler", "cluster_ratio", "k")
        }
        every["merger"] = wanted.get("merger", defaults.merger)
        if every["merger"] != "none":
            every["keep_ratio"] = defaults.keep_ratio
            every["lam"] = wanted.get("lam", defaults.lam)
        if all(
            getattr(config, f) == v if isinstance(v, str) else abs(getattr(config, f) - v) < 1e-9
            for f, v in every.items()
        ):
            return label, row
    return None


def get_table(name: str) -> TableDef:
    """A table by id, forgiving spelling: ``table5``, ``5``, ``S6``, ``table_s6``."""
    if name in TABLES:
        return TABLES[name]
    key = name.lower().replace("table", "").replace("_", "").replace(" ", "")
    key = "table5" if key == "5" else key
    if key not in TABLES:
        raise ValueError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
    return TABLES[key]


# --------------------------------------------------------------------------------------------
# Sweep files
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass
class Rendered:
    """A table ready to print: header and rows of cells (numbers or text, None = missing)."""

    title: str
    header: list[str]
    rows: list[list[Any]]
    missing: int = 0

    def markdown(self) -> str:
        def cell(v: Any) -> str:
            if v is None:
                return "-"
            if isinstance(v, float):
                return f"{v:.1f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3g}"
            return str(v)

        lines = [
            f"**{self.title}**",
            "",
            "| " + " | ".join(self.header) + " |",
            "|" + "|".join("---" for _ in self.header) + "|",
        ]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        if self.missing:
            lines += ["", f"{self.missing} run(s) not in the store yet (shown as -)."]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(self.header)
        for row in self.rows:
            writer.writerow(["" if v is None else v for v in row])
        return buf.getvalue()


def render(
    table: TableDef,
    records: dict[Any, dict[str, Any] | None],
    baseline: dict[str, Any] | None,
    flops_fmt: str = "{:.3g}",
) -> Rendered:
    """Ours beside the paper's.  ``records``: grid value -> stored run record (None if missing);
    ``baseline``: the uncompressed run."""
    found = [r for r in records.values() if r] + ([baseline] if baseline else [])
    columns: list[str] = []
    for record in found:
        columns += [c for c in record.get("columns") or record["scores"] if c not in columns]
    header = (
        ["Setting"]
        + list(table.show)
        + columns
        + ["Avg.", "%", "FLOPs (T)"]
        + [f"paper {c}" for c in PAPER_COLUMNS]
        + ["paper Avg.", "paper %"]
    )
    base_avg = baseline["avg"] if baseline else None

    def ours(record: dict[str, Any] | None) -> list[Any]:
        if record is None:
            return [None] * (len(table.show) + len(columns) + 3)
        flops = (record.get("flops") or {}).get("tflops")
        pct = None if not base_avg else 100.0 * record["avg"] / base_avg
        return (
            [record["config"].get(f) for f in table.show]
            + [record["scores"].get(c) for c in columns]
            + [record["avg"], pct, None if flops is None else float(flops_fmt.format(flops))]
        )

    rows = [["Vanilla"] + ours(baseline) + list(PAPER_VANILLA)]
    if baseline is not None:
        rows[0][1 : 1 + len(table.show)] = ["-"] * len(table.show)
    for value in table.values:
        printed = table.paper.get(value, (None,) * (len(PAPER_COLUMNS) + 2))
        rows.append([table.label(value)] + ours(records.get(value)) + list(printed))
    missing = sum(1 for r in records.values() if r is None) + (baseline is None)
    return Rendered(table.title, header, rows, missing)


def write_outputs(rendered: Rendered, out_dir: str | Path, stem: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, cs = out / f"{stem}.md", out / f"{stem}.csv"
    md.write_text(rendered.markdown())
    cs.write_text(rendered.csv())
    return [md, cs]


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
    from ablations.sweep import collect, run_flags_parser

    table = get_table(args.table)
    opts, rest = run_flags_parser().parse_known_args(run_flags)
    rendered = collect(table, table.sweep(), opts.store, rest)
    print(rendered.markdown())


if __name__ == "__main__":
    main()
