"""benchmarks/ask_many.py: the figures of docs/performance.md's "Compress once, ask many" section
are the render of the committed JSON the script wrote, and the script runs on a reduced set."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import ask_many  # noqa: E402
from docs_sections import marked_page, replaced_text  # noqa: E402


def test_the_performance_page_shows_the_committed_figures():
    result = json.loads((ROOT / "benchmarks" / "ask_many-cpu.json").read_text())
    page = (ROOT / "docs" / "performance.md").read_text()
    section = page.split(ask_many.START, 1)[1].split(ask_many.END, 1)[0]
    assert section.strip() == ask_many.render(result).strip()
    assert [row["questions"] for row in result["rows"]] == [1, 3, 10]


def test_the_script_prints_its_table_on_a_reduced_set(tmp_path, capsys):
    page = marked_page(tmp_path / "page.md", ask_many)
    out = tmp_path / "result.json"
    rows = ask_many.main(
        [
            "--counts",
            "1",
            "2",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--no-memory",
            "--batch",
            "--retention",
            "0.02",
            "--output",
            str(out),
            "--update-docs",
            str(page),
        ]
    )
    printed = capsys.readouterr().out
    assert "alone s" in printed and "predicted" in printed and "batch s" in printed
    assert [row["questions"] for row in rows] == [1, 2]
    assert all(row["batch_s"] > 0 for row in rows)
    assert rows[0]["predicted_saved_s"] == 0.0 and rows[1]["predicted_saved_s"] > 0
    text = replaced_text(page)
    rendered = ask_many.render(json.loads(out.read_text()))
    assert rendered in text and "| batch (s) |" in rendered


def test_a_memory_worker_asks_a_batch(capsys):
    """The fresh process that measures the peak memory of one ask_batch (--batch)."""
    ask_many.main(["--worker", "batch", "2", "--new-tokens", "2", "--retention", "0.02"])
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) > 0
