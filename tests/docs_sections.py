"""A page with a generated section (between a script's START and END markers), for the tests of
the scripts that replace one (``--update-docs``, ``--write``)."""

from pathlib import Path


def marked_page(path: Path, script) -> Path:
    """Write a page whose only section is ``script``'s, holding "old", framed by other text."""
    path.write_text(f"before\n{script.START}\nold\n{script.END}\nafter\n")
    return path


def replaced_text(path: Path) -> str:
    """The page's text once the script wrote its section: the frame kept, "old" gone."""
    text = path.read_text()
    assert text.startswith("before\n") and text.endswith("after\n")
    assert "\nold\n" not in text
    return text
