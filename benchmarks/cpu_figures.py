"""The CPU figures of docs/performance.md: ustc against every registered baseline, time and peak
extra memory, at 32 frames and over 16-256 frames.  Run through ``benchmarks/compressor.py``:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/compressor.py --cpu-figures --write docs/performance.md
    python benchmarks/compressor.py --cpu-figures --quick        # toy sizes, the same tables

Times are medians of interleaved rounds (every method once per round, in turn, so that a change
of the machine's load hits all of them alike) after one warm-up, on ``THREADS`` torch threads;
the ratio is a method's time over ustc's in the same rounds; the scaling table's rounds run every
frame count in turn.  Peak extra memory is measured in a fresh process per point: its peak RSS (VmHWM) is reset once the inputs exist, so the figure
is what the compression adds on top of them.  Inputs: ``benchmarks/synthetic.py``'s structured
video, 196 tokens per frame, float32, 2 % retention, no in-LLM merger.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from synthetic import make_inputs

from ustc import CompressionConfig, Compressor

#: torch threads of every figure (the project's CPU machine has 2 cores)
THREADS = 2
#: the methods of the tables, in order: ustc (the paper's full method), ustc without its recycler,
#: and the registered baselines
METHODS = ("ustc", "ustc w/o recycler", "visionzip", "holitom", "fastvid", "flashvid", "sttm")
#: the methods timed over frame counts (STTM's quadtree takes seconds per call from 64 frames on)
SCALED = ("ustc", "visionzip", "holitom", "fastvid", "flashvid")
START, END = "<!-- cpu-figures:start -->", "<!-- cpu-figures:end -->"
#: the figures of the docs' CPU section, as ``--write`` rendered them
FIGURES = Path(__file__).resolve().parent / "cpu" / "figures.json"
COMMAND = (
    "OMP_WAIT_POLICY=PASSIVE python benchmarks/compressor.py --cpu-figures "
    "--write docs/performance.md"
)


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the 32-frame comparison at ``dims``, the scaling over ``frames`` at
    ``scaling_dim``, the memory check at ``long_frames`` x ``long_dim``; ``repeats`` rounds."""

    tokens: int = 196
    compare_frames: int = 32
    dims: tuple[int, ...] = (3584, 896)
    frames: tuple[int, ...] = (16, 32, 64, 128, 256)
    scaling_dim: int = 896
    long_frames: int = 256
    long_dim: int = 3584
    repeats: int = 5
    #: rounds of the scaling table, every frame count in each (calls of up to tens of seconds)
    scaling_rounds: int = 3
    #: measure peak memory (a fresh process per point, seconds each); off: reported as 0
    memory: bool = True


FULL = Plan()
QUICK = Plan(
    tokens=16,
    compare_frames=4,
    dims=(64, 32),
    frames=(2, 4),
    scaling_dim=32,
    long_frames=4,
    long_dim=64,
    repeats=1,
    scaling_rounds=1,
    memory=False,
)


def config_of(method: str) -> CompressionConfig:
    """The configuration of a table's method, 2 % retention, no in-LLM merger."""
    if method == "ustc":
        return CompressionConfig(retention=0.02, merger="none")
    if method == "ustc w/o recycler":
        return CompressionConfig(retention=0.02, recycler="none", merger="none")
    return CompressionConfig(retention=0.02, method=method, merger="none")


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds of each function over ``rounds`` interleaved rounds after one warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def fresh_process(method: str, frames: int, tokens: int, dim: int, plan: Plan = FULL) -> dict:
    """One compress call in a fresh process, the inputs made first: its time (ms) and its peak
    RSS growth (MiB; the peak, VmHWM, is reset once the inputs exist).  Without
    ``plan.memory``: the call in this process, peak 0."""
    if not plan.memory:
        call = _compressors((method,), frames, tokens, dim)[method]
        start = time.perf_counter()
        call()
        return {"ms": (time.perf_counter() - start) * 1e3, "peak_mib": 0.0}
    bench = Path(__file__).resolve().parent
    code = (
        f"import sys, time, torch; sys.path.insert(0, {str(bench)!r}); "
        f"torch.set_num_threads({THREADS});"
        "from compressor import rss_kib; from cpu_figures import config_of;"
        "from synthetic import make_inputs; from ustc import Compressor;"
        f"x, a = make_inputs({frames}, {tokens}, {dim}, 'cpu', torch.float32, 0, 'structured');"
        f"c = Compressor(config_of({method!r}));"
        "open('/proc/self/clear_refs', 'w').write('5'); before = rss_kib('VmRSS');"
        "start = time.perf_counter(); c.compress(x, a); ms = (time.perf_counter() - start) * 1e3;"
        "print(ms, (rss_kib('VmHWM') - before) / 1024)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(bench.parent), *sys.path])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    ms, peak = (float(v) for v in out.stdout.split())
    return {"ms": ms, "peak_mib": peak}


def _compressors(
    methods: tuple[str, ...], frames: int, tokens: int, dim: int
) -> dict[str, Callable[[], Any]]:
    """One call of each method's compressor on the same structured video."""
    x, a = make_inputs(frames, tokens, dim, "cpu", torch.float32, 0, "structured")
    compressors = {m: Compressor(config_of(m)) for m in methods}
    return {m: (lambda c=c: c.compress(x, a)) for m, c in compressors.items()}


def measure(plan: Plan, log: Callable[[str], None] = lambda line: print(line, flush=True)) -> dict:
    """Every figure of the CPU section, as a JSON-able dict."""
    torch.set_num_threads(THREADS)
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {THREADS} torch threads",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "load_before": _load_average(),
        "compare": [],
        "scaling": [],
    }
    for dim in plan.dims:
        medians = interleaved(
            _compressors(METHODS, plan.compare_frames, plan.tokens, dim), plan.repeats
        )
        for method in METHODS:
            row = {
                "dim": dim,
                "method": method,
                "ms": medians[method] * 1e3,
                "ratio": medians[method] / medians["ustc"],
                "peak_mib": fresh_process(method, plan.compare_frames, plan.tokens, dim, plan)[
                    "peak_mib"
                ],
            }
            report["compare"].append(row)
            log(
                f"D {dim:5d} {method:<18} {row['ms']:9.1f} ms  x{row['ratio']:.2f}  "
                f"+{row['peak_mib']:.0f} MiB"
            )
    # every (frame count, method) once per round, in turn: a change of the load over the minutes
    # this takes hits every point alike, so that the ratios between frame counts mean something
    calls = {
        (frames, method): call
        for frames in plan.frames
        for method, call in _compressors(SCALED, frames, plan.tokens, plan.scaling_dim).items()
    }
    medians = interleaved(calls, plan.scaling_rounds)
    for (frames, method), seconds in medians.items():
        point = fresh_process(method, frames, plan.tokens, plan.scaling_dim, plan)
        row = {
            "frames": frames,
            "method": method,
            "ms": seconds * 1e3,
            "peak_mib": point["peak_mib"],
        }
        report["scaling"].append(row)
        log(f"F {frames:4d} {method:<18} {row['ms']:9.1f} ms  +{row['peak_mib']:.0f} MiB")
    report["long"] = {
        "frames": plan.long_frames,
        "dim": plan.long_dim,
        **fresh_process("ustc", plan.long_frames, plan.tokens, plan.long_dim, plan),
    }
    log(f"long {report['long']}")
    report["load_after"] = _load_average()
    return report


def render(report: dict, plan: Plan = FULL) -> str:
    """The markdown of the CPU section, between (and with) its markers."""
    lines = [
        START,
        f"Made by `{COMMAND}` on {report['date']}: {report['machine']}, torch "
        f"{report['torch']}, OMP_WAIT_POLICY={report['omp_wait_policy']}.  The machine is shared "
        "with other jobs, which ran their own work meanwhile (load average "
        f"{_fmt_load(report['load_before'])} before, {_fmt_load(report['load_after'])} after, "
        "on 2 cores): absolute times move with that load, so compare ratios within one table.",
        "",
        f"**{plan.compare_frames} frames x {plan.tokens} tokens, structured video, 2 % "
        f"retention**: median of {plan.repeats} interleaved rounds; x ustc = the method's time "
        "over ustc's in the same rounds; peak extra memory in a fresh process.",
        "",
    ]
    dims = sorted({r["dim"] for r in report["compare"]}, reverse=True)
    head = "| method |" + "".join(f" D {d} (ms) | x ustc | peak (MiB) |" for d in dims)
    lines += [head, "| --- |" + " ---: | ---: | ---: |" * len(dims)]
    for method in METHODS:
        cells = []
        for d in dims:
            r = next(r for r in report["compare"] if r["dim"] == d and r["method"] == method)
            cells.append(f" {r['ms']:.1f} | {r['ratio']:.2f} | {r['peak_mib']:.0f} |")
        lines.append(f"| {method} |" + "".join(cells))
    frames = sorted({r["frames"] for r in report["scaling"]})
    lines += [
        "",
        f"**Frames {frames[0]}-{frames[-1]} x {plan.tokens} tokens, D {plan.scaling_dim}**: "
        f"median of {plan.scaling_rounds} rounds after a warm-up, every frame count and method "
        "once per round, in turn; peak extra memory in a fresh process; x prev = the time over "
        "the previous frame count's (a doubling of the tokens).",
        "",
        "| frames | N |" + "".join(f" {m} (ms) | x prev | peak (MiB) |" for m in SCALED),
        "| ---: | ---: |" + " ---: | ---: | ---: |" * len(SCALED),
    ]
    for i, f in enumerate(frames):
        cells = []
        for m in SCALED:
            r = next(r for r in report["scaling"] if r["frames"] == f and r["method"] == m)
            prev = (
                next(
                    p
                    for p in report["scaling"]
                    if p["frames"] == frames[i - 1] and p["method"] == m
                )
                if i
                else None
            )
            ratio = f"{r['ms'] / prev['ms']:.1f}x" if prev else ""
            cells.append(f" {r['ms']:.1f} | {ratio} | {r['peak_mib']:.0f} |")
        lines.append(f"| {f} | {f * plan.tokens} |" + "".join(cells))
    long = report["long"]
    lines += [
        "",
        f"ustc at {long['frames']} frames x {plan.tokens} tokens, D {long['dim']} (one call, "
        "fresh process): "
        f"{long['ms'] / 1e3:.1f} s, peak extra memory {long['peak_mib']:.0f} MiB.",
        "",
        *goals(report),
        END,
    ]
    return "\n".join(lines)


def goals(report: dict) -> list[str]:
    """Issue 28's speed goals, read off the figures (so that the verdicts move with them)."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    lines = ["Issue 28's goals on these figures:", ""]
    for dim in sorted({r["dim"] for r in report["compare"]}, reverse=True):
        ratio = {r["method"]: r["ratio"] for r in report["compare"] if r["dim"] == dim}
        faster = [m for m in ratio if m != "ustc" and ratio[m] < 1.0]
        clustering = [
            f"{1 / ratio[m]:.2f}x the {name}-style time (goal < 1: {verdict(ratio[m] > 1.0)})"
            for m, name in (("fastvid", "FastVID"), ("flashvid", "FlashVID"))
            if m in ratio
        ]
        lines.append(
            f"- D {dim}: ustc takes {1 / ratio['holitom']:.2f}x the HoliTom-style time (goal "
            f"<= 1: {verdict(ratio['holitom'] >= 1.0)}), {' and '.join(clustering)}; faster "
            f"than ustc here: {', '.join(faster) or 'none'}."
        )
    ustc = sorted(
        (r for r in report["scaling"] if r["method"] == "ustc"), key=lambda r: r["frames"]
    )
    steps = [
        (b["ms"] / a["ms"], a["frames"], b["frames"])
        for a, b in zip(ustc[:-1], ustc[1:], strict=True)
    ]
    worst = max(steps) if steps else (0.0, 0, 0)
    lines.append(
        f"- Frames: the largest time ratio of one doubling is {worst[0]:.1f}x "
        f"({worst[1]} -> {worst[2]} frames; goal <= 4x up to 256: {verdict(worst[0] <= 4.0)})."
    )
    long = report["long"]
    lines.append(
        f"- {long['frames']} frames at D {long['dim']}: {long['peak_mib']:.0f} MiB of extra peak "
        f"memory (goal <= 2048: {verdict(long['peak_mib'] <= 2048)})."
    )
    return lines


def write(doc: Path, block: str, report: dict) -> None:
    """Replace the CPU section of ``doc`` (between its markers) by ``block``, and keep the
    figures it was rendered from in ``FIGURES`` (the docs test renders them again)."""
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text(json.dumps(report, indent=1) + "\n")
    text = doc.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{doc} has no {START} ... {END} section to replace")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    doc.write_text(pattern.sub(lambda _: block, text, count=1))


def section(doc: Path) -> str:
    """The CPU section of ``doc``, markers included."""
    text = doc.read_text()
    return text[text.index(START) : text.index(END) + len(END)]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _load_average() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return []


def _fmt_load(load: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in load) if load else "unknown"


def main(args) -> dict:
    """``compressor.py --cpu-figures``: measure, print, and with ``--write`` update the doc."""
    plan = QUICK if args.quick else FULL
    if args.render:  # the stored figures again, e.g. after a change of the wording
        report = json.loads(FIGURES.read_text())
        write(args.render, render(report, plan), report)
        return report
    report = measure(plan)
    block = render(report, plan)
    print(block)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.write:
        write(args.write, block, report)
    return report
