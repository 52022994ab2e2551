"""benchmarks/efficiency.py on the CPU: docs/performance.md's TTFT section is the render of the
committed JSON the script wrote, and the script runs on a reduced set."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import efficiency  # noqa: E402
from docs_sections import marked_page, replaced_text  # noqa: E402


def test_the_performance_page_shows_the_committed_figures():
    result = json.loads((ROOT / "benchmarks" / "cpu" / "efficiency-small.json").read_text())
    page = (ROOT / "docs" / "performance.md").read_text()
    section = page.split(efficiency.START, 1)[1].split(efficiency.END, 1)[0]
    assert section.strip() == efficiency.render(result).strip()
    assert result["rounds"] >= 3 and result["size"] == "small"
    assert [row["retention"] for row in result["rows"]] == [1.0] + [
        r for r in (0.1, 0.05, 0.02, 0.01) for _ in range(2)
    ]


def test_the_script_writes_its_table_on_a_reduced_set(tmp_path):
    page = marked_page(tmp_path / "page.md", efficiency)
    out = tmp_path / "result.json"
    rows = efficiency.main(
        "--size small --frames 1 --retentions 0.02 --repeats 1 --rounds 2 --new-tokens 2".split()
        + ["--output", str(out), "--update-docs", str(page)]
    )
    assert [row["method"] for row in rows] == ["vanilla", "ours 2% (w/o M)", "ours 2%/1%"]
    result = json.loads(out.read_text())
    assert result["rounds"] == 2 and result["rows"] == rows
    text = replaced_text(page)
    assert efficiency.render(result) in text
    assert "goal 4" in text  # the verdict is read off the 2 % rows


def test_a_page_without_the_section_is_refused_before_any_model_is_built(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="cpu-efficiency:start"):
        efficiency.main(["--update-docs", str(page), "--size", "7b"])
