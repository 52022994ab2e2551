"""What a run prints: its record beside the paper's row, its configuration in words, and the
``--list`` of every strategy and benchmark."""

from __future__ import annotations

import inspect
from typing import Any

from ustc import strategies  # noqa: F401  (registers the built-in strategies)
from ustc.config import CompressionConfig
from ustc.evaluation import (
    BENCHMARKS,
)
from ustc.registry import REGISTRIES


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
