"""Token maps over the frames of a video, like the paper's Fig. S3.

    python analysis/token_maps.py --out results/figures              # lab test video 0, r = 2 %
    python analysis/token_maps.py --index 3 --retention 0.1 --methods ours,attn,sim

For one lab video (real pixels), each row is one external compression (``--methods``), each
column a frame, and every token of the frame's grid is drawn as a box of the role the compression
gave it (``token_roles``):

=============  =================================================================  ==============
role           meaning                                                            drawn as
=============  =================================================================  ==============
retained       admitted to the retention pool by Eq. (2); enters the LLM as       green box
               itself
recycled       enters the LLM as a recycled token: the position of a DPC-KNN      purple box
               cluster token (its centre, Eq. 3-4), or, with recycler ``none``,
               a rejected token refilled into a slot the pool left empty
absorbed       averaged into a cluster token at another position                 purple tint
rejected       failed the tau test of Eq. (2) (status REJECTED) and is not a      red box
               position of the LLM's input (absorbed into a cluster, or dropped)
dropped        enters the LLM in no form (assignment -1)                          dark shade
=============  =================================================================  ==============

Every token is exactly one of retained / recycled / absorbed / dropped; ``rejected`` marks the
absorbed or dropped ones that failed tau.  Green + purple boxes = the F*round(r*P) tokens that
enter the LLM.  Tokens never offered to the pool (the pool was full before their turn) have no
box.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from torch import Tensor  # noqa: E402

from analysis import common  # noqa: E402
from ustc.compressor import REJECTED, RETAINED, CompressionResult, Compressor  # noqa: E402

#: edge colour of each boxed role, and the fill of the shaded ones
COLOURS = {
    "retained": "#1fbf3f",
    "recycled": "#a020f0",
    "rejected": "#e0201b",
    "absorbed": "#a020f0",
    "dropped": "#000000",
}
BOXED = ("retained", "recycled", "rejected")
SHADED = {"absorbed": 0.25, "dropped": 0.55}  # role -> fill alpha


@dataclass(frozen=True)
class TokenRoles:
    """What the external compression did with each of the N = F*P tokens: (B, N) bool each.

    retained, recycled, absorbed and dropped partition the tokens; rejected is a subset of
    absorbed | dropped.  See the module docstring for the definitions.
    """

    retained: Tensor
    recycled: Tensor
    absorbed: Tensor
    rejected: Tensor
    dropped: Tensor

    def counts(self) -> dict[str, Tensor]:
        """(B,) long count of each role."""
        return {name: getattr(self, name).sum(dim=1) for name in _ROLES}


_ROLES = ("retained", "recycled", "absorbed", "rejected", "dropped")


def token_roles(result: CompressionResult) -> TokenRoles:
    """Roles of the N original tokens from a ``CompressionResult`` (indices, assignment, status).

    result.indices (B, M): output positions; result.assignment (B, N): output slot or -1;
    result.status (B, N): pool stage (RETAINED, REJECTED, UNVISITED).
    """
    b, n = result.assignment.shape
    position = torch.zeros(b, n, dtype=torch.bool, device=result.indices.device)
    position.scatter_(1, result.indices, True)  # the token sits at an output slot
    retained = result.status == RETAINED
    recycled = position & ~retained
    dropped = result.assignment < 0
    absorbed = ~position & ~dropped
    rejected = (result.status == REJECTED) & ~position
    return TokenRoles(retained, recycled, absorbed, rejected, dropped)


def draw_frame(ax: Any, frame: np.ndarray, roles: dict[str, np.ndarray]) -> None:
    """Draw one frame (H, W, 3) uint8 and the boxes of its P tokens.

    roles: role -> (P,) bool for this frame, P = g * g tokens in raster order over a g x g grid.
    Each drawn patch carries its role as ``gid`` (tests count them).
    """
    h, w, _ = frame.shape
    p = len(next(iter(roles.values())))
    g = int(round(p**0.5))
    if g * g != p:
        raise ValueError(f"tokens per frame must form a square grid, got P={p}")
    cell_h, cell_w = h / g, w / g
    ax.imshow(frame, interpolation="nearest", extent=(0, w, h, 0))
    inset = 0.06 * min(cell_h, cell_w)  # keeps neighbouring boxes apart
    for role, alpha in SHADED.items():
        for t in np.flatnonzero(roles[role]):
            y, x = divmod(int(t), g)
            ax.add_patch(
                Rectangle(
                    (x * cell_w, y * cell_h),
                    cell_w,
                    cell_h,
                    facecolor=COLOURS[role],
                    edgecolor="none",
                    alpha=alpha,
                    gid=role,
                )
            )
    for role in BOXED:
        for t in np.flatnonzero(roles[role]):
            y, x = divmod(int(t), g)
            ax.add_patch(
                Rectangle(
                    (x * cell_w + inset, y * cell_h + inset),
                    cell_w - 2 * inset,
                    cell_h - 2 * inset,
                    fill=False,
                    edgecolor=COLOURS[role],
                    linewidth=1.6,
                    gid=role,
                )
            )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_token_maps(
    pixels: np.ndarray, rows: dict[str, CompressionResult], title: str = ""
) -> Figure:
    """One row per compression, one column per frame.

    pixels: (F, H, W, 3) uint8 frames of one video; rows: label -> CompressionResult of that
    video (batch of 1, N = F*P).
    """
    f = pixels.shape[0]
    fig = Figure(figsize=(1.35 * f + 1.2, 1.45 * len(rows) + 0.9))
    axes = fig.subplots(len(rows), f, squeeze=False)
    for r, (label, result) in enumerate(rows.items()):
        if result.assignment.shape[0] != 1 or result.assignment.shape[1] % f:
            raise ValueError(
                f"row {label!r}: expected the result of one video of {f} frames, got assignment "
                f"{tuple(result.assignment.shape)}"
            )
        roles = token_roles(result)
        per_frame = {name: getattr(roles, name)[0].reshape(f, -1).cpu().numpy() for name in _ROLES}
        counts = {k: int(v.sum()) for k, v in per_frame.items()}
        for t in range(f):
            ax = axes[r, t]
            draw_frame(ax, pixels[t], {k: v[t] for k, v in per_frame.items()})
            if r == 0:
                ax.set_title(f"frame {t}", fontsize=8)
        axes[r, 0].set_ylabel(
            f"{label}\n{counts['retained']} kept + {counts['recycled']} recycled",
            fontsize=8,
        )
    handles = [
        Line2D([], [], color=COLOURS["retained"], lw=2, label="retained (Eq. 2)"),
        Line2D([], [], color=COLOURS["recycled"], lw=2, label="cluster token (Eq. 3-4) or refill"),
        Patch(
            facecolor=COLOURS["absorbed"], alpha=SHADED["absorbed"], label="merged into a cluster"
        ),
        Line2D([], [], color=COLOURS["rejected"], lw=2, label="rejected by tau (Eq. 2)"),
        Patch(facecolor=COLOURS["dropped"], alpha=SHADED["dropped"], label="dropped"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.99, top=0.86, bottom=0.14, wspace=0.04, hspace=0.08)
    return fig


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = common.output_parser(__doc__.splitlines()[0], "analysis/token_maps.py")
    common.add_lab_args(parser, limit=None)
    parser.add_argument("--index", type=int, default=None, help="lab video (default: --start)")
    parser.add_argument("--retention", type=float, default=0.02, help="r (default 0.02)")
    parser.add_argument(
        "--methods",
        default="ours,attn",
        help="rows: ours, Table 5 rows (attn, sim, ...), baselines",
    )
    parser.add_argument("--stem", default="token_maps", help="file name without extension")
    args = parser.parse_args(argv)
    index = args.start if args.index is None else args.index
    try:
        methods = common.parse_methods(args.methods, args.retention)
        model = common.load_lab_model(args.weights, args.untrained)
        sample = common.lab_samples(args.split, index, 1)[0]
    except ValueError as exc:
        common.fail(str(exc))
    tokens = common.video_tokens(model, [sample])
    rows = {
        common.method_label(name): Compressor(config).compress(tokens.features, tokens.scores)
        for name, config in methods.items()
    }
    f, p = tokens.scores.shape[1:]
    budget = next(iter(methods.values())).budget(f, p)
    title = (
        f'{args.split} video {index} ({sample.family}): "{sample.question.text}"  '
        f"r = {args.retention:g}, {budget} of {f * p} tokens, {common.model_label(args.untrained, args.weights)}"
    )
    paths = common.save_figure(plot_token_maps(tokens.pixels[0], rows, title), args.out, args.stem)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
