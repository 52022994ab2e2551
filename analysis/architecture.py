"""The data-flow picture of docs/architecture.md: frames -> vision -> compression -> LLM -> merge.

    python analysis/architecture.py --out docs/assets        # writes architecture.png / .svg / .pdf

Drawn with matplotlib so that the picture is regenerated from code (no drawing tool needed) and
names the files and symbols a reader will look for.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from analysis.common import output_parser, save_figure  # noqa: E402

#: (title, detail, code, colour) of each box, row by row; the rows are the two halves of Fig. 2
OUTSIDE = [
    ("Video", "F frames, H x W", "ustc.video / ustc.lab", "#eeeeee"),
    (
        "Vision encoder",
        "SigLIP; hook on one layer:\nEq. (1) scores s (B, F, P)",
        "ustc/models/",
        "#dde8f7",
    ),
    ("Projector + pooling", "features v (B, F, P, D)\nN = F * P tokens", "transformers", "#dde8f7"),
    ("Scorer", "candidate priority\nattn | sim | attn+sim", "ustc/scoring.py", "#fbe3c8"),
    ("Retention pool", "admit c while\nmax cos(c, P) < tau  (Eq. 2)", "ustc/pool.py", "#d6f0d6"),
    (
        "Recycler",
        "DPC-KNN on the rest:\nrho, delta, gamma  (Eq. 3-4)",
        "ustc/recycle.py",
        "#ead6f5",
    ),
]
INSIDE = [
    (
        "M visual tokens",
        "M = F * round(r * P)\noriginal order, positions",
        "ustc/compressor.py",
        "#eeeeee",
    ),
    ("LLM layers < K", "visual + text tokens", "transformers", "#dde8f7"),
    (
        "Merger at layer K",
        "I = (1-lambda) A_m + lambda S_m\nkeep ceil(R * M)  (Eq. 5-10)",
        "ustc/merging.py",
        "#fde0e0",
    ),
    ("LLM layers >= K", "fewer visual tokens,\nsmaller KV cache", "transformers", "#dde8f7"),
    ("Answer", "generate()", "", "#eeeeee"),
]

BOX_W, BOX_H, GAP = 2.3, 1.45, 0.55


def _box(ax: object, x: float, y: float, title: str, detail: str, code: str, colour: str) -> None:
    ax.add_patch(
        FancyBboxPatch(
            (x, y),
            BOX_W,
            BOX_H,
            boxstyle="round,pad=0.04,rounding_size=0.12",
            facecolor=colour,
            edgecolor="0.35",
            lw=1.0,
        )
    )
    ax.text(
        x + BOX_W / 2, y + BOX_H - 0.25, title, ha="center", va="center", fontsize=9, weight="bold"
    )
    ax.text(x + BOX_W / 2, y + BOX_H / 2 - 0.08, detail, ha="center", va="center", fontsize=7)
    if code:
        ax.text(
            x + BOX_W / 2,
            y + 0.17,
            code,
            ha="center",
            va="center",
            fontsize=6.5,
            family="monospace",
            color="0.25",
        )


def _group(ax: object, x: float, y: float, label_y: float, label: str) -> None:
    """A dashed frame around three boxes of a row starting at (x, y), labelled at label_y."""
    ax.add_patch(
        FancyBboxPatch(
            (x, y - 0.3),
            3 * BOX_W + 2 * GAP + 0.3,
            BOX_H + 0.62,
            boxstyle="round,pad=0.02",
            fill=False,
            ls="--",
            ec="0.5",
        )
    )
    ax.text(x + 0.1, label_y, label, fontsize=7.5, color="0.3")


def _arrow(ax: object, start: tuple[float, float], end: tuple[float, float], **kw: object) -> None:
    ax.add_patch(
        FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=11, lw=1.1, color="0.3", **kw)
    )


def draw() -> Figure:
    width = len(OUTSIDE) * (BOX_W + GAP)
    fig = Figure(figsize=(width * 0.95, 5.0))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.3, width)
    ax.set_ylim(-0.2, 5.5)
    ax.set_axis_off()
    top, bottom = 3.3, 0.55
    for i, box in enumerate(OUTSIDE):
        x = i * (BOX_W + GAP)
        _box(ax, x, top, *box)
        if i:
            _arrow(ax, (x - GAP, top + BOX_H / 2), (x, top + BOX_H / 2))
    # the external stage: scorer, pool, recycler, composed by the compressor
    _group(
        ax,
        3 * (BOX_W + GAP) - 0.15,
        top,
        top + BOX_H + 0.18,
        "external compression: Compressor.compress (ustc/compressor.py), outside the LLM",
    )

    # the second row runs right to left under the first (a snake), starting under the recycler
    def x_in(i: int) -> float:
        return (len(OUTSIDE) - 1 - i) * (BOX_W + GAP)

    for i, box in enumerate(INSIDE):
        _box(ax, x_in(i), bottom, *box)
        if i:
            _arrow(
                ax,
                (x_in(i) + BOX_W + GAP, bottom + BOX_H / 2),
                (x_in(i) + BOX_W, bottom + BOX_H / 2),
            )
    centre = x_in(0) + BOX_W / 2
    _arrow(ax, (centre, top - 0.3), (centre, bottom + BOX_H))
    ax.text(
        centre - 0.12,
        (top - 0.3 + bottom + BOX_H) / 2,
        "retained + cluster tokens,\nre-sorted into spatiotemporal order",
        fontsize=7.5,
        color="0.3",
        ha="right",
        va="center",
    )
    _group(
        ax,
        x_in(3) - 0.15,
        bottom,
        bottom - 0.52,
        "inside the LLM: hooks on the model instance "
        "(ustc.attach, ustc/models/), Compressor.merge at layer K",
    )
    return fig


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = output_parser(__doc__.splitlines()[0], "analysis/architecture.py")
    args = parser.parse_args(argv)
    fig = draw()
    paths = save_figure(fig, args.out, "architecture")
    # SVG too: the docs site shows the vector version
    svg = Path(args.out) / "architecture.svg"
    draw().savefig(svg, bbox_inches="tight")
    paths.append(svg)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
