"""The efficiency table, like the paper's Table 6, from the performance benchmark's JSON.

    python benchmarks/efficiency.py --size 7b --device cuda --output results/efficiency.json
    python analysis/efficiency.py results/efficiency.json --out results/figures
    python analysis/efficiency.py --measure-lab --out results/figures   # measure the lab model
    python analysis/efficiency.py --gpu benchmarks/h200 --update-docs docs/performance.md

Input: the JSON ``benchmarks/efficiency.py --output`` writes, or any object of this shape
(``docs/analysis.md`` documents it; :func:`validate` checks it)::

    {
      "machine": "NVIDIA H200", "size": "7b", "frames": 32,        # free-form context
      "rows": [
        {"method": "Vanilla", "process_ms": null, "prefill_ms": 701.2, "ttft_ms": 1104.7,
         "throughput": 27.6, "score": 56.3},
        {"method": "Ours", "process_ms": 74.0, "prefill_ms": 31.3, "ttft_ms": 473.8,
         "throughput": 35.7, "score": 50.7}
      ]
    }

``process_ms``: time of the compression itself (Eq. 1 scores, pool, clustering, in-LLM merge),
``prefill_ms``: the LLM's prefill, ``ttft_ms``: time to the first token (vision + compression +
prefill), ``throughput``: generated tokens per second, ``score``: the benchmark score; optional
``vision_ms``, ``peak_gib``, ``tokens_in``, ``tokens_after_merge`` become extra columns.  Any value
may be null (printed as "-").  The first row is the reference of the prefill speed-up ("(17x)")
unless a row says ``"reference": true``; it prints as ``701.2 (1×)``.

Writes ``<stem>.md`` and ``<stem>.csv`` (the table, with the paper's Table 6 below ours) and
``<stem>.png`` / ``<stem>.pdf`` (the table and bars of prefill time and TTFT).

``--measure-lab`` first measures the lab model on CPU (``--limit`` videos, median of
``--repeats``) for the uncompressed model and each ``--methods`` entry, writes that JSON to
``<out>/<stem>.json``, and renders it.  It is a small stand-in for the performance benchmark on a
real checkpoint: the micro model's milliseconds say nothing about LLaVA-OV-7B.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from analysis import common  # noqa: E402
from ustc.config import CompressionConfig  # noqa: E402

#: Table 6's columns; every numeric field a row may carry (checked by ``validate``)
COLUMNS = ("process_ms", "prefill_ms", "ttft_ms", "throughput", "score")
NUMERIC = (*COLUMNS, "vision_ms", "peak_gib", "tokens_in", "tokens_after_merge")

#: the paper's Table 6 (LLaVA-OV-7B): process, prefill, TTFT in ms, throughput in token/s, score
PAPER_TABLE6: list[dict[str, Any]] = [
    {
        "method": "Vanilla",
        "process_ms": None,
        "prefill_ms": 701.2,
        "ttft_ms": 1104.7,
        "throughput": 27.6,
        "score": 56.3,
    },
    {
        "method": "VisionZip",
        "process_ms": 35.8,
        "prefill_ms": 42.1,
        "ttft_ms": 451.6,
        "throughput": 35.4,
        "score": 45.8,
    },
    {
        "method": "FastVid",
        "process_ms": 8.6,
        "prefill_ms": 43.1,
        "ttft_ms": 446.2,
        "throughput": 33.8,
        "score": 46.9,
    },
    {
        "method": "HoliTom",
        "process_ms": 88.7,
        "prefill_ms": 40.5,
        "ttft_ms": 497.4,
        "throughput": 34.3,
        "score": 49.4,
    },
    {
        "method": "Ours",
        "process_ms": 74.0,
        "prefill_ms": 31.3,
        "ttft_ms": 473.8,
        "throughput": 35.7,
        "score": 50.7,
    },
]


def validate(data: Any, source: str = "input") -> list[dict[str, Any]]:
    """The rows of a performance JSON, checked; ``ValueError`` saying what is wrong otherwise."""
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not data["rows"]:
        raise ValueError(f"{source}: expected an object with a non-empty list 'rows'")
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict) or not isinstance(row.get("method"), str):
            raise ValueError(f"{source}: rows[{i}] needs a 'method' name (string)")
        for column in NUMERIC:
            value = row.get(column)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
            ):
                raise ValueError(
                    f"{source}: rows[{i}].{column} must be a number >= 0 or null, got {value!r}"
                )
    if sum(bool(r.get("reference")) for r in data["rows"]) > 1:
        raise ValueError(f"{source}: at most one row may be the reference")
    return data["rows"]


def load(path: str | Path) -> dict[str, Any]:
    """Read and validate the performance JSON at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"no performance results at {path}: write them with `python benchmarks/efficiency.py "
            f"--output {path}` (format: docs/analysis.md#efficiency-table-6), or measure the lab "
            "model with --measure-lab"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    validate(data, str(path))
    return data


def speedups(rows: Sequence[dict[str, Any]]) -> list[float | None]:
    """Prefill speed-up of each row over the reference row: prefill_ref / prefill."""
    ref = next((r for r in rows if r.get("reference")), rows[0])
    base = ref.get("prefill_ms")
    return [base / r["prefill_ms"] if base and r.get("prefill_ms") else None for r in rows]


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Table 6's columns, plus the optional ones some row fills (vision, peak memory, tokens)."""
    present = {k for row in rows for k, v in row.items() if v is not None}
    cols = ["vision_ms"] if "vision_ms" in present else []
    cols += ["process_ms", "prefill_ms", "ttft_ms", "throughput"]
    cols += [c for c in ("peak_gib", "tokens_in", "score") if c in present]
    return cols


LABELS = {
    "vision_ms": "Vision",
    "process_ms": "Process",
    "prefill_ms": "Prefill",
    "ttft_ms": "TTFT",
    "throughput": "Throughput",
    "peak_gib": "Peak (GiB)",
    "tokens_in": "Tokens",
    "score": "Score",
}


def table_cells(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> list[list[str]]:
    """Rows as Table 6 prints them: ``701.2 (1×)`` in the prefill column, "-" for missing."""

    def cell(row: dict[str, Any], col: str, speed: float | None) -> str:
        value = row.get(col)
        if value is None:
            return "-"
        if col == "tokens_in":  # visual tokens entering the LLM -> left after layer K
            after = row.get("tokens_after_merge")
            return f"{value}" if after in (None, value) else f"{value} -> {after}"
        text = f"{value:.1f}"
        if col == "prefill_ms" and speed is not None:
            # Table 6 prints whole factors: "(1×)", "(17×)"; small factors keep a decimal
            whole = speed >= 10 or abs(speed - round(speed)) < 0.05
            text += f" ({speed:.0f}×)" if whole else f" ({speed:.1f}×)"
        return text

    return [
        [row["method"], *(cell(row, c, speed) for c in cols)]
        for row, speed in zip(rows, speedups(rows), strict=True)
    ]


def _block(rows: Sequence[dict[str, Any]]) -> list[str]:
    cols = columns(rows)
    header = ["Method", *(LABELS[c] for c in cols)]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(c) + " |" for c in table_cells(rows, cols)
    ]


def markdown(rows: Sequence[dict[str, Any]], title: str) -> str:
    lines = [
        f"**{title}**",
        "",
        *_block(rows),
        "",
        "Times in ms; Throughput in token/s.",
        "",
        "**Paper, Table 6 (LLaVA-OV-7B)**",
        "",
        *_block(PAPER_TABLE6),
    ]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    fields = list(NUMERIC)
    writer.writerow(["method", *fields, "prefill_speedup"])
    for row, speed in zip(rows, speedups(rows), strict=True):
        writer.writerow(
            [
                row["method"],
                *("" if row.get(c) is None else row[c] for c in fields),
                "" if speed is None else f"{speed:.3f}",
            ]
        )
    return buf.getvalue()


def plot_efficiency(rows: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """The table (top) and bars of prefill time and TTFT per method (bottom)."""
    bars_height = 0.8 + 0.3 * len(rows)
    fig = Figure(figsize=(8.0, 1.0 + 0.32 * len(rows) + bars_height))
    grid = fig.add_gridspec(2, 2, height_ratios=[0.6 + 0.32 * len(rows), bars_height])
    ax_table = fig.add_subplot(grid[0, :])
    ax_table.set_axis_off()
    cols = columns(rows)
    table = ax_table.table(
        cellText=table_cells(rows, cols),
        colLabels=["Method", *(LABELS[c] for c in cols)],
        loc="center",
        cellLoc="center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(list(range(len(cols) + 1)))  # long method names stay readable
    table.scale(1.0, 1.25)
    names = [r["method"] for r in rows]
    for col, (key, label) in enumerate((("prefill_ms", "Prefill (ms)"), ("ttft_ms", "TTFT (ms)"))):
        ax = fig.add_subplot(grid[1, col])
        values = [r.get(key) or 0.0 for r in rows]
        bars = ax.barh(names, values, color=[f"C{i}" for i in range(len(rows))])
        for bar, row in zip(bars, rows, strict=True):
            bar.set_gid(f"bar-{key}")
            if row.get(key) is None:
                ax.text(0, bar.get_y() + bar.get_height() / 2, " n/a", va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def write_outputs(data: dict[str, Any], out: str | Path, stem: str) -> list[Path]:
    """Markdown, CSV, PNG and PDF of the table in ``data`` (validated)."""
    rows = validate(data)
    context = ", ".join(
        [str(data[k]) for k in ("model", "size", "device", "machine") if k in data]
        + ([f"{data['frames']} frames"] if "frames" in data else [])
    )
    title = "Efficiency and performance" + (f" ({context})" if context else "")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    md, cs = folder / f"{stem}.md", folder / f"{stem}.csv"
    md.write_text(markdown(rows, title))
    cs.write_text(csv_text(rows))
    return [md, cs, *common.save_figure(plot_efficiency(rows, title), folder, stem)]


# ----------------------------------------------------------------------------- GPU figures

#: where the committed output of ``benchmarks/gpu.sh`` lies (docs/performance.md renders it)
GPU_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "h200"
#: what a user with a CUDA GPU types to measure them, and the render after it
GPU_COMMAND = "bash benchmarks/gpu.sh benchmarks/h200"
#: the files ``benchmarks/gpu.sh`` writes into its folder
GPU_FILES = (
    "env.json",
    "pytest.xml",
    "compressor-bfloat16.json",
    "efficiency-sdpa.json",
    "efficiency-flash.json",
    "compressor-scaling.json",
    "compressor-float32.json",
    "gpu.log",
)
GPU_RENDER = "python analysis/efficiency.py --gpu benchmarks/h200 --update-docs docs/performance.md"
#: issue 18's targets
TARGET_MS, TARGET_MIB, TARGET_PREFILL = 5.0, 2048.0, 22.0
GPU_START, GPU_END = "<!-- gpu-figures:start -->", "<!-- gpu-figures:end -->"


def _read(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def gpu_report(folder: str | Path | None = GPU_RESULTS) -> str:
    """Markdown of ``benchmarks/gpu.sh``'s JSON files in ``folder`` beside the paper's Table 6,
    with issue 18's targets checked; "not measured yet", the commands a user types and what they
    need and write, when there are none."""
    folder = Path(folder) if folder is not None else None
    if folder is None or not (folder / "env.json").is_file():
        return "\n".join(
            [
                "**Not measured yet.**  On a machine with an NVIDIA GPU and a CUDA build of torch,",
                "from the repository root:",
                "",
                f"    {GPU_COMMAND}",
                "    " + GPU_RENDER,
                "",
                "`bash benchmarks/gpu.sh OUT_DIR` loads no weights: the 7B architecture is",
                "randomly initialised (its timings are those of real weights), about 16 GB in",
                "bfloat16 before activations. Its CUDA tests need pytest and hypothesis;",
                "the flash-attention row runs only where flash-attn is installed. It writes",
                ", ".join(f"`{name}`" for name in GPU_FILES[:-1]) + f" and `{GPU_FILES[-1]}`",
                "(everything printed) into OUT_DIR (default `results/gpu`), each step under its own",
                "time limit; a failed step is named at the end and the other steps still run.",
                "",
                "**Paper, Table 6 (LLaVA-OV-7B, 32 frames, RTX 4090 / A100)**",
                "",
                *_block(PAPER_TABLE6),
                "",
            ]
        )
    env = _read(folder, "env.json") or {}
    lines = [
        f"Measured on {env.get('device')}, torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}; bf16 products with float32 output: "
        f"{env.get('bf16_products_with_float32_output')}; flash_attn: {env.get('flash_attn')}.",
        "",
    ]
    bf16 = _read(folder, "compressor-bfloat16.json")
    if bf16:
        a = bf16["args"]
        size = f"{a['frames']} x {a['tokens']} x {a['dim']}, bfloat16, r = {a['retention']}"
        lines += [f"**Compression step, {size}** (medians of interleaved rounds)", ""]
        lines += ["| data | method | ms | x ustc |", "|---|---|---:|---:|"]
        for row in bf16["baselines"]:
            lines.append(
                f"| {row['data']} | {row['method']} | {_ms(row['median_ms'])} | {row['ratio']:.2f} |"
            )
        lines.append("")
        for data in sorted({r["data"] for r in bf16["baselines"]}):
            rows = {r["method"]: r["median_ms"] for r in bf16["baselines"] if r["data"] == data}
            best = min(rows.get("ustc blocked", float("inf")), rows.get("ustc", float("inf")))
            clustering = {m: rows[m] for m in ("holitom", "fastvid") if m in rows}
            faster = all(best < t for t in clustering.values())
            lines.append(
                f"- {data}: the full method in {_ms(best)} ms (target <= {TARGET_MS:g} ms: "
                f"{'met' if best <= TARGET_MS else 'missed'}); faster than every baseline with a "
                f"clustering stage ({', '.join(clustering)}): {'yes' if faster else 'no'}."
            )
        lines += ["", "| data | scorer + recycler | ustc | blocked | dense | identical |"]
        lines.append("|---|---|---:|---:|---:|---|")
        for row in bf16["combinations"]:
            lines.append(
                f"| {row['data']} | {row['scorer']} + {row['recycler']} | "
                f"{_ms(row.get('ustc_ms'))} | {_ms(row.get('blocked_ms'))} | "
                f"{_ms(row.get('dense_ms'))} | {row.get('identical', '-')} |"
            )
        lines.append("")
    scaling = _read(folder, "compressor-scaling.json")
    if scaling and scaling["scaling"]:
        lines += ["**Scaling, bfloat16, 2 %**", "", "| variant | frames | N | ms | x previous |"]
        lines[-1] += " peak extra MiB |"
        lines.append("|---|---:|---:|---:|---:|---:|")
        for row in scaling["scaling"]:
            ratio = row["ratio_to_previous"]
            lines.append(
                f"| {row['variant']} | {row['frames']} | {row['tokens']} | {_ms(row['median_ms'])} | "
                f"{'' if ratio is None else f'{ratio:.2f}'} | {row['peak_extra_mib']:.0f} |"
            )
        for variant in ("ustc", "blocked"):
            rows = [r for r in scaling["scaling"] if r["variant"] == variant]
            if rows:
                last = rows[-1]
                growth = [r["ratio_to_previous"] for r in rows if r["frames"] > 64]
                growth_text = ", ".join(f"{g:.2f}" for g in growth if g) or "n/a"
                lines.append(
                    f"- {variant}: {last['frames']} frames in {last['peak_extra_mib']:.0f} MiB "
                    f"extra (target <= {TARGET_MIB:.0f}: "
                    f"{'met' if last['peak_extra_mib'] <= TARGET_MIB else 'missed'}); growth per "
                    f"doubling from 64 frames on {growth_text} "
                    "(target <= 4)."
                )
        lines.append("")
    for name, label in (("efficiency-sdpa.json", "sdpa"), ("efficiency-flash.json", "flash")):
        table = _read(folder, name)
        if not table:
            continue
        rows = validate(table, name)
        lines += [f"**Table 6 on the 7B architecture, random weights, {label}**", ""]
        lines += [*_block(rows), ""]
        vanilla = next((r for r in rows if r.get("reference")), rows[0])
        low = [r for r in rows if r.get("retention") == 0.02 and r.get("merging")]
        for row, speed in zip(rows, speedups(rows), strict=True):
            if row in low and speed is not None:
                lines.append(
                    f"- {row['method']}: prefill {speed:.1f}x faster than uncompressed "
                    f"(target >= {TARGET_PREFILL:g}x: {'met' if speed >= TARGET_PREFILL else 'missed'})."
                )
        slower = [
            r["method"]
            for r in rows
            if r is not vanilla and (r.get("ttft_ms") or 0) >= (vanilla.get("ttft_ms") or 0)
        ]
        lines += [
            f"- TTFT lower than uncompressed at every retention: {'no: ' + ', '.join(slower) if slower else 'yes'}.",
            "",
        ]
    lines += ["**Paper, Table 6 (LLaVA-OV-7B, 32 frames, RTX 4090 / A100)**", ""]
    lines += [*_block(PAPER_TABLE6), ""]
    return "\n".join(lines)


def update_docs(page: str | Path, folder: str | Path | None = GPU_RESULTS) -> bool:
    """Rewrite the part of ``page`` between the gpu-figures markers with ``gpu_report``; True
    when it changed."""
    page = Path(page)
    text = page.read_text()
    if GPU_START not in text or GPU_END not in text:
        raise ValueError(f"{page} has no {GPU_START} ... {GPU_END} section")
    head, rest = text.split(GPU_START, 1)
    _, tail = rest.split(GPU_END, 1)
    new = f"{head}{GPU_START}\n{gpu_report(folder)}{GPU_END}{tail}"
    page.write_text(new)
    return new != text


# ----------------------------------------------------------------------------- lab measurement


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


class _PrefillTimer:
    """Wall time of the language model's first forward of each call (the prefill)."""

    def __init__(self, model: Any) -> None:
        lm = model.model.language_model
        self.seconds: list[float] = []
        self._start = 0.0
        self._first = True
        self._hooks = [
            lm.register_forward_pre_hook(self._pre),
            lm.register_forward_hook(self._post),
        ]

    def reset(self) -> None:
        self._first = True

    def _pre(self, module: Any, args: Any) -> None:
        if self._first:
            self._start = time.perf_counter()

    def _post(self, module: Any, args: Any, output: Any) -> None:
        if self._first:
            self.seconds.append(time.perf_counter() - self._start)
            self._first = False

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


@torch.no_grad()
def _time_video(
    model: Any, handle: Any, timer: _PrefillTimer, sample: Any, new_tokens: int, repeats: int
) -> tuple[float, float, float, float | None]:
    """(TTFT, prefill, decode time of new_tokens - 1 tokens, process) in ms for one video."""
    ids, px = common.lab_inputs(model, sample)
    inputs = {"input_ids": ids, "pixel_values_videos": px, "attention_mask": torch.ones_like(ids)}

    def generate(n: int) -> None:
        timer.reset()
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    generate(1)  # warm-up: first-call allocations are not the method's cost
    timer.seconds.clear()
    before = handle.stats.total_seconds if handle is not None else 0.0
    ttft = _median_ms(lambda: generate(1), repeats)
    prefill = 1000.0 * statistics.median(timer.seconds)
    process = None
    if handle is not None:
        process = 1000.0 * (handle.stats.total_seconds - before) / repeats
    full = _median_ms(lambda: generate(new_tokens), repeats)
    return ttft, prefill, max(full - ttft, 1e-6), process


def measure_lab(
    model: Any,
    configs: dict[str, CompressionConfig | None],
    samples: Sequence[Any],
    new_tokens: int = 16,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Table 6's columns for the lab model, one row per config (None: uncompressed).

    Per video, the median of ``repeats``: TTFT = one ``generate`` of one token; prefill = the
    language model's forward inside it; throughput = (new_tokens - 1) / (time of ``generate`` of
    ``new_tokens`` tokens - TTFT); process = the handle's score + compress + merge seconds.
    Score = lab accuracy on ``samples`` (``ustc.lab.evaluate``).  Values are means over videos.
    """
    import ustc
    from ustc.lab.evaluate import evaluate

    rows = []
    for name, config in configs.items():
        handle = ustc.attach(model, config) if config is not None else None
        timer = _PrefillTimer(model)  # after attach: its pre-hook runs after the compression
        tokens: tuple[int | None, int | None] = (None, None)
        try:
            times = [_time_video(model, handle, timer, s, new_tokens, repeats) for s in samples]
            if handle is not None:  # what the last prefill really let into the LLM
                tokens = (handle.stats.tokens_in, handle.stats.tokens_after_merge)
        finally:
            timer.remove()
            if handle is not None:
                handle.remove()
        ttft, prefill, decode, process = zip(*times, strict=True)
        score = evaluate(config, data=samples, model=model, progress=False).overall
        rows.append(
            {
                "method": name,
                "process_ms": None if handle is None else statistics.mean(process),
                "prefill_ms": statistics.mean(prefill),
                "ttft_ms": statistics.mean(ttft),
                "throughput": (new_tokens - 1) / (statistics.mean(decode) / 1000.0),
                "score": score,
                "tokens_in": tokens[0],
                "tokens_after_merge": tokens[1],
                "reference": config is None,
            }
        )
    return rows


def lab_configs(methods: str, retention: float) -> dict[str, CompressionConfig | None]:
    """Vanilla plus each of ``methods``: ``ours`` (text-aware merging at the lab's K),
    ``ours-wo-m`` (no merging), or names ``analysis.common.method_config`` knows."""
    from analysis.common import method_config
    from ustc.lab.model import default_config

    configs: dict[str, CompressionConfig | None] = {"Vanilla": None}
    for name in (n.strip() for n in methods.split(",") if n.strip()):
        if name == "ours":
            configs["Ours"] = default_config(retention=retention)
        elif name == "ours-wo-m":
            configs["Ours (w/o M)"] = default_config(retention=retention, merger="none")
        else:
            configs[common.method_label(name)] = method_config(name, retention)
    return configs


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = common.output_parser(__doc__.splitlines()[0], "analysis/efficiency.py")
    parser.add_argument("input", nargs="?", help="performance JSON (see the module docstring)")
    parser.add_argument("--stem", default="efficiency")
    parser.add_argument(
        "--gpu",
        metavar="FOLDER",
        help="render benchmarks/gpu.sh's JSON files in FOLDER beside the paper's Table 6",
    )
    parser.add_argument(
        "--update-docs", metavar="PAGE", help="with --gpu: rewrite PAGE's gpu-figures section"
    )
    lab = parser.add_argument_group("--measure-lab")
    lab.add_argument(
        "--measure-lab",
        action="store_true",
        help="measure the lab model on CPU instead of reading a file",
    )
    lab.add_argument(
        "--methods",
        default="ours-wo-m,ours",
        help="ours, ours-wo-m, Table 5 rows, registered baselines",
    )
    lab.add_argument("--retention", type=float, default=0.02)
    lab.add_argument("--new-tokens", type=int, default=16, help="tokens generated per video")
    lab.add_argument("--repeats", type=int, default=3)
    common.add_lab_args(parser, limit=6)
    args = parser.parse_args(argv)
    if args.gpu is not None:
        report = gpu_report(args.gpu)
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "gpu.md").write_text(report)
        if args.update_docs:
            update_docs(args.update_docs, args.gpu)
        print(report)
        return [folder / "gpu.md"]
    if args.measure_lab == (args.input is not None):
        common.fail("give either a performance JSON file or --measure-lab")
    try:
        if args.measure_lab:
            if args.new_tokens < 2 or args.repeats < 1:
                raise ValueError("--new-tokens must be >= 2 and --repeats >= 1")
            configs = lab_configs(args.methods, args.retention)
            model = common.load_lab_model(args.weights, args.untrained)
            samples = common.lab_samples(args.split, args.start, args.limit)
            torch.set_num_threads(1)  # a shared CPU: one thread gives steadier timings
            rows = measure_lab(model, configs, samples, args.new_tokens, args.repeats)
            data = {
                "model": common.model_label(args.untrained, args.weights),
                "device": "CPU, 1 thread",
                "frames": int(model.config.lab["frames"]),
                "videos": len(samples),
                "rows": rows,
            }
            folder = Path(args.out)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{args.stem}.json"
            path.write_text(json.dumps(data, indent=2))
            print(path)
        else:
            data = load(args.input)
    except ValueError as exc:
        common.fail(str(exc))
    paths = write_outputs(data, args.out, args.stem)
    print(markdown(validate(data), "Efficiency and performance"))
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
