"""Every `file:function` named in docs/equations.md exists, and so does every named test."""

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_symbol_in_the_equation_table_exists():
    text = (ROOT / "docs" / "equations.md").read_text()
    refs = re.findall(r"`((?:ustc|tests)/[\w/]+\.py):(\w+)`", text)
    assert len(refs) >= 20
    for path, name in refs:
        assert (ROOT / path).is_file(), path
        if path.startswith("ustc/"):
            module = importlib.import_module(path[:-3].replace("/", "."))
            assert hasattr(module, name), f"{path} has no {name}"
        else:
            source = (ROOT / path).read_text()
            assert re.search(rf"^(def|class) {name}\b", source, re.M), f"{path} has no {name}"


def test_equations_are_typeset_and_the_table_fits():
    """Eq. 1-10 are TeX display blocks (pymdownx.arithmatex, typeset as MathML by the build hook),
    not ASCII; the symbol table has three columns and its long code names wrap (the build hook
    puts break opportunities in them), so it fits 1280 px."""
    import yaml

    text = (ROOT / "docs" / "equations.md").read_text()
    tags = re.findall(r"\\tag\{(\d+)\}", text)
    assert sorted(map(int, tags)) == list(range(1, 11)), tags
    for block in re.findall(r"\\\[(.*?)\\\]", text, re.S):
        assert "|" not in block, "use \\lVert/\\rVert: a bar breaks Markdown tables"
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    extensions = [e if isinstance(e, str) else next(iter(e)) for e in config["markdown_extensions"]]
    assert "pymdownx.arithmatex" in extensions
    assert "docs/hooks/mathml.py" in config["hooks"]
    table = text[text.index("| Eq. |") :].split("\n\n")[0].splitlines()
    assert len(table) >= 15
    for row in table:
        cells = row.strip().strip("|").split("|")
        assert len(cells) == 3, row
        prose = re.sub(r"`[^`]*`|\\\(.*?\\\)|<br>", "", cells[1])
        assert len(prose) <= 100, f"a long 'What' cell widens the table: {cells[1]!r}"
    css = "".join((ROOT / "docs" / c).read_text() for c in config["extra_css"])
    assert re.search(r"table code\s*\{[^}]*white-space:\s*normal", css)
