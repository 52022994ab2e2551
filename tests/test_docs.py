"""The docs site: it builds without a warning, every page is in the nav, every code symbol a page
names exists, every worked example prints what the page says; CITATION.cff is valid CFF 1.2."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
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


needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("latex2mathml") is None,
    reason="mkdocs or latex2mathml is not installed (pip install -e '.[docs]')",
)
#: proxies on a closed port: a build that reached for the network would fail
NO_NETWORK = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "",
    "no_proxy": "",
}
#: a <script>, <link> or <img> that loads from another host
REMOTE = re.compile(r"<(script|link|img)\b[^>]*\b(src|href)=\"(https?:)?//", re.I)


def _mkdocs_build(config_dir: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=config_dir,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **NO_NETWORK},
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once with --strict and no network."""
    out = tmp_path_factory.mktemp("site")
    result = _mkdocs_build(ROOT, out)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "WARNING" not in log, log
    return out


@needs_mkdocs
def test_the_site_builds_without_warnings(site):
    assert (site / "index.html").is_file()
    assert (site / "stages" / "merging" / "index.html").is_file()
    assert (site / "assets" / "architecture.png").is_file()
    assert not (site / "hooks").exists(), "the build hook is not part of the site"


def _page_html(site: Path, page: str) -> str:
    stem = page.removesuffix(".md")
    html = site / ("index.html" if stem == "index" else f"{stem}/index.html")
    return html.read_text()


@needs_mkdocs
def test_the_site_loads_nothing_from_the_network_and_its_equations_are_mathml(site):
    """Offline, every page shows: no remote script, stylesheet or image, and the equations are
    MathML typeset at build time (no MathJax, no raw TeX)."""
    pages = [p.relative_to(DOCS).as_posix() for p in _pages()]
    for page in pages:
        html = _page_html(site, page)
        assert not REMOTE.findall(html), f"{page} loads {REMOTE.findall(html)} from the network"
        assert "mathjax" not in html.lower(), page
    with_tex = [p for p in pages if re.search(r"\\\(|\\\[", (DOCS / p).read_text())]
    assert "equations.md" in with_tex
    for page in with_tex:
        html = _page_html(site, page)
        text = re.sub(r"<pre\b.*?</pre>|<code>.*?</code>", "", html, flags=re.S)
        assert text.count("<math") >= (DOCS / page).read_text().count("\\("), page
        assert not re.search(r"\\\(|\\\[|\\\)|\\\]", text), f"{page} shows raw TeX"
    equations = _page_html(site, "equations.md")
    numbers = re.findall(r'class="equation-number">\((\d+)\)<', equations)
    assert numbers == [str(i) for i in range(1, 11)]
    # code blocks are highlighted at build time (the theme's highlight.js is on a CDN)
    assert 'class="codehilite"' in _page_html(site, "architecture.md")


def _hook():
    spec = importlib.util.spec_from_file_location("mathml_hook", DOCS / "hooks" / "mathml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_mkdocs
def test_tex_that_cannot_be_typeset_fails_the_build(tmp_path):
    hook = _hook()
    assert "<math" in hook.to_mathml(r"\frac{a}{b}", display=False)
    with pytest.raises(hook.MathError, match=r"\\argh"):
        hook.to_mathml(r"x = \argh y", display=True)
    # the whole build fails, naming the page and the formula
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# T\n\nFine: \\(x^2\\). Not: \\(\\argh x\\).\n")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config = {
        "site_name": "t",
        "markdown_extensions": config["markdown_extensions"],
        "hooks": [str(DOCS / "hooks" / "mathml.py")],
    }
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    result = _mkdocs_build(tmp_path, tmp_path / "site")
    assert result.returncode != 0
    assert "index.md" in result.stderr and "\\argh" in result.stderr, result.stderr


def test_long_code_names_wrap_between_words_not_inside_them():
    """Table cells hold names like `tests/test_x.py:test_a_long_name`: they may wrap after
    / . : or _, never inside a word (no `overflow-wrap: anywhere`, no `word-break: break-all`)."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    css = "".join((DOCS / c).read_text() for c in config["extra_css"])
    assert not re.search(r"overflow-wrap:\s*anywhere|word-break:\s*break-all", css)
    hook = _hook()
    cell = "<td><code>tests/test_scoring.py:test_attention_probs</code></td>"
    assert hook.render(cell) == (
        "<td><code>tests/<wbr>test_<wbr>scoring.<wbr>py:<wbr>test_<wbr>attention_<wbr>probs"
        "</code></td>"
    )
    block = "<pre><code>tests/test_scoring.py:test_attention_probs</code></pre>"
    assert hook.render(block) == block
    assert hook.render("<code>ustc.attach</code>") == "<code>ustc.attach</code>"


def test_the_navigation_bar_fits_one_row():
    """The theme's top bar shows the nav's first level: at 1280 px about 60 characters fit."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    titles = [next(iter(e)) if isinstance(e, dict) else e for e in nav]
    assert len(titles) <= 6 and sum(len(t) + 4 for t in titles) <= 60, titles


#: wording of the tools this project was built with, which a user does not have
INTERNAL = re.compile(
    r"`device` tool|device tool|device machine|\blent\b|\bthe lead\b|"
    # a prepared video is a `VideoSession` (docs/sessions.md): only the build's sessions are internal
    r"\b(?:this|other|earlier|later|developer|build|a developer's)\s+sessions?\b|\bsessions'|"
    r"carry list|KINDS\.md|device README|run\(command=",
    re.I,
)


def test_user_facing_text_speaks_of_the_users_machine_not_of_internal_tools():
    """README, docs, analysis and benchmarks tell a user what to type on their own machine
    (`bash benchmarks/gpu.sh OUT_DIR`), not how the project's build sessions ran things."""
    files = [ROOT / "README.md", *_pages()]
    for folder in ("analysis", "benchmarks"):
        files += [p for p in (ROOT / folder).iterdir() if p.suffix in (".py", ".sh", ".txt", ".md")]
    found = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in files
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if INTERNAL.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_docs_name_the_labs_question_families_and_no_path_outside_the_project():
    from ustc.lab.scenes import FAMILIES

    words = {3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
    for page in [ROOT / "README.md", *_pages()]:
        text = page.read_text()
        for count in re.findall(r"\b(\w+) question families", text):
            assert count == words[len(FAMILIES)], f"{page.name} says {count} question families"
        # files of the machine the docs were written on, not of a user's checkout
        outside = re.findall(r"(?<![\w./-])(?:shared/|/work/|/root/|/home/|\.\./\.\./)\S*", text)
        assert not outside, f"{page.name} points outside the project: {outside}"


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
