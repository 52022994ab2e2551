"""Every published table of the docs, the one command that produces it, and the check that they
still agree.

    python ablations/docs_tables.py --list             # the tables, their pages and commands
    python ablations/docs_tables.py table5             # print Table 5's block (full lab split)
    python ablations/docs_tables.py table5 --write     # write it into docs/ablations.md
    python ablations/docs_tables.py --all --write      # every table (what the lead runs)

A published table sits in its page between ``<!-- docs-table NAME -->`` and
``<!-- /docs-table NAME -->``; the block starts with the command that wrote it.  ``--write`` also
regenerates the table on a reduced set (the first :data:`REDUCED_LIMIT` questions of the lab test
split) and stores that output, with the answer given to every question, as the table's
fingerprint in ``ablations/published/NAME.reduced.md``.  ``tests/test_docs_tables.py`` regenerates
every fingerprint and fails when one differs: the code no longer produces the committed table,
which is then regenerated with the command in its block.

Runs go through ``ablations/sweep.py``'s machinery and the results store (``--store``), so a
table whose runs are stored is rendered without evaluating anything.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablations import run as runner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = Path(__file__).resolve().parent / "published"
#: questions of the reduced set the fingerprints are computed on (one per family, twice)
REDUCED_LIMIT = 12
LETTERS = "ABCD"


@dataclass
class Output:
    """A generated table: its Markdown rows (``markdown``) and the fingerprint rows (label,
    figure, answers) that the reduced-set check compares."""

    markdown: str
    fingerprint: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class DocTable:
    """A published table: where it is, what produces it, and whether it can be produced yet.

    requires: a strategy parameter the command needs (e.g. the dpc recycler's ``convention``,
              issue 16); while no registered strategy takes it, the table is pending: its block
              says so and the check skips it.
    """

    name: str
    page: str
    title: str
    generate: Callable[[int | None, str], Output]
    requires: str | None = None

    @property
    def command(self) -> str:
        return f"python ablations/docs_tables.py {self.name} --write"

    def available(self) -> bool:
        if self.requires is None:
            return True
        return self.requires in runner.strategy_params() or self.requires in runner.CONFIG_FIELDS


# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------


def _answers(record: dict[str, Any] | None) -> str:
    if not record:
        return "-"
    details = record.get("details") or {}
    lab = details.get("lab") or {}
    return str(lab.get("answers", "-"))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def sweep_table(name: str, extra: Sequence[str] = ()) -> Callable[[int | None, str], Output]:
    """A table of ``ablations/tables.py`` (``table5``, ``s5`` ... ``sk``) on the lab: one row per
    grid value, lab Avg. and % of uncompressed beside the paper's."""

    def generate(limit: int | None, store: str) -> Output:
        from ablations.paper_tables import get_table
        from ablations.sweep import run_sweep

        table = get_table(name)
        flags = [*extra, *([f"--limit={limit}"] if limit is not None else [])]
        run_sweep(name, flags, store_path=store, wandb="disabled", progress=False, out_dir=_tmp())
        sweep = table.sweep()
        records, baseline = _records(table, sweep, store, flags)
        short = table.title.split(".")[0]
        lines = [
            "| Table | setting | lab Avg. | % of uncompressed | paper Avg. | paper % |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        base = baseline["avg"] if baseline else None
        prints = [("uncompressed", _pct(base), _answers(baseline))]
        for value in table.values:
            record = records.get(value)
            avg = None if record is None else record["avg"]
            pct = None if avg is None or not base else 100.0 * avg / base
            paper = table.paper.get(value)
            lines.append(
                f"| {short} | {table.label(value)} | {_pct(avg)} | {_pct(pct)} | "
                + (f"{paper[-2]:.1f} | {paper[-1]:.1f} |" if paper else "- | - |")
            )
            prints.append(
                (table.label(value), f"{avg:.2f}" if avg is not None else "-", _answers(record))
            )
        return Output("\n".join(lines), prints)

    return generate


def _records(
    table: Any, sweep: dict[str, Any], store: str, flags: Sequence[str]
) -> tuple[dict[Any, dict[str, Any] | None], dict[str, Any] | None]:
    from ablations.store import ResultStore
    from ablations.sweep import plans_for
    from ablations.sweep_files import expand_grid

    stored = ResultStore(store).records()
    plans = plans_for(sweep, flags, store)
    out = {
        point[table.parameter]: stored.get(plan.key)
        for point, plan in zip(expand_grid(sweep), plans, strict=True)
    }
    return out, stored.get(plans[0].baseline_key()) if plans else None


def _tmp() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="ustc-docs-tables-")


def lab_table(limit: int | None, store: str) -> Output:
    """docs/lab.md: the shipped lab model uncompressed, the oracle and random selections at 2 %,
    ours at 2 % without and with merging, per question family."""
    from ustc.lab.evaluate import evaluate, oracle_selector, random_selector, samples
    from ustc.lab.model import default_config, load_model
    from ustc.lab.scenes import FAMILIES

    model = load_model()
    data = samples("test", limit)
    rows = [
        ("uncompressed", evaluate(None, model=model, data=data, progress=False)),
        (
            "oracle 2 % (`oracle_selector(0.02)`)",
            evaluate(None, model=model, data=data, progress=False, selector=oracle_selector(0.02)),
        ),
        (
            "random 2 % (`random_selector(0.02)`)",
            evaluate(None, model=model, data=data, progress=False, selector=random_selector(0.02)),
        ),
        (
            "ours 2 % without merging",
            evaluate(default_config(merger="none"), model=model, data=data, progress=False),
        ),
        (
            f"ours 2 % / 1 % (default config, K = {default_config().layer})",
            evaluate(default_config(), model=model, data=data, progress=False),
        ),
    ]
    head = ["condition", "overall", *FAMILIES, "visual tokens in LLM"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 2) + " --- |"]
    prints = []
    for label, res in rows:
        tokens = f"{res.tokens['llm_visual']:.0f}"
        if res.tokens.get("after_merge", res.tokens["llm_visual"]) != res.tokens["llm_visual"]:
            tokens += f" -> {res.tokens['after_merge']:.0f}"
        fams = [f"{res.per_family.get(f, float('nan')):.1f}" for f in FAMILIES]
        lines.append(f"| {label} | {res.overall:.1f} | " + " | ".join(fams) + f" | {tokens} |")
        prints.append((label, f"{res.overall:.2f}", "".join(LETTERS[a] for a in res.answers)))
    return Output("\n".join(lines), prints)


def baselines_table(limit: int | None, store: str) -> Output:
    """docs/baselines.md: every method at 10/5/2/1 % on the lab (``ablations/compare.py``),
    overall accuracy."""
    from ablations import compare
    from ustc.lab.model import load_model

    rows = compare.run(
        list(compare.METHODS),
        list(compare.RETENTIONS),
        limit=limit,
        split="test",
        model=load_model(),
        progress=False,
        log=lambda _: None,
    )
    labels = {
        "FastV": "FastV (100 % / share)",
        "Random": "random",
        "Uniform": "uniform",
        "VisionZip": "VisionZip",
        "FastVID": "FastVID-style",
        "STTM": "STTM",
        "HoliTom": "HoliTom-style (with last-token merging)",
        "Ours (w/o M)": "ours, without merging",
        "Ours": "ours (text-aware merging, K = 3)",
        "Oracle": "*oracle: keeps the evidence (not a method)*",
    }
    by_label: dict[str, list[Any]] = {}
    for row in rows[1:]:
        by_label.setdefault(row.label, []).append(row)
    methods = [group for label, group in by_label.items() if label != "Oracle"]
    best = [max(r[i].overall for r in methods) for i in range(len(compare.RETENTIONS))]
    head = "| method | " + " | ".join(f"{r * 100:g} %" for r in compare.RETENTIONS) + " |"
    lines = [head, "| --- |" + " ---: |" * len(compare.RETENTIONS)]
    prints = [("uncompressed", f"{rows[0].overall:.2f}", "-")]
    for label, group in by_label.items():
        cells = [
            f"**{r.overall:.1f}**"
            if r.overall == best[i] and label != "Oracle"
            else f"{r.overall:.1f}"
            for i, r in enumerate(group)
        ]
        lines.append(f"| {labels.get(label, label)} | " + " | ".join(cells) + " |")
        prints += [(f"{label} {r.retention}", f"{r.overall:.2f}", "-") for r in group]
    lines += ["", f"Uncompressed: {rows[0].overall:.1f}."]
    return Output("\n".join(lines), prints)


TABLES: dict[str, DocTable] = {
    t.name: t
    for t in (
        DocTable("table5", "docs/ablations.md", "Table 5 on the lab", sweep_table("table5")),
        DocTable("s5", "docs/ablations.md", "Table S5 on the lab", sweep_table("s5")),
        DocTable("s6", "docs/ablations.md", "Table S6 on the lab", sweep_table("s6")),
        DocTable("s7", "docs/ablations.md", "Table S7 on the lab", sweep_table("s7")),
        DocTable("s8", "docs/ablations.md", "Table S8 on the lab", sweep_table("s8")),
        DocTable("sk", "docs/ablations.md", "k (DPC-KNN neighbours) on the lab", sweep_table("sk")),
        DocTable(
            "table5-tcformer",
            "docs/ablations.md",
            "Table 5 on the lab, dpc convention tcformer",
            sweep_table("table5c", ["--convention=tcformer"]),
            requires="convention",
        ),
        DocTable(
            "s7-tcformer",
            "docs/ablations.md",
            "Table S7 on the lab, dpc convention tcformer",
            sweep_table("s7", ["--convention=tcformer"]),
            requires="convention",
        ),
        DocTable("lab", "docs/lab.md", "the lab model's figures", lab_table),
        DocTable("baselines", "docs/baselines.md", "every method on the lab", baselines_table),
    )
}


# --------------------------------------------------------------------------------------------
# Blocks in the pages, fingerprints
# --------------------------------------------------------------------------------------------


def block_pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"<!-- docs-table {re.escape(name)} -->\n(.*?)<!-- /docs-table {re.escape(name)} -->",
        re.S,
    )


def block_text(table: DocTable, output: Output) -> str:
    return f"Generated by `{table.command}`:\n\n{output.markdown}\n"


def pending_text(table: DocTable) -> str:
    return (
        f"Not generated yet: `{table.command}` needs the `{table.requires}` parameter of a "
        "registered strategy (issue 16).\n"
    )


LEGACY = "Not regenerated yet:"


def legacy_text(table: DocTable, measured: str, command: str) -> str:
    """The first line of a block that still holds figures measured before this tool existed
    (with ``command``, on ``measured``); ``tests/test_docs_tables.py`` skips its check, naming
    the command that replaces the block."""
    return (
        f"{LEGACY} measured on {measured} with `{command}`, before this tool; "
        f"`{table.command}` rewrites them and stores their fingerprint.\n"
    )


def fingerprint_text(table: DocTable, output: Output, limit: int) -> str:
    lines = [
        f"<!-- fingerprint of {table.name}: `python ablations/docs_tables.py {table.name} "
        f"--limit {limit}`; written by `{table.command}` -->",
        "",
        "| row | figure | answers |",
        "| --- | ---: | --- |",
    ]
    lines += [
        f"| {label} | {figure} | {answers} |" for label, figure, answers in output.fingerprint
    ]
    return "\n".join(lines) + "\n"


def fingerprint_path(table: DocTable) -> Path:
    return PUBLISHED / f"{table.name}.reduced.md"


def write_block(table: DocTable, text: str) -> Path:
    page = ROOT / table.page
    content = page.read_text()
    pattern = block_pattern(table.name)
    if not pattern.search(content):
        raise ValueError(
            f"{table.page} has no block for {table.name}: add the lines "
            f"'<!-- docs-table {table.name} -->' and '<!-- /docs-table {table.name} -->'"
        )
    new = pattern.sub(
        lambda _: f"<!-- docs-table {table.name} -->\n{text}<!-- /docs-table {table.name} -->",
        content,
    )
    page.write_text(new)
    return page


def regenerate(table: DocTable, store: str, write: bool, limit: int | None = None) -> Output:
    """The table on the full lab split (or the first ``limit`` questions); with ``write``, into
    its page, plus its fingerprint on the reduced set."""
    if not table.available():
        raise ValueError(
            f"{table.name} needs the {table.requires!r} parameter, which no registered strategy "
            "takes yet (issue 16: the dpc recycler's convention option)"
        )
    output = table.generate(limit, store)
    if write:
        if limit is not None:
            raise ValueError("--write publishes the full split's table; drop --limit")
        write_block(table, block_text(table, output))
        reduced = table.generate(REDUCED_LIMIT, store)
        PUBLISHED.mkdir(parents=True, exist_ok=True)
        fingerprint_path(table).write_text(fingerprint_text(table, reduced, REDUCED_LIMIT))
    return output


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ablations/docs_tables.py",
        description="Regenerate a published table of the docs from its command.",
    )
    parser.add_argument("table", nargs="?", help=f"one of {', '.join(TABLES)}")
    parser.add_argument("--all", action="store_true", help="every table that can be generated")
    parser.add_argument("--write", action="store_true", help="write the block and fingerprint")
    parser.add_argument("--limit", type=int, default=None, help="first N lab test questions")
    parser.add_argument("--store", default=runner.DEFAULT_STORE, help="JSONL results store")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list or not (args.table or args.all):
        for t in TABLES.values():
            state = "" if t.available() else f"  (pending: needs {t.requires})"
            print(f"{t.name:16s} {t.page:20s} {t.command}{state}")
        return
    if args.table and args.table not in TABLES:
        parser.error(f"unknown table {args.table!r}; known: {', '.join(TABLES)}")
    chosen = [t for t in TABLES.values() if t.available()] if args.all else [TABLES[args.table]]
    failed: list[str] = []
    for table in chosen:  # each table on its own: one that fails leaves the others written
        try:
            output = regenerate(table, args.store, args.write, args.limit)
        except Exception as exc:
            if not args.all:
                if isinstance(exc, ValueError):
                    parser.error(str(exc))
                raise
            failed.append(f"{table.name}: {type(exc).__name__}: {exc}")
            print(f"{table.name} ({table.page}) FAILED: {exc}\n", file=sys.stderr, flush=True)
            continue
        print(f"{table.name} ({table.page}):\n\n{output.markdown}\n", flush=True)
    if failed:
        parser.exit(1, "tables not regenerated:\n  " + "\n  ".join(failed) + "\n")


if __name__ == "__main__":
    main()
