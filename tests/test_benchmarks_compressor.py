"""benchmarks/: the synthetic video, the dense reference, and the compressor script's smoke mode."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from ustc import CompressionConfig, Compressor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compressor as bench  # noqa: E402
from docs_sections import marked_page, replaced_text  # noqa: E402
from reference_impl import dense_compress, reference_compress  # noqa: E402
from synthetic import scene_lengths, structured_video  # noqa: E402


def test_structured_video_has_static_scenes_and_cuts():
    features, attention = structured_video(40, 49, 32, seed=3)
    assert features.shape == (1, 40, 49, 32) and attention.shape == (1, 40, 49)
    again, _ = structured_video(40, 49, 32, seed=3)
    assert torch.equal(features, again)  # deterministic for a seed
    lengths = scene_lengths(40, torch.Generator().manual_seed(3), 4, 12)
    assert sum(lengths) == 40 and all(length <= 12 for length in lengths)
    unit = torch.nn.functional.normalize(features[0], dim=-1)
    adjacent = (unit[:-1] * unit[1:]).sum(-1).median(dim=1).values  # (F - 1,)
    cuts = adjacent < 0.5
    assert 40 // 12 <= int(cuts.sum()) <= 40 // 4  # a cut every 4-12 frames
    assert (adjacent[~cuts] > 0.9).all()  # the background is static within a scene


@pytest.mark.parametrize("scorer", ["attn", "attn+sim"])
@pytest.mark.parametrize("recycler", ["none", "dpc"])
def test_dense_reference_keeps_what_ustc_keeps(scorer, recycler):
    features, attention = structured_video(10, 25, 48, seed=1)
    for retention in (0.04, 0.2):
        config = CompressionConfig(
            retention=retention, scorer=scorer, recycler=recycler, merger="none"
        )
        result = Compressor(config).compress(features, attention)
        indices, assignment = dense_compress(config, features, attention)
        assert torch.equal(indices, result.indices)
        assert torch.equal(assignment, result.assignment)
        assert torch.equal(reference_compress(config, features, attention), indices)


def test_compressor_benchmark_smoke(tmp_path):
    out = tmp_path / "compressor.json"
    report = bench.main(
        ["--smoke", "--device", "cpu", "--sections", "combinations", "baselines", "scaling"]
        + ["--data", "structured", "scenes", "--blocked", "--output", str(out)]
    )
    assert json.loads(out.read_text())["machine"] == report["machine"]
    rows = report["combinations"]
    assert len(rows) == 2 * 6  # two data sets x every scorer x recycler
    compared = [r for r in rows if "identical" in r]
    assert compared and all(r["identical"] and r["loop_identical"] for r in compared)
    assert all(r["blocked_same_as_ustc"] for r in rows if r["recycler"] == "dpc")
    methods = {r["method"] for r in report["baselines"]}
    assert {"ustc", "ustc blocked", "dense reference", *bench.BASELINES} <= methods
    assert [(r["variant"], r["frames"]) for r in report["scaling"]] == [
        ("ustc", 2),
        ("blocked", 2),
        ("ustc", 4),
        ("blocked", 4),
    ]
    assert all(r["median_ms"] > 0 and r["peak_extra_mib"] >= 0 for r in report["scaling"])


def _structure(markdown: str) -> set[str]:
    """The lines of a rendered section with every number, verdict, list of methods and the
    machine's OMP setting replaced: its tables' and sentences' shape."""
    out = set()
    for line in markdown.splitlines():
        line = re.sub(r"\d+(\.\d+)?", "#", line)
        line = re.sub(r"(\*\*not met\*\*|met)\)", "VERDICT)", line)
        line = re.sub(r"faster than ustc here: [^.]*\.", "faster than ustc here: LIST.", line)
        out.add(re.sub(r", OMP_WAIT_POLICY=\w+\.", ", OMP_WAIT_POLICY=SETTING.", line))
    return out


def test_docs_cpu_section_is_what_its_command_renders_from_its_figures():
    """docs/performance.md's CPU tables are ``compressor.py --cpu-figures --write``'s output:
    rendered again from the figures it stored, they are the same text, and the command named in
    the section is the one that writes it."""
    import cpu_figures

    doc = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
    report = json.loads(cpu_figures.FIGURES.read_text())
    assert cpu_figures.section(doc) == cpu_figures.render(report)
    assert f"`{cpu_figures.COMMAND}`" in cpu_figures.section(doc)
    frames = sorted({r["frames"] for r in report["scaling"]})
    assert frames == [16, 32, 64, 128, 256]
    assert {r["method"] for r in report["compare"]} == set(cpu_figures.METHODS)


def test_cpu_figures_quick_run_has_the_docs_tables_shape(tmp_path):
    """The command at toy sizes gives the tables the docs hold (same methods, columns, text):
    a change of the command's tables that the docs did not follow fails here."""
    import cpu_figures

    doc = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
    copy = marked_page(tmp_path / "performance.md", cpu_figures)
    original = cpu_figures.FIGURES
    try:
        cpu_figures.FIGURES = tmp_path / "figures.json"
        report = bench.main(["--cpu-figures", "--quick", "--write", str(copy)])
        assert json.loads(cpu_figures.FIGURES.read_text())["compare"] == report["compare"]
    finally:
        cpu_figures.FIGURES = original
    replaced_text(copy)
    assert _structure(cpu_figures.section(copy)) == _structure(cpu_figures.section(doc))


def test_fresh_process_measures_time_and_memory():
    import cpu_figures

    point = cpu_figures.fresh_process("ustc", 2, 16, 64)
    assert point["ms"] > 0 and point["peak_mib"] >= 0


def test_cpu_figures_options_need_cpu_figures():
    with pytest.raises(SystemExit):
        bench.main(["--quick"])
