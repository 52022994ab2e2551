"""benchmarks/gpu.sh: the prepared H200 run, checked in its smoke mode (the same steps on the CPU
at toy sizes), and its JSON rendered beside the paper's Table 6 (analysis/efficiency.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import efficiency

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    # the interpreter running the tests, not whichever python3 is first on PATH: inside a venv
    # that is not activated, PATH's python3 is the system one, without torch
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return out, result


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_smoke_mode_writes_every_file(smoke_run):
    out, result = smoke_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "failed: none" in result.stdout
    written = {p.name for p in out.iterdir()}
    assert written == {
        "env.json",
        "gpu.log",
        "pytest.xml",
        "compressor-bfloat16.json",
        "compressor-scaling.json",
        "compressor-float32.json",
        "efficiency-sdpa.json",
    }
    assert len(written) <= 8  # what the device tool brings back from $OUT
    env = json.loads((out / "env.json").read_text())
    assert env["device"] == "cpu" and env["bf16_products_with_float32_output"] is False
    bf16 = json.loads((out / "compressor-bfloat16.json").read_text())
    assert all(r["identical"] for r in bf16["combinations"] if "identical" in r)
    table = json.loads((out / "efficiency-sdpa.json").read_text())
    assert [r["retention"] for r in table["rows"]] == [1.0, 0.1, 0.1]
    assert table["rows"][0]["reference"] is True


def test_gpu_report_renders_the_smoke_run_beside_table6(smoke_run):
    out, _ = smoke_run
    report = efficiency.gpu_report(out)
    assert "Measured on cpu" in report
    assert "| structured | ustc blocked |" in report and "| scenes | holitom |" in report
    assert "| blocked | 4 | 64 |" in report  # the scaling table
    assert "Table 6 on the 7B architecture, random weights, sdpa" in report
    assert "| Ours | 74.0 | 31.3 (22×) | 473.8 | 35.7 | 50.7 |" in report  # the paper beside it


def test_gpu_report_without_figures_says_how_to_measure(tmp_path):
    report = efficiency.gpu_report(tmp_path)
    assert report.startswith("**Not measured yet.**")
    # what a user with a CUDA machine types, needs and gets: no internal tool's call
    assert efficiency.GPU_COMMAND in report and efficiency.GPU_RENDER in report
    assert "bash benchmarks/gpu.sh OUT_DIR" in report and "CUDA build of torch" in report
    assert "loads no weights" in report and "pytest and hypothesis" in report
    assert all(f"`{name}`" in report for name in efficiency.GPU_FILES)
    assert "run(" not in report and "session" not in report and "`device`" not in report


def test_performance_page_shows_the_committed_gpu_figures(tmp_path):
    page = ROOT / "docs" / "performance.md"
    copy = tmp_path / "performance.md"
    copy.write_text(page.read_text())
    assert not efficiency.update_docs(copy, efficiency.GPU_RESULTS), (
        f"docs/performance.md is out of date: run {efficiency.GPU_RENDER}"
    )
