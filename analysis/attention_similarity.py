"""Attention and similarity of the kept tokens, like the paper's Fig. 4.

    python analysis/attention_similarity.py --out results/figures            # 24 lab videos, r = 2 %
    python analysis/attention_similarity.py --methods ours,attn,sim --retention 0.05 --limit 60

For every lab video and every external compression in ``--methods`` (default: ours against
attention-only selection, plus any registered HoliTom baseline), two numbers per token that
enters the LLM:

* attention: the Eq. (1) score of the token's position as a percentile among the video's N
  tokens (1 = the most attended token of the video; a cluster token counts at its centre);
* similarity: S of Eq. (2) against the final selection, the largest cosine similarity of the
  token to any other token entering the LLM (low = not redundant).

The left panel shows the distribution of the first, the right panel of the second.  The paper's
claim: ours keeps high-attention tokens while keeping similarity low; attention-only selection
keeps the highest-attention tokens but many near-duplicates.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from analysis import common  # noqa: E402
from ustc.compressor import CompressionResult, Compressor  # noqa: E402

#: the paper compares with HoliTom; it joins the default comparison when a baseline registers it
PAPER_BASELINE = "holitom"


def attention_percentile(scores: Tensor, indices: Tensor) -> Tensor:
    """p_m = |{j : s_j < s_{i_m}}| / (N - 1): rank of each kept token's Eq. (1) score.

    scores: (B, N) Eq. (1) scores; indices: (B, M) kept positions.  Returns (B, M) in [0, 1].
    """
    n = scores.shape[1]
    kept = scores.gather(1, indices)  # (B, M)
    below = (scores.unsqueeze(1) < kept.unsqueeze(2)).sum(dim=2)  # (B, M)
    return below.float() / max(n - 1, 1)


def max_similarity_to_others(tokens: Tensor) -> Tensor:
    """S_m = max_{k != m} cos(v_m, v_k) over the M tokens of each video   -- Eq. (2) on the output

    tokens: (B, M, D).  Returns (B, M); NaN when M = 1 (no other token).
    """
    unit = torch.nn.functional.normalize(tokens.float(), dim=-1)
    sims = torch.bmm(unit, unit.transpose(1, 2))
    eye = torch.eye(tokens.shape[1], dtype=torch.bool, device=tokens.device)
    return sims.masked_fill(eye, float("-inf")).amax(dim=2).nan_to_num(neginf=float("nan"))


def kept_token_stats(scores: Tensor, result: CompressionResult) -> tuple[np.ndarray, np.ndarray]:
    """(attention percentile, similarity) of every token entering the LLM, flattened over B.

    scores: (B, F, P) or (B, N) Eq. (1) scores; result: the compression of the same videos.
    """
    flat = scores.reshape(scores.shape[0], -1)
    attention = attention_percentile(flat, result.indices)
    similarity = max_similarity_to_others(result.tokens)
    return attention.reshape(-1).cpu().numpy(), similarity.reshape(-1).cpu().numpy()


def plot_distributions(stats: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "") -> Figure:
    """Two histograms (attention percentile, similarity) with one outline per method."""
    fig = Figure(figsize=(9.5, 3.6))
    ax_att, ax_sim = fig.subplots(1, 2)
    bins_att = np.linspace(0.0, 1.0, 21)
    # cosines in float32 may exceed 1 by an ulp: clip, so that no value falls outside the bins
    stats = {k: (a, np.clip(s, -1.0, 1.0)) for k, (a, s) in stats.items()}
    finite = np.concatenate([s[np.isfinite(s)] for _, s in stats.values()] + [np.zeros(0)])
    # near-duplicate features crowd the top of [-1, 1]: bin the range the data spans
    lo = np.floor(finite.min() * 20) / 20 if finite.size else 0.0
    hi = min(1.0, max(lo + 0.05, np.ceil(finite.max() * 20) / 20)) if finite.size else 1.0
    bins_sim = np.linspace(min(lo, hi - 0.05), hi, 26)
    for i, (label, (att, sim)) in enumerate(stats.items()):
        colour = f"C{i}"
        sim = sim[np.isfinite(sim)]
        for ax, values, bins in ((ax_att, att, bins_att), (ax_sim, sim, bins_sim)):
            ax.hist(
                values,
                bins=bins,
                density=True,
                histtype="step",
                lw=1.8,
                color=colour,
                label=f"{label} (mean {values.mean():.2f})",
            )
            ax.axvline(values.mean(), color=colour, ls=":", lw=1)
    ax_att.set_xlabel("Eq. (1) attention of kept tokens (percentile in the video)")
    ax_sim.set_xlabel("max cosine similarity to the other kept tokens")
    for ax, name in ((ax_att, "(a) attention"), (ax_sim, "(b) semantic similarity")):
        ax.set_ylabel("density")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def default_methods() -> str:
    from ustc.registry import METHODS

    return "ours,attn" + (f",{PAPER_BASELINE}" if PAPER_BASELINE in METHODS else "")


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = common.output_parser(__doc__.splitlines()[0], "analysis/attention_similarity.py")
    common.add_lab_args(parser, limit=24)
    parser.add_argument("--retention", type=float, default=0.02, help="r (default 0.02)")
    parser.add_argument(
        "--methods", default=None, help="ours, Table 5 rows (attn, sim, ...), baselines"
    )
    parser.add_argument("--stem", default="attention_similarity")
    args = parser.parse_args(argv)
    try:
        methods = common.parse_methods(args.methods or default_methods(), args.retention)
        model = common.load_lab_model(args.weights, args.untrained)
        samples = common.lab_samples(args.split, args.start, args.limit)
    except ValueError as exc:
        common.fail(str(exc))
    tokens = common.video_tokens(model, samples)
    stats = {}
    for name, config in methods.items():
        result = Compressor(config).compress(tokens.features, tokens.scores)
        stats[common.method_label(name)] = kept_token_stats(tokens.scores, result)
    f, p = tokens.scores.shape[1:]
    budget = next(iter(methods.values())).budget(f, p)
    title = (
        f"{len(samples)} {args.split} videos, r = {args.retention:g} ({budget} of {f * p} "
        f"tokens per video), {common.model_label(args.untrained, args.weights)}"
    )
    for label, (att, sim) in stats.items():
        print(
            f"{label:28s} attention percentile {att.mean():.3f}  similarity {np.nanmean(sim):.3f}"
        )
    paths = common.save_figure(plot_distributions(stats, title), args.out, args.stem)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
