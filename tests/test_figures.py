"""The docs' figures (`analysis/figures.py`): each is shown on its page, each matches the inputs it
was made from (a figure whose table, FLOPs, lab weights or settings changed is stale until
`python -m analysis.figures --write` runs), and its record is what it draws."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from analysis import figures

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _record(figure: figures.DocFigure) -> dict:
    return json.loads(figure.record.read_text())


@pytest.mark.parametrize("name", list(figures.FIGURES_BY_NAME))
def test_every_figure_matches_its_inputs(name):
    figure = figures.FIGURES_BY_NAME[name]
    assert figures.stale(figure) == [], f"run python -m analysis.figures --write {name}"
    record = _record(figure)
    assert record["command"] == f"python -m analysis.figures --write {name}"
    data = record["data"] if figure.uses_lab_model else record["inputs"]
    assert figures.digest(data) == record["data_sha256"]
    assert figures.digest(record["inputs"]) == record["inputs_sha256"]


def test_the_paper_figures_each_have_one():
    papers = " ".join(f.paper for f in figures.FIGURE_LIST)
    for paper in (
        "Fig. 4",
        "Fig. 5",
        "Fig. 6",
        "Fig. S1 (FLOPs side)",
        "Fig. S1 (accuracy side)",
        "Fig. S3",
        "Table 1",
        "Table 3",
    ):
        assert paper in papers


def test_every_figure_is_shown_on_its_page_and_on_the_figures_page():
    gallery = (DOCS / "analysis.md").read_text()
    for figure in figures.FIGURE_LIST:
        depth = figure.page.count("/")
        link = "../" * depth + f"figures/{figure.name}.png"
        assert f"]({link})" in (DOCS / figure.page).read_text(), (figure.page, link)
        assert f"](figures/{figure.name}.png)" in gallery, figure.name
    made = {f"{f.name}.{ext}" for f in figures.FIGURE_LIST for ext in ("png", "json")}
    assert {p.name for p in figures.FIGURES.iterdir()} == made, "a file no figure makes"


def _copy(figure: figures.DocFigure, folder: Path) -> None:
    for path in (figure.png, figure.record):
        shutil.copy(path, folder / path.name)


def test_a_changed_table_makes_its_figure_stale(tmp_path, monkeypatch):
    """fig5 is made from docs/ablations.md's tables: change one number there, it is stale."""
    fig5 = figures.FIGURES_BY_NAME["fig5"]
    (tmp_path / "docs").mkdir()
    page = (DOCS / "ablations.md").read_text()
    changed = page.replace(
        "| Table S6 | tau = 0.5 | 57.8 | 58.2 |", "| Table S6 | tau = 0.5 | 57.8 | 58.3 |"
    )
    assert changed != page
    (tmp_path / "docs" / "ablations.md").write_text(changed)
    monkeypatch.setattr(figures, "ROOT", tmp_path)
    assert figures.stale(fig5) == ["fig5: its inputs changed"]


def test_retrained_lab_weights_or_a_new_png_make_a_figure_stale(tmp_path, monkeypatch):
    fig4 = figures.FIGURES_BY_NAME["fig4"]
    shipped = figures.LAB_WEIGHTS
    weights = tmp_path / "weights"
    shutil.copytree(figures.LAB_WEIGHTS, weights)
    monkeypatch.setattr(figures, "LAB_WEIGHTS", weights)
    assert figures.stale(fig4) == []
    (weights / "config.json").write_text((weights / "config.json").read_text() + "\n")
    assert figures.stale(fig4) == ["fig4: its inputs changed"]
    # a PNG replaced without its record
    monkeypatch.setattr(figures, "LAB_WEIGHTS", shipped)
    folder = tmp_path / "figures"
    folder.mkdir()
    _copy(fig4, folder)
    monkeypatch.setattr(figures, "FIGURES", folder)
    (folder / "fig4.png").write_bytes((folder / "fig4.png").read_bytes() + b"\0")
    assert figures.stale(fig4) == ["fig4: the PNG is not the one its record describes"]
    (folder / "fig4.png").unlink()
    assert figures.stale(fig4) == ["fig4: not written yet"]


def test_other_lab_videos_make_a_lab_figure_stale(monkeypatch):
    """A change of the scene generator (other frames for the same index) is a changed input."""
    from ustc.lab import scenes

    fig6 = figures.FIGURES_BY_NAME["fig6"]
    make_sample = scenes.make_sample

    def brighter(split, index, *args, **kwargs):
        sample = make_sample(split, index, *args, **kwargs)
        if index == 3:
            sample.frames = sample.frames.copy()
            sample.frames[0, 0, 0] += 1
        return sample

    monkeypatch.setattr(scenes, "make_sample", brighter)
    assert figures.stale(fig6) == ["fig6: its inputs changed"]


def test_the_check_command_names_stale_figures(tmp_path, monkeypatch, capsys):
    assert figures.main(["--check", "fig5", "frames"]) == 0
    monkeypatch.setattr(figures, "FIGURES", tmp_path)
    assert figures.main(["--check", "frames"]) == 1
    assert "frames: not written yet" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        figures.main(["--check", "fig7"])
    assert exit_info.value.code == 2
    assert "unknown figure fig7; known: fig4" in capsys.readouterr().err


def test_write_records_what_it_drew(tmp_path, monkeypatch):
    """--write makes the PNG and a record whose fingerprints are those of the inputs."""
    monkeypatch.setattr(figures, "FIGURES", tmp_path)
    frames = figures.FIGURES_BY_NAME["frames"]
    png = figures.write(frames)
    record = _record(frames)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert record["png_sha256"] == figures.file_digest(png)
    assert record["inputs_sha256"] == figures.digest(frames.inputs())
    assert figures.stale(frames) == []
    # the FLOPs figure draws the counts of ustc.flops and the paper's printed Table 3
    inputs = record["inputs"]
    assert inputs["paper"] == [
        [16, 19.0, "vanilla"],
        [64, 1.7, "ours 2%/1%"],
        [96, 2.2, "ours 2%/1%"],
        [128, 2.8, "ours 2%/1%"],
    ]
    for f, tera, label in inputs["paper"]:
        assert f"{inputs['tera'][label][inputs['frames'].index(f)]:.1f}" == f"{tera:.1f}"


@pytest.mark.parametrize("name", ["fig4", "fig6"])
def test_lab_figures_draw_from_their_record(name):
    """The stored numbers are enough to draw a lab figure (no model run)."""
    figure = figures.FIGURES_BY_NAME[name]
    fig = figure.draw(_record(figure)["data"])
    assert fig.axes


def test_the_token_maps_record_holds_whole_compressions():
    """Fig. S3's record: per method, a compression whose retained and recycled tokens are the
    budget (what the map draws as green and purple boxes)."""
    from analysis.token_maps import token_roles

    data = _record(figures.FIGURES_BY_NAME["figS3"])["data"]
    assert list(data["rows"]) == ["Ours (Attn+Sim+Cluster)", "Attention only"]
    for stored in data["rows"].values():
        roles = token_roles(figures._result(stored))
        assert int(roles.retained.sum() + roles.recycled.sum()) == data["budget"] == 80
        assert roles.retained.shape == (1, data["tokens"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fig4", "fig6", "figS1acc", "figS3"])
def test_lab_figures_numbers_are_what_the_lab_gives_now(name, request):
    """The lab figures' numbers computed again from the lab (minutes): a change of the code
    that moves them makes the figure stale."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("runs the lab model for a minute or more: select it with -m slow")
    figure = figures.FIGURES_BY_NAME[name]
    data = figure.compute(figure.inputs())
    assert figures.digest(data) == _record(figure)["data_sha256"], (
        f"run python -m analysis.figures --write {name}"
    )


def test_figs1_accuracy_side_runs_its_grid_on_a_reduced_set():
    """Fig. S1's accuracy side on 4 questions: one line per K, one point per R, each a share of
    the uncompressed accuracy, and the no-merge line: the same code the full figure runs."""
    params = {**figures.FIGS1_ACC, "limit": 4, "layers": [1, 3], "keep": [0.25, 0.75]}
    data = figures.figs1_acc_data({"params": params})
    assert data["keep"] == [0.25, 0.75]
    assert list(data["pct"]) == ["1", "3"]
    assert all(len(ys) == 2 for ys in data["pct"].values())
    assert data["uncompressed"] > 0
    values = [v for ys in data["pct"].values() for v in ys] + [data["no_merge"]]
    assert all(0 <= v <= 100 * 100 / data["uncompressed"] for v in values)
