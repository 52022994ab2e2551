"""Parameter curves from the ablation results store, like the paper's Fig. 5 and Fig. S1.

    python ablations/sweep.py s6 --limit 120          # fill the store (results/ablations.jsonl)
    python analysis/params.py --out results/figures   # then plot every sweep it holds
    python analysis/params.py --store results/s6.jsonl --metric avg

One panel per parameter: tau (Eq. 2), cluster ratio, lambda (Eq. 9), K and R (the merging layer
and the share kept there), and a last panel with R against K (Fig. S1: one line per K).  The store
is the JSONL of ``ablations/store.py``, one record per run with ``config`` (every
``CompressionConfig`` field), ``benchmarks`` (their specs), ``scores`` and ``avg``.  Nothing is
run here: a *sweep* is found as a group of stored runs whose configs and benchmarks are equal
except for the panel's parameter, with at least two values of it.  The y-axis is the Avg. score
in % of the uncompressed run of the same benchmarks when the store holds that run (the paper's
"%" column), the Avg. score otherwise.  For tau, cluster ratio and lambda the paper's printed
curve (Tables S6-S8, LLaVA-OV-7B) is drawn on a right-hand axis for comparison.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.common import fail, output_parser, save_figure  # noqa: E402

#: config field -> axis label, in panel order (Fig. 5: tau, cluster ratio, lambda; S5/S1: K, R)
PARAMETERS: dict[str, str] = {
    "tau": "tau (Eq. 2 threshold)",
    "cluster_ratio": "cluster ratio",
    "lam": "lambda (Eq. 9)",
    "layer": "K (merging layer)",
    "keep_ratio": "R (share kept at layer K)",
}
TITLES = {
    "tau": "tau (Fig. 5a, Table S6)",
    "cluster_ratio": "cluster ratio (Fig. 5b, Table S7)",
    "lam": "lambda (Fig. 5c, Table S8)",
    "layer": "K (Table S5)",
    "keep_ratio": "R, one line per K (Fig. S1)",
}
#: how config fields read in legends
SYMBOLS = {"layer": "K", "keep_ratio": "R", "lam": "lambda", "retention": "r"}
#: config field -> the paper's table of it (ablations/tables.py), whose % column is overlaid
PAPER_TABLES = {"tau": "s6", "cluster_ratio": "s7", "lam": "s8"}
#: when a parameter has an effect: a sweep of it under any other config is not a sweep
RELEVANT = {
    "cluster_ratio": lambda config: config.get("recycler") != "none",
    "lam": lambda config: config.get("merger") == "text-aware",
    "layer": lambda config: config.get("merger") != "none",
    "keep_ratio": lambda config: config.get("merger") != "none",
}
#: most sweeps drawn in one panel (the largest groups)
MAX_SERIES = 4


@dataclass(frozen=True)
class Series:
    """Stored runs that differ only in ``parameter``: ``x`` sorted, ``y`` the metric.

    fixed: the config values shared by every run (without the parameter); benchmarks: their specs.
    """

    parameter: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    fixed: dict[str, Any]
    benchmarks: list[Any]
    metric: str


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Every run record of the store at ``path`` (the last one of each key).

    Raises ``ValueError`` if the file is missing or holds no record.
    """
    from ablations.store import ResultStore

    store = ResultStore(path)
    if not store.path.is_file():
        raise ValueError(
            f"no results store at {store.path}: fill it with `python ablations/sweep.py s6` (or "
            "ablations/run.py), or point --store at one"
        )
    # a run of a compression config; the store also keeps reference selections (the oracle)
    records = [r for r in store.records().values() if "method" in r["config"]]
    if not records:
        raise ValueError(f"the results store {store.path} holds no complete run record")
    return records


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def baselines(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Avg. score of the uncompressed run (retention 1, no merger), by canonical benchmarks."""
    out = {}
    for record in records:
        config = record["config"]
        if config.get("retention") == 1.0 and config.get("merger") == "none":
            out[_canonical(record["benchmarks"])] = float(record["avg"])
    return out


def find_series(
    records: Sequence[dict[str, Any]],
    parameter: str,
    metric: str = "auto",
    vary: Sequence[str] = (),
) -> list[Series]:
    """Groups of records equal in everything but ``parameter`` (and the fields in ``vary``,
    which then become part of the group key): largest groups first, ties by the fixed values.

    metric: ``pct`` (% of the uncompressed run; a group without that run is skipped), ``avg``,
    or ``auto`` (``pct`` where possible, else ``avg``).
    """
    if metric not in ("auto", "pct", "avg"):
        raise ValueError(f"metric must be auto, pct or avg, got {metric!r}")
    base = baselines(records)
    groups: dict[str, dict[float, dict[str, Any]]] = defaultdict(dict)
    fixed_of: dict[str, tuple[dict[str, Any], list[Any]]] = {}
    for record in records:
        config = dict(record["config"])
        if parameter not in config or (
            config.get("retention") == 1.0 and config.get("merger") == "none"
        ):
            continue
        if not RELEVANT.get(parameter, lambda _: True)(config):
            continue
        value = float(config.pop(parameter))
        key = _canonical([config, record["benchmarks"]])
        groups[key][value] = record  # the store keeps the last record of a key
        fixed_of[key] = (config, record["benchmarks"])
    series = []
    for key, runs in groups.items():
        if len(runs) < 2:
            continue
        fixed, benches = fixed_of[key]
        reference = base.get(_canonical(benches))
        use_pct = metric == "pct" or (metric == "auto" and reference)
        if use_pct and not reference:
            continue
        xs = tuple(sorted(runs))
        ys = tuple(
            100.0 * float(runs[x]["avg"]) / reference if use_pct else float(runs[x]["avg"])
            for x in xs
        )
        series.append(Series(parameter, xs, ys, fixed, benches, "pct" if use_pct else "avg"))
    series.sort(key=lambda s: (-len(s.x), _canonical(s.fixed)))
    return series


def differing_keys(series: Sequence[Series]) -> list[str]:
    """The config fields whose fixed value is not the same in every series."""
    keys = sorted(set().union(*(s.fixed for s in series))) if series else []
    return [k for k in keys if len({_canonical(s.fixed.get(k)) for s in series}) > 1]


def in_legend_order(series: Sequence[Series]) -> list[Series]:
    """Series sorted by the values that tell them apart (K = 1, 2, 3 rather than by size)."""
    keys = differing_keys(series)

    def key(s: Series) -> list[tuple[int, Any]]:
        values = [s.fixed.get(k) for k in keys]
        return [(0, v) if isinstance(v, (int, float)) else (1, str(v)) for v in values]

    return sorted(series, key=key)


def series_labels(series: Sequence[Series]) -> list[str]:
    """A legend label per series: the fixed values in which the series differ from each other."""
    if len(series) <= 1:
        return ["ours"] * len(series)
    differing = differing_keys(series)
    bench_differ = len({_canonical(s.benchmarks) for s in series}) > 1
    labels = []
    for s in series:
        parts = [f"{SYMBOLS.get(k, k)} = {s.fixed.get(k)}" for k in differing]
        if bench_differ:
            parts.append("+".join(str(b.get("name", b)) for b in s.benchmarks))
        labels.append(", ".join(parts) or "ours")
    return labels


def paper_curve(parameter: str) -> tuple[list[float], list[float]] | None:
    """(values, % of vanilla) printed in the paper for ``parameter``, or None."""
    if parameter not in PAPER_TABLES:
        return None
    from ablations.paper_tables import TABLES

    table = TABLES[PAPER_TABLES[parameter]]
    xs = sorted(float(v) for v in table.values)
    by_value = {float(k): v for k, v in table.paper.items()}
    return xs, [by_value[x][-1] for x in xs]


def _ylabel(series: Sequence[Series]) -> str:
    metrics = {s.metric for s in series}
    if metrics == {"pct"}:
        return "Avg. score, % of uncompressed"
    return "Avg. score" if metrics == {"avg"} else "Avg. score or %"


def _panel(ax: Any, parameter: str, series: list[Series], paper: bool) -> int:
    """Draw one parameter's sweeps; returns the number of drawn series."""
    from ustc.config import PAPER_DEFAULTS

    ax.set_xlabel(PARAMETERS[parameter])
    ax.set_title(TITLES[parameter], fontsize=10)
    shown = in_legend_order(series[:MAX_SERIES])
    if not shown:
        ax.text(
            0.5,
            0.5,
            f"no sweep of {parameter}\nin the store",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.4",
            fontsize=9,
            gid="empty",
        )
        ax.set_xticks([])
        ax.set_yticks([])
        return 0
    for i, (s, label) in enumerate(zip(shown, series_labels(shown), strict=True)):
        ax.plot(s.x, s.y, marker="o", color=f"C{i}", label=label, gid=f"series-{parameter}")
        best = max(range(len(s.x)), key=lambda j: s.y[j])
        ax.plot([s.x[best]], [s.y[best]], marker="*", ms=12, color=f"C{i}", ls="none")
    default = PAPER_DEFAULTS.get(parameter)
    lo, hi = min(min(s.x) for s in shown), max(max(s.x) for s in shown)
    if default is not None and lo <= default <= hi:  # the paper's K = 18 is off a lab axis
        ax.axvline(default, color="0.6", ls=":", lw=1)
    ax.set_ylabel(_ylabel(shown))
    ax.grid(alpha=0.3)
    curve = paper_curve(parameter) if paper else None
    if curve is not None:
        twin = ax.twinx()
        twin.plot(*curve, color="0.5", ls="--", marker="x", lw=1, label="paper (LLaVA-OV-7B)")
        twin.set_ylabel("paper, % of uncompressed", color="0.45", fontsize=8)
        twin.tick_params(axis="y", colors="0.45", labelsize=7)
        lines = ax.get_legend_handles_labels()
        extra = twin.get_legend_handles_labels()
        ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=7, loc="best")
    else:
        ax.legend(fontsize=7, loc="best")
    if parameter == "layer":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return len(shown)


def plot_parameters(
    records: Sequence[dict[str, Any]], metric: str = "auto", paper: bool = True, title: str = ""
) -> tuple[Figure, dict[str, int]]:
    """The figure and, per panel, how many sweeps it draws (0: the panel says none is stored)."""
    fig = Figure(figsize=(13.5, 7.2))
    axes = fig.subplots(2, 3).ravel()
    drawn = {}
    for ax, parameter in zip(axes, PARAMETERS, strict=False):
        drawn[parameter] = _panel(ax, parameter, find_series(records, parameter, metric), paper)
    axes[-1].set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig, drawn


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = output_parser(__doc__.splitlines()[0], "analysis/params.py")
    parser.add_argument("--store", default="results/ablations.jsonl", help="JSONL results store")
    parser.add_argument(
        "--metric",
        default="auto",
        choices=("auto", "pct", "avg"),
        help="pct: %% of the uncompressed run; avg: Avg. score; auto: pct if "
        "the store has the uncompressed run",
    )
    parser.add_argument("--no-paper", action="store_true", help="do not overlay the paper's curves")
    parser.add_argument("--stem", default="params")
    args = parser.parse_args(argv)
    try:
        records = load_records(args.store)
    except ValueError as exc:
        fail(str(exc))
    fig, drawn = plot_parameters(
        records, args.metric, not args.no_paper, f"{len(records)} runs from {args.store}"
    )
    if not any(drawn.values()):
        print(f"warning: no sweep found in {args.store}: every panel is empty", file=sys.stderr)
    for name, count in drawn.items():
        print(f"{name:12s} {count} sweep(s)")
    paths = save_figure(fig, args.out, args.stem)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
