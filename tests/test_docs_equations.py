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
