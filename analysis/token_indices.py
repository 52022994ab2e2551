"""Where the in-LLM merger's kept tokens sit, text-aware against last-token, like the paper's Fig. 6.

    python analysis/token_indices.py --out results/figures          # 24 lab videos, r = 1, R = 0.5
    python analysis/token_indices.py --retention 0.2 --limit 60 --layer 1

For every lab video the lab model runs one prefill with ``ustc.attach(model, config)`` for each
merger (``text-aware``, Eq. 5-10, and the ``last-token`` criterion of FastV/HoliTom), and the
indices the merger kept at layer K are read from the adapter (``handle.last.merge.indices``:
positions among the M visual tokens that entered the LLM, in sequence order).  The figure shows,
per position bin, the probability that a token there is kept; a flat line at R is position-blind.
The paper's claim: last-token attention favours tokens near the end of the sequence (RoPE's
recency bias), the text-aware score spreads its choice over all positions.

The default retention is 1 (no external compression), so the merger sees all F*P = 200 tokens of
a lab video in their original order and positional bias is not confounded by the pool's choice.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from analysis import common  # noqa: E402
from ustc.config import CompressionConfig  # noqa: E402

MERGERS = {"text-aware": "Text-aware (Eq. 5-10)", "last-token": "Last token (FastV / HoliTom)"}


def kept_indices(model: Any, config: CompressionConfig, samples: Sequence[Any]) -> Tensor:
    """(V, Nk) positions, among the M visual tokens entering the LLM, that layer K kept.

    One prefill per video with ``ustc.attach``; read from ``handle.last.merge.indices``.
    """
    rows = []
    for sample in samples:
        last = common.run_attached(model, config, sample)
        if last.merge is None:
            raise ValueError(
                f"merger {config.merger!r} at layer K={config.layer} did not run: K must be "
                "below the number of decoder layers"
            )
        rows.append(last.merge.indices.cpu())
    return torch.cat(rows)


def selection_probability(indices: Tensor, m: int) -> Tensor:
    """P(position i kept) = (1/V) sum_v [i in kept_v], for i < M.

    indices: (V, Nk) kept positions of V videos, each row distinct values in [0, M).  Returns (M,).
    """
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= m):
        raise ValueError(f"kept indices must lie in [0, {m}), got {indices.min()}..{indices.max()}")
    counts = torch.bincount(indices.reshape(-1), minlength=m).float()
    return counts / max(indices.shape[0], 1)


def binned(prob: Tensor, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``prob`` (M,) over ``bins`` equal runs of positions: (edges (bins+1,), means (bins,))."""
    m = prob.shape[0]
    bins = max(1, min(bins, m))
    edges = np.linspace(0, m, bins + 1)
    bounds = np.round(edges).astype(int)
    means = np.array(
        [prob[a:b].mean().item() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    )
    return edges, means


def plot_indices(
    probs: dict[str, Tensor],
    keep_ratio: float,
    frames: int | None = None,
    bins: int = 32,
    title: str = "",
) -> Figure:
    """Selection probability per position bin, one step line per merger.

    probs: label -> (M,) selection probability; keep_ratio: R, the position-blind level;
    frames: draw frame boundaries when the M tokens are F equal frames (retention 1).
    """
    fig = Figure(figsize=(8.5, 3.8))
    ax = fig.subplots()
    m = next(iter(probs.values())).shape[0]
    for i, (label, prob) in enumerate(probs.items()):
        edges, means = binned(prob, bins)
        pos = torch.arange(m, dtype=torch.float32)
        centre = float((pos * prob).sum() / prob.sum().clamp(min=1e-12)) / max(m - 1, 1)
        ax.stairs(means, edges, lw=2, color=f"C{i}", label=f"{label}: mean position {centre:.2f}")
    ax.axhline(
        keep_ratio, color="grey", ls="--", lw=1, label=f"position-blind (R = {keep_ratio:g})"
    )
    if frames and m % frames == 0:
        for t in range(1, frames):
            ax.axvline(t * m / frames, color="0.85", lw=0.8, zorder=0)
    ax.set_xlim(0, m)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"index of the visual token entering the LLM (0 .. {m - 1}, sequence order)")
    ax.set_ylabel("P(kept at layer K)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = common.output_parser(__doc__.splitlines()[0], "analysis/token_indices.py")
    common.add_lab_args(parser, limit=24)
    parser.add_argument("--retention", type=float, default=1.0, help="r (default 1: no pool)")
    parser.add_argument("--keep-ratio", type=float, default=0.5, help="R (default 0.5)")
    parser.add_argument("--layer", type=int, default=None, help="K (default: the lab's K = 2)")
    parser.add_argument("--lam", type=float, default=0.5, help="lambda (default 0.5)")
    parser.add_argument("--bins", type=int, default=32, help="position bins")
    parser.add_argument("--stem", default="token_indices")
    args = parser.parse_args(argv)
    try:
        from ustc.lab.model import default_config

        base = default_config(retention=args.retention, keep_ratio=args.keep_ratio, lam=args.lam)
        if args.layer is not None:
            base = base.replace(layer=args.layer)
        model = common.load_lab_model(args.weights, args.untrained)
        samples = common.lab_samples(args.split, args.start, args.limit)
        probs = {}
        for merger, label in MERGERS.items():
            indices = kept_indices(model, base.replace(merger=merger), samples)
            probs[label] = selection_probability(indices, _entering(base, model))
    except ValueError as exc:
        common.fail(str(exc))
    frames = int(model.config.lab["frames"]) if hasattr(model.config, "lab") else None
    title = (
        f"{len(samples)} {args.split} videos, r = {args.retention:g}, K = {base.layer}, "
        f"R = {args.keep_ratio:g}, lambda = {args.lam:g}, {common.model_label(args.untrained, args.weights)}"
    )
    for label, prob in probs.items():
        m = prob.shape[0]
        last_quarter = float(prob[3 * m // 4 :].sum() / prob.sum())
        print(f"{label:32s} share of kept tokens in the last quarter {last_quarter:.3f}")
    fig = plot_indices(
        probs, args.keep_ratio, frames if args.retention == 1.0 else None, args.bins, title
    )
    paths = common.save_figure(fig, args.out, args.stem)
    for path in paths:
        print(path)
    return paths


def _entering(config: CompressionConfig, model: Any) -> int:
    from analysis.common import lab_grid

    f, p = lab_grid(model)
    return config.budget(f, p)


if __name__ == "__main__":
    main()
