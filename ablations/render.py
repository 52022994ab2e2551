"""Rendering a table: ours beside the paper's (Markdown, CSV; ``wandb.Table`` in wandb_log)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablations.paper_tables import PAPER_COLUMNS, PAPER_VANILLA, TableDef


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
