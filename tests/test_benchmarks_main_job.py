"""benchmarks/main_job.py: the README's and the docs' time for the main job is the stored
measurement of that command (benchmarks/main_job.json), and the rows the job prints are the ones
the README lists.  The time itself cannot be measured again here; the command is run on a reduced
set (2 questions) to check that it still measures what the record says."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import main_job  # noqa: E402

RECORD = json.loads(main_job.RECORD.read_text())
#: where the time is stated, each next to the command that measured it
PAGES = ["README.md", "docs/index.md", "docs/ablations.md", "docs/lab.md"]


@pytest.mark.parametrize("page", PAGES)
def test_the_stated_time_is_the_stored_measurement(page: str) -> None:
    text = " ".join((ROOT / page).read_text().split())
    quoted = main_job.quote(RECORD)
    assert f"{quoted} cold" in text, f"{page} must state {quoted!r} (benchmarks/main_job.json)"
    assert "benchmarks/main_job.py" in text, f"{page} must name the command that measured it"


def test_the_readme_names_the_machine_and_the_conditions() -> None:
    text = " ".join((ROOT / "README.md").read_text().split())
    machine = RECORD["machine"]
    assert f"{machine['cores']} CPU cores" in text and machine["cpu"] in text
    assert RECORD["note"] and RECORD["note"] in text  # the conditions are part of the record


def test_the_record_is_of_the_shipped_weights_and_the_main_job() -> None:
    assert RECORD["lab_weights"] == main_job.weights_digest(), (
        "the lab weights changed: rerun python benchmarks/main_job.py --repeats 2 --write"
    )
    assert RECORD["command"] == "python ablations/run.py"
    assert all(run["stored_rows"] == 3 for run in RECORD["runs"])  # uncompressed, oracle, run


def test_the_readme_lists_the_rows_the_main_job_prints() -> None:
    labels = [row["label"] for row in RECORD["runs"][-1]["rows"]]
    assert [
        next(p for p in main_job.ROW_PREFIXES if label.startswith(p)) for label in labels
    ] == list(main_job.ROW_PREFIXES)
    text = " ".join((ROOT / "README.md").read_text().split())
    listed = text.split("prints a table of four rows: ", 1)[1]
    order = [
        listed.index(w) for w in ("the uncompressed model", "the paper's figure", "the oracle")
    ]
    assert order == sorted(order) and listed.index("and the run") > order[-1]


def test_the_command_measures_the_main_job_on_a_reduced_set(
    capsys: pytest.CaptureFixture[str],
) -> None:
    record = main_job.main(["--limit", "2"])
    (run,) = record["runs"]
    assert run["seconds"] > 0 and run["stored_rows"] == 3
    labels = [r["label"] for r in run["rows"]]
    assert len(labels) == 4
    assert all(label.startswith(p) for label, p in zip(labels, main_job.ROW_PREFIXES, strict=True))
    assert "main job cold:" in capsys.readouterr().out
