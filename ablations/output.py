"""What a run prints: its record beside the paper's row, its configuration in words (and a few
words for its progress bars), the ``--list`` of every strategy and benchmark, and what a Ctrl-C
left stored."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from ustc import strategies  # noqa: F401  (registers the built-in strategies)
from ustc.config import CompressionConfig
from ustc.evaluation import (
    BENCHMARKS,
)
from ustc.registry import REGISTRIES

if TYPE_CHECKING:
    from ablations.plan import RunPlan
    from ablations.store import ResultStore


def format_record(record: dict[str, Any]) -> str:
    """A short Markdown table of one run: the uncompressed model's row (when the record has its
    baseline), the paper's printed figure for the same setting (when the paper prints one), then
    the run."""
    from ablations.paper_tables import paper_figure

    cols = record.get("columns") or list(record["scores"])
    head = ["", *cols, "Avg.", "%", "FLOPs (T)", "tokens", "time (s)"]
    flops = record.get("flops") or {}
    tokens = flops.get("llm_visual_tokens")
    tok = "-" if tokens is None else f"{tokens}/{flops.get('visual_tokens')}"
    if flops.get("after_merge_tokens") not in (None, tokens):
        tok += f" -> {flops['after_merge_tokens']}"
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    baseline = record.get("baseline")
    if baseline is not None:
        full = flops.get("visual_tokens")
        row = ["uncompressed"] + [
            "-" if baseline["scores"].get(c) is None else f"{baseline['scores'][c]:.1f}"
            for c in cols
        ]
        row += [
            f"{baseline['avg']:.1f}",
            "100.0",
            "-" if flops.get("vanilla_tflops") is None else f"{flops['vanilla_tflops']:.3g}",
            "-" if full is None else f"{full}/{full}",
            f"{baseline.get('timings', {}).get('wall', float('nan')):.1f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
        try:
            config = CompressionConfig.from_dict(record["config"])
        except Exception:  # a record of another version: no paper figure, nothing else lost
            config = None
        paper = paper_figure(config) if config is not None else None
        if paper is not None:
            label, printed = paper
            row = [f"paper, LLaVA-OV-7B ({label})"] + ["-"] * len(cols)
            row += [f"{printed[-2]:.1f}", f"{printed[-1]:.1f}", "-", "-", "-"]
            lines.append("| " + " | ".join(row) + " |")
    oracle = record.get("oracle")
    if oracle is not None:
        row = ["oracle (keeps the evidence)"]
        row += [
            "-" if oracle["scores"].get(c) is None else f"{oracle['scores'][c]:.1f}" for c in cols
        ]
        pct = "-" if baseline is None else f"{100.0 * oracle['avg'] / baseline['avg']:.1f}"
        kept = "-" if tokens is None else f"{tokens}/{flops.get('visual_tokens')}"  # no merging
        row += [f"{oracle['avg']:.1f}", pct, "-", kept, f"{oracle['timings'].get('wall', 0.0):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    row = (
        ["this run"]
        + [f"{record['scores'][c]:.1f}" for c in cols]
        + [
            f"{record['avg']:.1f}",
            "-"
            if record.get("pct_of_uncompressed") is None
            else f"{record['pct_of_uncompressed']:.1f}",
            "-" if flops.get("tflops") is None else f"{flops['tflops']:.3g}",
            tok,
            f"{record['timings'].get('wall', float('nan')):.1f}",
        ]
    )
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def short_label(config: CompressionConfig) -> str:
    """A few words naming a run for its progress bar: ``r=0.02 attn+sim/greedy/dpc text-aware``
    (ustc's method) or ``r=0.02 visionzip none``."""
    c = config
    stages = f"{c.scorer}/{c.pool}/{c.recycler}" if c.method == "ustc" else c.method
    return f"r={c.retention:g} {stages} {c.merger}"


def describe_config(config: CompressionConfig, in_llm_source: str = "default") -> str:
    """One line saying what runs: the method and its own parameters (the scorer, pool and
    recycler only for ustc's method, the only one that uses them), then the in-LLM stage and
    where it came from (``in_llm_source``: ``method``, the baseline's published in-LLM stage;
    ``given``, flags on the command line; ``default``, the config's default)."""
    c = config
    if c.method == "ustc":
        text = (
            f"r={c.retention:g} method=ustc scorer={c.scorer} pool={c.pool}(tau={c.tau:g}) "
            f"recycler={c.recycler}"
        )
        if c.recycler != "none":
            text += f"(cluster_ratio={c.cluster_ratio:g}, k={c.k})"
    else:
        text = f"r={c.retention:g} method={c.method}"
    text += f" merger={c.merger}"
    if c.merger != "none":
        text += f"(K={c.layer}, R={c.keep_ratio:g}"
        text += f", lambda={c.lam:g})" if c.merger == "text-aware" else ")"
    if c.method != "ustc":
        text += {
            "method": f" [{c.method}'s published in-LLM stage; --merger text-aware adds ustc's]",
            "given": " [in-LLM stage as given on the command line]",
            "default": f" [{c.method} declares no in-LLM stage: the config's default]",
        }[in_llm_source]
    if c.params:
        text += f" params={c.params}"
    return text


def list_everything() -> str:
    lines = []
    for kind, registry in REGISTRIES.items():
        for name in registry.names():
            params = ", ".join(
                p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                for p in registry.params(name)
            )
            lines.append(f"{kind:9s} {name:14s} {params}")
    for name in BENCHMARKS.names():
        params = ", ".join(p.name for p in BENCHMARKS.params(name))
        lines.append(f"{'benchmark':9s} {name:14s} {params}")
    return "\n".join(lines)


def interrupted_message(plan: RunPlan, store: ResultStore | None) -> str:
    """What a Ctrl-C of ``run.py`` leaves: which of the run's rows are stored, and how to go on."""
    if store is None:
        return "\ninterrupted: nothing was stored (--no-store)"
    try:
        records = store.records()
    except Exception as exc:  # the summary must not hide the interruption itself
        return f"\ninterrupted: the store {store.path} keeps every finished run ({exc})"
    rows = [("uncompressed", plan.baseline_key()), ("this run", plan.key)]
    if plan.args.no_baseline:
        rows = rows[1:]
    stored = [name for name, key in rows if key in records]
    missing = [name for name, key in rows if key not in records]
    return (
        f"\ninterrupted: {store.path} keeps its {len(records)} stored row(s)"
        + (f", {' and '.join(stored)} among them" if stored else "")
        + (f"; {' and '.join(missing)} not stored" if missing else "")
        + "; the same command resumes (stored rows are read, not redone)"
    )
