"""The generated sections of the docs: a script's table between its START and END markers."""

from pathlib import Path


def replace_section(page: Path, start: str, end: str, body: str) -> None:
    """Replace the text between ``start`` and ``end`` in ``page`` by ``body``."""
    text = page.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{page} has no {start} ... {end} section")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{start}\n{body}\n{end}{tail}")
