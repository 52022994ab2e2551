"""The docs' figures: one per figure of the paper, each made by one command from stored results.

    python -m analysis.figures --write             # every figure into docs/figures/ (~2 min, CPU)
    python -m analysis.figures --write fig5 figS1  # some of them
    python -m analysis.figures --check             # which figures are stale (exit status 1)
    python -m analysis.figures --list              # name, paper figure, page, what it is made from

| name | paper | made from |
|---|---|---|
| ``fig4`` | Fig. 4 | the lab model on 12 test videos (``analysis/attention_similarity.py``) |
| ``fig5`` | Fig. 5 / Tables S5-S8 | the published lab tables of docs/ablations.md |
| ``fig6`` | Fig. 6 | the lab model on 8 test videos (``analysis/token_indices.py``) |
| ``figS1`` | Fig. S1 (its FLOPs side) | Eq. S3 of ``ustc.flops`` |
| ``figS1acc`` | Fig. S1 (its accuracy side) | the lab model on the test split, R x K |
| ``figS3`` | Fig. S3 | one lab video (``analysis/token_maps.py``) |
| ``budget`` | Table 1 (budget vs accuracy) | the published baselines table of docs/baselines.md |
| ``frames`` | Table 3 (scaling with frames) | Eq. S3 of ``ustc.flops`` and the paper's printed FLOPs |

Each figure is ``docs/figures/<name>.png`` with ``docs/figures/<name>.json`` beside it: the
command, the figure's *inputs* and their SHA-256 (``inputs_sha256``), the plotted *data* and
theirs (``data_sha256``), and the PNG's (``png_sha256``).  The inputs are cheap to read again
(table text, FLOPs, lab weights digest and sampling parameters): ``tests/test_figures.py`` reads
them and fails when they no longer give the recorded fingerprint, i.e. when a figure is stale.
For the lab figures a slow test (``-m slow``) also recomputes the data.  Lab statistics are
rounded to 4 decimals before hashing, so kernel-order rounding does not change a fingerprint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
DPI = 110
LAB_WEIGHTS = ROOT / "ustc" / "lab" / "weights"
DECIMALS = 4


# ----------------------------------------------------------------------------- fingerprints


def digest(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value`` (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lab_weights_digest() -> str:
    """SHA-256 over the shipped lab weights (config.json and model.safetensors)."""
    return digest({p.name: file_digest(LAB_WEIGHTS / p.name) for p in _weight_files()})


def _weight_files() -> list[Path]:
    return [LAB_WEIGHTS / "config.json", LAB_WEIGHTS / "model.safetensors"]


def _rounded(values: Any) -> list[Any]:
    """A tensor or array as nested lists of floats rounded to :data:`DECIMALS` (NaN -> None)."""
    array = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values, dtype=float)
    out = np.round(array, DECIMALS).tolist()
    return _nan_to_none(out)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and value != value else value


# ----------------------------------------------------------------------------- published tables


def published_rows(name: str) -> list[list[str]]:
    """The body rows of the docs table ``name`` (``ablations/docs_tables.py``), as cells."""
    from ablations.docs_tables import TABLES, block_pattern

    table = TABLES[name]
    text = (ROOT / table.page).read_text()
    match = block_pattern(name).search(text)
    if match is None:
        raise ValueError(f"{table.page} has no '<!-- docs-table {name} -->' block")
    rows = [line for line in match.group(1).splitlines() if line.startswith("|")]
    return [[c.strip().strip("*").strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def _number(cell: str) -> float | None:
    return None if cell in ("-", "") else float(cell)


def sweep_inputs(tables: Sequence[str]) -> dict[str, Any]:
    """Tables S5-S8 as {table: {"values", "lab_pct", "paper_pct"}} from docs/ablations.md."""
    out = {}
    for name in tables:
        rows = published_rows(name)
        out[name] = {
            "parameter": rows[0][1].split(" = ")[0],
            "values": [float(r[1].split(" = ")[1]) for r in rows],
            "lab_pct": [_number(r[3]) for r in rows],
            "paper_pct": [_number(r[5]) for r in rows],
        }
    return out


# ----------------------------------------------------------------------------- Fig. 5


SWEEPS = {"s6": "tau (Eq. 2)", "s7": "cluster ratio", "s8": "lambda (Eq. 9)", "s5": "K (paper's)"}


def fig5_inputs() -> dict[str, Any]:
    return {"tables": sweep_inputs(list(SWEEPS))}


def draw_fig5(data: dict[str, Any]) -> Figure:
    """Four panels, lab (% of uncompressed, left axis) and paper (right axis) per parameter."""
    fig = Figure(figsize=(10, 6.4))
    axes = fig.subplots(2, 2).ravel()
    for ax, (name, label) in zip(axes, SWEEPS.items(), strict=True):
        t = data["tables"][name]
        ax.plot(t["values"], t["lab_pct"], marker="o", color="C0", label="lab (shipped model)")
        ax.set_xlabel(label)
        ax.set_ylabel("lab: % of uncompressed", color="C0")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(
            t["values"], t["paper_pct"], marker="x", ls="--", color="0.45", label="paper (OV-7B)"
        )
        twin.set_ylabel("paper: % of uncompressed", color="0.45")
        ax.set_title(f"Table {name.upper()}: {label}", fontsize=10)
        lines = ax.get_legend_handles_labels()
        extra = twin.get_legend_handles_labels()
        ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8, loc="best")
    fig.suptitle("Fig. 5 / Tables S5-S8: one parameter at a time, 2 % retention", fontsize=11)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- budget (Table 1)


def budget_inputs() -> dict[str, Any]:
    rows = published_rows("baselines")
    return {
        "retentions": [10, 5, 2, 1],
        "methods": {r[0]: [_number(c) for c in r[1:5]] for r in rows},
    }


def draw_budget(data: dict[str, Any]) -> Figure:
    """Lab accuracy against the retention ratio, one line per method (log x axis)."""
    fig = Figure(figsize=(8.5, 4.8))
    ax = fig.subplots()
    x = data["retentions"]
    for i, (method, ys) in enumerate(data["methods"].items()):
        oracle = "oracle" in method
        ours = method.startswith("ours")
        ax.plot(
            x,
            ys,
            marker="o",
            lw=2.4 if ours else 1.3,
            ls=":" if oracle else "-",
            color="0.3" if oracle else f"C{i % 10}",
            label=method.replace("*", ""),
        )
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{v} %" for v in x])
    ax.invert_xaxis()
    ax.set_xlabel("retention ratio (visual tokens kept)")
    ax.set_ylabel("lab accuracy (%), 600 test questions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title("Table 1 on the lab: accuracy as the budget shrinks", fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- FLOPs figures

#: frames for the scaling figure (the paper's Table 3 prints 16 vanilla and 64/96/128 ours)
FRAMES = [16, 32, 64, 96, 128]
#: K and R for the FLOPs side of Fig. S1 (the paper's Table S5 Ks, R on a grid)
S1_LAYERS = [2, 7, 14, 18, 21]
S1_KEEP = [0.1, 0.25, 0.5, 0.75, 0.9]


def frames_inputs() -> dict[str, Any]:
    """Eq. S3 T (LLaVA-OV-7B, R = 100) per frame count, vanilla and ours 2 %/1 %, and the
    paper's printed Table 3 values."""
    from ustc.config import CompressionConfig
    from ustc.flops import MODEL_SPECS, VANILLA, TokenSchedule, eq_s3, paper_rows

    spec = MODEL_SPECS["llava-onevision-7b"]
    ours = CompressionConfig(retention=0.02)
    curves: dict[str, list[float]] = {"vanilla": [], "ours 2%/1%": []}
    for f in FRAMES:
        s = spec.with_video(frames=f)
        for label, config in (("vanilla", VANILLA), ("ours 2%/1%", ours)):
            schedule = TokenSchedule.from_config(config, s, merge_at="output")
            curves[label].append(round(eq_s3(s, schedule).tera, DECIMALS))
    printed = [
        [r.frames, float(r.tera), "vanilla" if r.method == "Vanilla" else "ours 2%/1%"]
        for r in paper_rows()
        if r.table == "Table 3"
    ]
    return {"frames": FRAMES, "tera": curves, "paper": printed}


def draw_frames(data: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for i, (label, ys) in enumerate(data["tera"].items()):
        ax.plot(data["frames"], ys, marker="o", color=f"C{i}", label=f"{label} (Eq. S3, ustc)")
    for j, (f, t, label) in enumerate(data["paper"]):
        colour = "C0" if label == "vanilla" else "C1"
        ax.plot(
            [f],
            [t],
            marker="x",
            ms=10,
            mew=2,
            color=colour,
            ls="none",
            label="paper, Table 3" if j == 0 else None,
        )
    ax.set_yscale("log")
    ax.set_xticks(data["frames"])
    ax.set_xlabel("frames (196 tokens each)")
    ax.set_ylabel("LLM FLOPs, T multiply-adds (log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("Table 3: LLaVA-OV-7B, FLOPs as the frame count grows", fontsize=10)
    fig.tight_layout()
    return fig


def figs1_inputs() -> dict[str, Any]:
    """Eq. S3 FLOPs (% of vanilla, LLaVA-OV-7B, 32 x 196) at 2 % retention with text-aware
    merging at layer K keeping R, for each K of Table S5 and R on a grid."""
    from ustc.config import CompressionConfig
    from ustc.flops import MODEL_SPECS, VANILLA, TokenSchedule, eq_s3

    spec = MODEL_SPECS["llava-onevision-7b"]
    full = eq_s3(spec, TokenSchedule.from_config(VANILLA, spec)).total
    pct = {}
    for k in S1_LAYERS:
        row = []
        for keep in S1_KEEP:
            config = CompressionConfig(retention=0.02, layer=k, keep_ratio=keep)
            schedule = TokenSchedule.from_config(config, spec, merge_at="output")
            row.append(round(100 * eq_s3(spec, schedule).total / full, DECIMALS))
        pct[str(k)] = row
    no_merge = CompressionConfig(retention=0.02, merger="none")
    flat = eq_s3(spec, TokenSchedule.from_config(no_merge, spec)).total
    return {"keep": S1_KEEP, "pct": pct, "no_merge": round(100 * flat / full, DECIMALS)}


def _r_by_k(data: dict[str, Any], label: str, ylabel: str, title: str, ncol: int) -> Figure:
    """Fig. S1's layout: one line per layer K (``label`` formats it) over R, and the no-merge
    level as a dashed line."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for i, (k, ys) in enumerate(data["pct"].items()):
        ax.plot(data["keep"], ys, marker="o", color=f"C{i}", label=label.format(k=k))
    ax.axhline(data["no_merge"], color="0.4", ls="--", lw=1, label="no in-LLM merging")
    ax.set_xlabel("R, share of the visual tokens kept at layer K")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=ncol)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def draw_figs1(data: dict[str, Any]) -> Figure:
    return _r_by_k(
        data,
        "K = {k}",
        "LLM FLOPs, % of uncompressed (Eq. S3)",
        "Fig. S1, computation side: LLaVA-OV-7B, 2 % retention, text-aware merging",
        ncol=2,
    )


# ----------------------------------------------------------------------------- lab figures

#: the lab samples and settings of the lab figures (small: the whole --write stays ~2 minutes)
FIG4 = {
    "split": "test",
    "start": 0,
    "limit": 12,
    "retention": 0.02,
    "methods": ["ours", "attn", "holitom"],
}
FIG6 = {
    "split": "test",
    "start": 0,
    "limit": 8,
    "retention": 1.0,
    "keep_ratio": 0.5,
    "lam": 0.5,
    "bins": 32,
}
FIGS3 = {"split": "test", "index": 0, "retention": 0.1, "methods": ["ours", "attn"]}


def _lab_inputs(params: dict[str, Any]) -> dict[str, Any]:
    """What a lab figure is made from: its settings, the lab weights and the videos it uses."""
    if "index" in params:
        indices = [params["index"]]
    else:
        indices = list(range(params["start"], params["start"] + params["limit"]))
    return {
        "params": params,
        "lab_weights": lab_weights_digest(),
        "videos": lab_videos_digest(params["split"], indices),
    }


def lab_videos_digest(split: str, indices: Sequence[int]) -> str:
    """SHA-256 over the lab videos ``indices`` of ``split``: frames, question and answer (a
    change of the scene generator changes it; generating 12 videos takes milliseconds)."""
    from ustc.lab.scenes import make_sample

    parts = []
    for i in indices:
        sample = make_sample(split, i)
        q = sample.question
        parts.append(
            [
                hashlib.sha256(sample.frames.tobytes()).hexdigest(),
                q.text,
                q.options,
                q.answer,
                sample.family,
            ]
        )
    return digest(parts)


def _compress_lab(params: dict[str, Any], start: int, count: int) -> tuple[Any, Any, dict]:
    """Lab videos ``start ..`` of ``params["split"]`` compressed by each of ``params["methods"]``
    at ``params["retention"]``: (one of the configs, their VideoTokens, {name: result})."""
    from analysis.common import lab_samples, load_lab_model, parse_methods, video_tokens
    from ustc.compressor import Compressor

    methods = parse_methods(",".join(params["methods"]), params["retention"])
    tokens = video_tokens(load_lab_model(), lab_samples(params["split"], start, count))
    results = {
        name: Compressor(config).compress(tokens.features, tokens.scores)
        for name, config in methods.items()
    }
    return next(iter(methods.values())), tokens, results


def fig4_data(inputs: dict[str, Any]) -> dict[str, Any]:
    """Per method: the kept tokens' attention percentiles and max similarities (12 videos)."""
    from analysis.attention_similarity import kept_token_stats
    from analysis.common import method_label

    p = inputs["params"]
    config, tokens, results = _compress_lab(p, p["start"], p["limit"])
    stats = {}
    for name, result in results.items():
        att, sim = kept_token_stats(tokens.scores, result)
        stats[method_label(name)] = {"attention": _rounded(att), "similarity": _rounded(sim)}
    f, n = tokens.scores.shape[1:]
    return {"stats": stats, "budget": config.budget(f, n), "tokens": f * n, "videos": p["limit"]}


def draw_fig4(data: dict[str, Any]) -> Figure:
    from analysis.attention_similarity import plot_distributions

    stats = {
        label: (
            np.array(s["attention"], dtype=float),
            np.array([np.nan if v is None else v for v in s["similarity"]], dtype=float),
        )
        for label, s in data["stats"].items()
    }
    title = (
        f"Fig. 4 on the lab: {data['videos']} test videos, 2 % retention "
        f"({data['budget']} of {data['tokens']} tokens per video)"
    )
    return plot_distributions(stats, title)


def fig6_data(inputs: dict[str, Any]) -> dict[str, Any]:
    """Per merger: P(position kept at layer K) over the 800 lab tokens (8 videos)."""
    from analysis.common import lab_grid, lab_samples, load_lab_model
    from analysis.token_indices import MERGERS, kept_indices, selection_probability
    from ustc.lab.model import default_config

    p = inputs["params"]
    base = default_config(retention=p["retention"], keep_ratio=p["keep_ratio"], lam=p["lam"])
    model = load_lab_model()
    samples = lab_samples(p["split"], p["start"], p["limit"])
    f, per_frame = lab_grid(model)
    m = base.budget(f, per_frame)
    probs = {
        label: _rounded(
            selection_probability(kept_indices(model, base.replace(merger=name), samples), m)
        )
        for name, label in MERGERS.items()
    }
    return {"probs": probs, "layer": base.layer, "frames": f, "videos": p["limit"]}


def draw_fig6(data: dict[str, Any]) -> Figure:
    from analysis.token_indices import plot_indices

    probs = {k: torch.tensor(v) for k, v in data["probs"].items()}
    title = (
        f"Fig. 6 on the lab: {data['videos']} test videos, all 800 tokens enter the LLM, "
        f"K = {data['layer']}, R = {FIG6['keep_ratio']:g}"
    )
    return plot_indices(probs, FIG6["keep_ratio"], data["frames"], FIG6["bins"], title)


def figs3_data(inputs: dict[str, Any]) -> dict[str, Any]:
    """One lab video, per method: the compression's indices, assignment and status (the frames
    are a function of the split and index: drawn again from the lab, not stored)."""
    from analysis.common import method_label
    from ustc.lab.scenes import make_sample

    p = inputs["params"]
    config, tokens, results = _compress_lab(p, p["index"], 1)
    rows = {
        method_label(name): {
            "indices": r.indices[0].tolist(),
            "assignment": r.assignment[0].tolist(),
            "status": r.status[0].tolist(),
        }
        for name, r in results.items()
    }
    sample = make_sample(p["split"], p["index"])
    f, n = tokens.scores.shape[1:]
    return {
        "rows": rows,
        "question": sample.question.text,
        "family": sample.family,
        "budget": config.budget(f, n),
        "tokens": f * n,
    }


def draw_figs3(data: dict[str, Any]) -> Figure:
    from analysis.token_maps import plot_token_maps
    from ustc.lab.scenes import make_sample

    pixels = make_sample(FIGS3["split"], FIGS3["index"]).frames
    rows = {label: _result(r) for label, r in data["rows"].items()}
    title = (
        f"Fig. S3 on the lab: test video {FIGS3['index']} ({data['family']}): "
        f'"{data["question"]}"  r = {FIGS3["retention"]:g}, {data["budget"]} of '
        f"{data['tokens']} tokens"
    )
    return plot_token_maps(pixels, rows, title)


def _result(stored: dict[str, list[int]]) -> Any:
    """A one-video CompressionResult from its stored indices, assignment and status."""
    from ustc.compressor import CompressionResult

    fields = {k: torch.tensor([v]) for k, v in stored.items()}
    m = fields["indices"].shape[1]
    return CompressionResult(
        tokens=torch.zeros(1, m, 1),
        indices=fields["indices"],
        assignment=fields["assignment"],
        merged=torch.zeros(1, m, dtype=torch.bool),
        status=fields["status"].to(torch.int8),
    )


# ----------------------------------------------------------------------------- the registry


# ----------------------------------------------------------------------------- Fig. S1, accuracy

#: the lab's R x K grid of Fig. S1: 2 % retention (the lab's default method), text-aware merging
#: at each layer K of the lab's 4-layer LLM that leaves layers after it, keeping R of the visual
#: tokens; the whole test split (600 questions, about 25 s a setting on 2 quiet cores)
FIGS1_ACC = {
    "split": "test",
    "start": 0,
    "limit": 600,
    "retention": 0.02,
    "layers": [1, 2, 3],
    "keep": [0.25, 0.5, 0.75],
}


def figs1_acc_data(inputs: dict[str, Any]) -> dict[str, Any]:
    """Lab accuracy (% of uncompressed) for each (K, R) of ``FIGS1_ACC``, and without merging."""
    from ustc.lab.evaluate import evaluate
    from ustc.lab.model import default_config, load_model

    params = inputs["params"]
    model = load_model()
    limit = params["limit"]

    def acc(config: Any, label: str) -> float:
        result = evaluate(config, params["split"], limit, progress=f"figS1acc {label}", model=model)
        return float(result.overall)

    full = acc(None, "uncompressed")
    base = default_config().replace(retention=params["retention"])
    pct = {
        str(k): [
            round(100 * acc(base.replace(layer=k, keep_ratio=r), f"K={k} R={r}") / full, 2)
            for r in params["keep"]
        ]
        for k in params["layers"]
    }
    flat = acc(base.replace(merger="none"), "no merging")
    return {
        "keep": params["keep"],
        "pct": pct,
        "no_merge": round(100 * flat / full, 2),
        "uncompressed": round(full, 2),
    }


def draw_figs1_acc(data: dict[str, Any]) -> Figure:
    return _r_by_k(
        data,
        "K = {k} (lab layers)",
        "lab accuracy, % of uncompressed",
        f"Fig. S1, accuracy side: the lab at 2 % retention, 600 test questions "
        f"(uncompressed {data['uncompressed']:.1f} %)",
        ncol=1,
    )


@dataclass(frozen=True)
class DocFigure:
    """A docs figure: its paper counterpart, the page showing it, and how it is made.

    inputs: cheap; what the figure is made from (fingerprinted by ``inputs_sha256``).
    data: the plotted numbers from the inputs (for table and FLOPs figures, the inputs
          themselves; for lab figures, a run of the lab model).
    draw: the figure from the data.
    """

    name: str
    paper: str
    page: str
    caption: str
    inputs: Callable[[], dict[str, Any]]
    draw: Callable[[dict[str, Any]], Figure]
    data: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    @property
    def uses_lab_model(self) -> bool:
        return self.data is not None

    def compute(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return inputs if self.data is None else self.data(inputs)

    @property
    def png(self) -> Path:
        return FIGURES / f"{self.name}.png"

    @property
    def record(self) -> Path:
        return FIGURES / f"{self.name}.json"


FIGURE_LIST = [
    DocFigure(
        "fig4",
        "Fig. 4",
        "analysis.md",
        "attention percentile and redundancy of the tokens each method keeps",
        lambda: _lab_inputs(FIG4),
        draw_fig4,
        fig4_data,
    ),
    DocFigure(
        "fig5",
        "Fig. 5, Tables S5-S8",
        "ablations.md",
        "accuracy against tau, cluster ratio, lambda and K (lab and paper)",
        fig5_inputs,
        draw_fig5,
    ),
    DocFigure(
        "fig6",
        "Fig. 6",
        "stages/merging.md",
        "where the tokens kept at layer K lie: text-aware against last-token",
        lambda: _lab_inputs(FIG6),
        draw_fig6,
        fig6_data,
    ),
    DocFigure(
        "figS1",
        "Fig. S1 (FLOPs side)",
        "flops.md",
        "FLOPs of in-LLM merging at each layer K and share R",
        figs1_inputs,
        draw_figs1,
    ),
    DocFigure(
        "figS1acc",
        "Fig. S1 (accuracy side)",
        "analysis.md",
        "lab accuracy of in-LLM merging at each layer K and share R",
        lambda: _lab_inputs(FIGS1_ACC),
        draw_figs1_acc,
        figs1_acc_data,
    ),
    DocFigure(
        "figS3",
        "Fig. S3",
        "stages/pool.md",
        "retained, rejected and clustered tokens of one lab video",
        lambda: _lab_inputs(FIGS3),
        draw_figs3,
        figs3_data,
    ),
    DocFigure(
        "budget",
        "Table 1",
        "baselines.md",
        "lab accuracy of every method at 10, 5, 2 and 1 % retention",
        budget_inputs,
        draw_budget,
    ),
    DocFigure(
        "frames",
        "Table 3",
        "flops.md",
        "LLM FLOPs against the frame count, vanilla and ours 2 %/1 %",
        frames_inputs,
        draw_frames,
    ),
]
FIGURES_BY_NAME = {f.name: f for f in FIGURE_LIST}


def command(figure: DocFigure) -> str:
    return f"python -m analysis.figures --write {figure.name}"


def write(figure: DocFigure) -> Path:
    """Make ``figure`` from its inputs; write its PNG and its JSON record; return the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    inputs = figure.inputs()
    # drawn from the data as the record stores them (JSON), so the record redraws the PNG
    data = json.loads(json.dumps(figure.compute(inputs)))
    fig = figure.draw(data)
    FIGURES.mkdir(parents=True, exist_ok=True)
    # no timestamp or software version in the file: the same data give the same bytes
    fig.savefig(figure.png, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    record = {
        "figure": figure.name,
        "paper": figure.paper,
        "page": f"docs/{figure.page}",
        "command": command(figure),
        "inputs_sha256": digest(inputs),
        "data_sha256": digest(data),
        "png_sha256": file_digest(figure.png),
        "inputs": inputs,
        "data": data if figure.uses_lab_model else "= inputs",
    }
    figure.record.write_text(record_text(record))
    return figure.png


def record_text(record: dict[str, Any]) -> str:
    """A record as JSON: keys in insertion order (the order of a figure's rows and legends),
    one line per list of numbers."""
    text = json.dumps(record, indent=1)
    return (
        re.sub(
            r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text
        )
        + "\n"
    )


def stale(figure: DocFigure) -> list[str]:
    """Why the committed ``figure`` no longer matches its inputs (empty: it is up to date)."""
    if not figure.png.is_file() or not figure.record.is_file():
        return [f"{figure.name}: not written yet"]
    record = json.loads(figure.record.read_text())
    reasons = []
    if record.get("inputs_sha256") != digest(figure.inputs()):
        reasons.append(f"{figure.name}: its inputs changed")
    if record.get("png_sha256") != file_digest(figure.png):
        reasons.append(f"{figure.name}: the PNG is not the one its record describes")
    return reasons


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.figures", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "names", nargs="*", help=f"figures (default all: {', '.join(FIGURES_BY_NAME)})"
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="make the figures into docs/figures/")
    mode.add_argument("--check", action="store_true", help="name the stale figures (exit 1)")
    mode.add_argument("--list", action="store_true", help="the figures and their sources")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in FIGURES_BY_NAME]
    if unknown:
        parser.error(f"unknown figure {', '.join(unknown)}; known: {', '.join(FIGURES_BY_NAME)}")
    chosen = [FIGURES_BY_NAME[n] for n in args.names] or FIGURE_LIST
    if args.list:
        for f in chosen:
            source = "the lab model" if f.uses_lab_model else "stored tables / Eq. S3"
            print(f"{f.name:8s} {f.paper:22s} docs/{f.page:22s} {source}: {f.caption}")
        return 0
    if args.check:
        reasons = [r for f in chosen for r in stale(f)]
        for reason in reasons:
            print(f"{reason}: run python -m analysis.figures --write")
        return 1 if reasons else 0
    for f in chosen:
        print(write(f).relative_to(ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
