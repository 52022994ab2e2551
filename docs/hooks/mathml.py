"""mkdocs hook: typeset the pages' TeX as MathML when the site is built, so that a page shows its
equations with no script and no network (browsers render MathML natively).

``pymdownx.arithmatex`` (generic mode) marks every ``\\( \\)`` span and ``\\[ \\]`` block of a
page; :func:`on_page_content` replaces each mark with the MathML that ``latex2mathml`` gives for
it.  TeX that ``latex2mathml`` does not know (it would leave the command as text) fails the build
with the page and the formula, instead of showing raw TeX to the reader.  A ``\\tag{n}`` becomes
an equation number set beside the block.

The hook also lets long inline code names (``tests/test_x.py:test_a_long_name``) wrap only after
``/``, ``.``, ``:`` and ``_``, never inside a word: it puts a ``<wbr>`` there.
"""

from __future__ import annotations

import html
import re
from typing import Any

from latex2mathml.converter import convert

#: what arithmatex (generic mode) writes around a formula
ARITHMATEX = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)
TAG = re.compile(r"\\tag\{([^{}]*)\}")
INLINE_CODE = re.compile(r"<code>([^<]*)</code>")
#: a code block (its layout is kept as written)
PRE = re.compile(r"(<pre\b.*?</pre>)", re.S)
#: code names at least this long get break opportunities
LONG_CODE = 24


class MathError(ValueError):
    """A formula that cannot be typeset as MathML."""


def to_mathml(tex: str, display: bool) -> str:
    """MathML for one formula (without its ``\\( \\)`` or ``\\[ \\]`` delimiters).

    ``display`` sets a block (with its ``\\tag{n}``, if any, as a number beside it) instead of an
    inline formula.  Raises :class:`MathError` when the TeX uses a command ``latex2mathml`` does
    not know, naming the formula.
    """
    number = None
    if display and (tag := TAG.search(tex)):
        number, tex = tag.group(1), TAG.sub("", tex)
    try:
        math = convert(tex.strip(), display="block" if display else "inline")
    except Exception as error:  # latex2mathml raises its own exception types, not one base
        raise MathError(f"cannot typeset {tex.strip()!r}: {error}") from error
    text = html.unescape(re.sub(r"<[^>]+>", " ", math))
    if unknown := re.findall(r"\\[A-Za-z]+", text):
        raise MathError(
            f"cannot typeset {tex.strip()!r}: latex2mathml does not know {', '.join(unknown)} "
            "(rewrite it with commands it supports)"
        )
    if number is None:
        return math
    return f'<span class="equation">{math}<span class="equation-number">({number})</span></span>'


def _typeset(match: re.Match[str], page: str) -> str:
    element, body = match.group(1), html.unescape(match.group(2)).strip()
    display = element == "div"
    opening, closing = ("\\[", "\\]") if display else ("\\(", "\\)")
    if not (body.startswith(opening) and body.endswith(closing)):
        raise MathError(f"{page}: unexpected arithmatex output {body[:60]!r}")
    try:
        math = to_mathml(body[2:-2], display)
    except MathError as error:
        raise MathError(f"{page}: {error}") from None
    return f'<div class="math">{math}</div>' if display else math


def _breakable(match: re.Match[str]) -> str:
    code = match.group(1)
    if len(code) < LONG_CODE:
        return match.group(0)
    return "<code>" + re.sub(r"([/.:_])(?=\w)", r"\1<wbr>", code) + "</code>"


def render(content: str, page: str = "page") -> str:
    """A page's HTML with every arithmatex mark typeset as MathML and long code names breakable."""
    content = ARITHMATEX.sub(lambda m: _typeset(m, page), content)
    parts = PRE.split(content)  # odd indices: code blocks
    return "".join(p if i % 2 else INLINE_CODE.sub(_breakable, p) for i, p in enumerate(parts))


def on_page_content(html_text: str, page: Any, **kwargs: Any) -> str:
    """mkdocs event: the page's HTML body, after Markdown and before the theme."""
    from mkdocs.exceptions import PluginError

    try:
        return render(html_text, page.file.src_uri)
    except MathError as error:
        raise PluginError(str(error)) from None
