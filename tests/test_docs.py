"""The docs site: it builds without a warning, every page is in the nav, every code symbol a page
names exists, every worked example prints what the page says; CITATION.cff is valid CFF 1.2."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: `path.py:name` references in the docs, to code of this repository
SYMBOL = re.compile(r"`((?:ustc|tests|analysis|ablations)/[\w/]+\.py):(\w+)`")
#: a worked example: a python block, then "Output:", then a text block with what it prints
EXAMPLE = re.compile(r"```python\n(.*?)```\s*\nOutput:\s*\n\s*```text\n(.*?)```", re.S)


def _nav_files(nav: list) -> list[str]:
    files = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        files += _nav_files(value) if isinstance(value, list) else [value]
    return files


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_files(config["nav"])
    pages = {p.relative_to(DOCS).as_posix() for p in _pages()}
    assert len(nav) == len(set(nav)), "a page is listed twice in the nav"
    missing = sorted(set(nav) - pages)
    assert not missing, f"mkdocs.yml lists pages that do not exist yet: {missing}"
    assert not sorted(pages - set(nav)), f"pages missing from the nav: {sorted(pages - set(nav))}"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed (pip install -e '.[docs]')",
)
def test_the_site_builds_without_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "WARNING" not in log, log
    assert (tmp_path / "index.html").is_file()
    assert (tmp_path / "stages" / "merging" / "index.html").is_file()
    assert (tmp_path / "assets" / "architecture.png").is_file()


def missing_symbols(text: str) -> list[str]:
    """The `path.py:name` references of ``text`` whose file or name does not exist."""
    missing = []
    for path, name in SYMBOL.findall(text):
        if not (ROOT / path).is_file():
            missing.append(f"{path} (no such file)")
        elif path.startswith("ustc/"):
            module = importlib.import_module(path[:-3].replace("/", "."))
            if not hasattr(module, name):
                missing.append(f"{path}:{name}")
        else:  # tests and scripts are not imported: their top level may have side effects
            pattern = rf"^(def|class) {name}\b|^{name}\s*[:=]"
            if not re.search(pattern, (ROOT / path).read_text(), re.M):
                missing.append(f"{path}:{name}")
    return missing


@pytest.mark.parametrize("page", [p.relative_to(DOCS).as_posix() for p in _pages()])
def test_every_code_symbol_a_page_names_exists(page):
    assert missing_symbols((DOCS / page).read_text()) == [], page


def test_the_symbol_check_finds_missing_names():
    text = (
        "`ustc/pool.py:greedy_retention_pool` `ustc/pool.py:greedy_pool_typo` "
        "`tests/test_pool.py:test_greedy_pool_matches_reference` `tests/test_pool.py:test_nope` "
        "`analysis/params.py:find_series` `ustc/nothing.py:x`"
    )
    assert missing_symbols(text) == [
        "ustc/pool.py:greedy_pool_typo",
        "tests/test_pool.py:test_nope",
        "ustc/nothing.py (no such file)",
    ]


def _examples() -> list[tuple[str, str, str]]:
    out = []
    for page in _pages():
        for i, (code, expected) in enumerate(EXAMPLE.findall(page.read_text())):
            out.append((f"{page.relative_to(DOCS).as_posix()}#{i + 1}", code, expected))
    return out


def test_worked_examples_print_what_the_pages_say():
    examples = _examples()
    pages = {name.split("#")[0] for name, _, _ in examples}
    assert {
        "architecture.md",
        "stages/scoring.md",
        "stages/pool.md",
        "stages/recycle.md",
        "stages/merging.md",
        "adding-a-strategy.md",
    } <= pages
    marker = "=====8<====="
    # one interpreter for all (imports once); examples register strategies, so not this one
    runner = (
        "import json, sys\n"
        f"for name, code in json.loads(sys.stdin.read()):\n"
        "    exec(compile(code, name, 'exec'), {'__name__': '__docs__'})\n"
        f"    print({marker!r}, flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", runner],
        input=json.dumps([[name, code] for name, code, _ in examples]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    outputs = result.stdout.split(marker + "\n")[: len(examples)]
    assert len(outputs) == len(examples)
    for (name, _, expected), got in zip(examples, outputs, strict=True):
        assert got.rstrip() == expected.rstrip(), (
            f"{name} prints:\n{got}\nthe page says:\n{expected}"
        )


# ----------------------------------------------------------------------------- CITATION.cff

#: CFF 1.2.0 schema (https://citation-file-format.github.io/1.2.0/schema.json): top-level keys
CFF_KEYS = {
    "abstract",
    "authors",
    "cff-version",
    "commit",
    "contact",
    "date-released",
    "doi",
    "identifiers",
    "keywords",
    "license",
    "license-url",
    "message",
    "preferred-citation",
    "references",
    "repository",
    "repository-artifact",
    "repository-code",
    "title",
    "type",
    "url",
    "version",
}
CFF_PERSON_KEYS = {
    "address",
    "affiliation",
    "alias",
    "city",
    "country",
    "email",
    "family-names",
    "fax",
    "given-names",
    "name-particle",
    "name-suffix",
    "orcid",
    "post-code",
    "region",
    "tel",
    "website",
}
PAPER_AUTHORS = [
    ("Du", "Junhao"),
    ("Xue", "Jialong"),
    ("Li", "Anqi"),
    ("Dai", "Jincheng"),
    ("Lu", "Guo"),
]
PAPER_TITLE = "Unified Spatiotemporal Token Compression for Video-LLMs at Ultra-Low Retention"


def _check_people(people: object, where: str) -> None:
    assert isinstance(people, list) and people, f"{where}: authors must be a non-empty list"
    for person in people:
        assert isinstance(person, dict), f"{where}: an author must be a mapping"
        assert set(person) <= CFF_PERSON_KEYS, (
            f"{where}: unknown keys {set(person) - CFF_PERSON_KEYS}"
        )
        assert person.get("family-names") and person.get("given-names"), where


def test_citation_cff_is_valid_cff_1_2_and_cites_the_paper():
    text = (ROOT / "CITATION.cff").read_text()
    cff = yaml.safe_load(text)
    # the 1.2.0 schema's required keys and value types, checked by hand so that the test needs
    # no extra package; cffconvert (below) checks the full JSON schema when it is installed
    assert set(cff) <= CFF_KEYS, f"keys outside the CFF 1.2 schema: {set(cff) - CFF_KEYS}"
    assert cff["cff-version"] == "1.2.0"
    assert isinstance(cff["message"], str) and cff["message"].strip()
    assert isinstance(cff["title"], str) and cff["title"].strip()
    assert cff.get("type", "software") in ("software", "dataset")
    _check_people(cff["authors"], "authors")
    paper = cff["preferred-citation"]
    assert {"authors", "title", "type"} <= set(paper)
    assert paper["type"] == "conference-paper"
    assert paper["title"] == PAPER_TITLE
    assert isinstance(paper["year"], int) and paper["year"] == 2026
    assert "CVPR" in paper["collection-title"] and "CVPR 2026" in paper["conference"]["name"]
    _check_people(paper["authors"], "preferred-citation.authors")
    names = [(a["family-names"], a["given-names"]) for a in paper["authors"]]
    assert names == PAPER_AUTHORS
    # the BibTeX on the docs' home page says the same
    bibtex = (DOCS / "index.md").read_text()
    assert "Du, Junhao and Xue, Jialong and Li, Anqi and Dai, Jincheng and Lu, Guo" in bibtex
    assert PAPER_TITLE in bibtex


def test_citation_cff_passes_cffconvert_when_installed():
    cffconvert = pytest.importorskip("cffconvert", reason="cffconvert is not installed")
    cffconvert.Citation((ROOT / "CITATION.cff").read_text()).validate()


def test_the_readme_and_ci_state_the_tested_transformers_range():
    from ustc.models.compat import TESTED_TRANSFORMERS

    low, high = TESTED_TRANSFORMERS
    readme = (ROOT / "README.md").read_text()
    assert f"transformers {low} to {high}" in readme
    models = (ROOT / "docs" / "models.md").read_text()
    assert f"transformers {low} (the" in models and f"({high} when this was written" in models
    # CI's second pass installs exactly the oldest release named there
    assert "TESTED_TRANSFORMERS[0]" in (ROOT / ".ci" / "run").read_text()


def test_every_registered_backbone_is_named_in_the_readme_and_the_models_table():
    from ustc.models import ADAPTERS

    readme = (ROOT / "README.md").read_text()
    section = (ROOT / "docs" / "models.md").read_text().split("## Supported models")[1]
    first_cells = [row.split("|")[1] for row in section.splitlines() if row.startswith("| `")]
    for name in ADAPTERS:
        assert f"`{name}`" in readme, f"README.md does not name {name}"
        assert any(f"`{name}`" in cell for cell in first_cells), (
            f"docs/models.md's table has no row for {name}"
        )
