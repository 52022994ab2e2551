"""Time the README's main job as a new user's first run: ``python ablations/run.py`` in a fresh
process, on an empty results store in a temporary directory (cold: nothing stored, videos not
rendered yet, the model loaded from disk).

    python benchmarks/main_job.py                        # one cold run: wall time and machine
    python benchmarks/main_job.py --repeats 2 --write    # and store the record beside this file
    python benchmarks/main_job.py --limit 2              # the same path on 2 questions (a check)

The stored record (``benchmarks/main_job.json``) is what README.md, docs/index.md,
docs/ablations.md and docs/lab.md quote (:func:`quote`); tests/test_benchmarks_main_job.py keeps
them equal and checks that the rows the job prints are the ones the README lists.  Rerun it with
``--write`` when the lab, its weights or the main job change, and say in ``--note`` what else was
running on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))
RECORD = Path(__file__).with_suffix(".json")
#: the rows the main job prints, by the first words of their label (format_record)
ROW_PREFIXES = ("uncompressed", "paper, LLaVA-OV-7B", "oracle", "this run")


def machine() -> dict[str, Any]:
    """What the time was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "system": f"{platform.system()} {platform.release()}",
    }


def rows_of(stdout: str) -> list[dict[str, Any]]:
    """The Markdown rows the main job printed: label and its time (s) column."""
    rows = []
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells and cells[0].startswith(ROW_PREFIXES):
            wall = cells[-1]
            rows.append({"label": cells[0], "seconds": None if wall == "-" else float(wall)})
    return rows


def cold_run(extra: list[str]) -> dict[str, Any]:
    """One run of the main job in a new process and an empty temporary directory."""
    with tempfile.TemporaryDirectory(prefix="ustc-main-job-") as tmp:
        env = {**os.environ, "WANDB_MODE": "disabled"}
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, str(ROOT / "ablations" / "run.py"), *extra],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if out.returncode != 0:
            raise SystemExit(f"the main job failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
        stored = sum(1 for _ in open(Path(tmp) / "results" / "ablations.jsonl"))
    return {
        "seconds": wall,
        "load_before": load,
        "stored_rows": stored,
        "rows": rows_of(out.stdout),
        "stdout": out.stdout,
    }


def quote(record: dict[str, Any]) -> str:
    """How the docs state the time: ``"<lo>-<hi> s"`` over the cold runs (``"<t> s"`` for one)."""
    times = [r["seconds"] for r in record["runs"]]
    lo, hi = round(min(times)), round(max(times))
    return f"{lo} s" if lo == hi else f"{lo}-{hi} s"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="cold runs, one after the other")
    parser.add_argument("--limit", type=int, default=None, help="questions (a reduced check)")
    parser.add_argument("--write", action="store_true", help=f"store the record in {RECORD}")
    parser.add_argument("--note", default="", help="conditions: what else ran on the machine")
    args = parser.parse_args(argv)
    if args.write and args.limit is not None:
        parser.error("--write stores the full main job; leave --limit out")
    extra = [] if args.limit is None else ["--limit", str(args.limit)]
    runs = []
    for i in range(args.repeats):
        run = cold_run(extra)
        runs.append(run)
        rows = ", ".join(f"{r['label'].split(' (')[0]} {r['seconds']}" for r in run["rows"])
        print(f"cold run {i + 1}/{args.repeats}: {run['seconds']:.1f} s ({rows})", flush=True)
        record = _record(args, extra, runs)
        if args.write:  # after every run: a long measurement interrupted keeps what it has
            RECORD.write_text(json.dumps(record, indent=2) + "\n")
    m = record["machine"]
    loads = ", ".join(f"{r['load_before'][0]:.1f}" for r in runs if r["load_before"])
    print(
        f"main job cold: {quote(record)} (median {record['median_seconds']:.0f} s) on "
        f"{m['cores']} cores of {m['cpu']}, torch {m['torch']}; load before: "
        f"{loads or 'unknown'}"
    )
    if args.write:
        print(f"written: {RECORD}")
    return record


def weights_digest() -> str:
    """SHA-256 (16 hex digits) of the shipped lab weights: a record of other weights is stale."""
    from ustc.lab.model import weights_path

    path = Path(weights_path()) / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _record(args: argparse.Namespace, extra: list[str], runs: list[dict[str, Any]]) -> dict:
    return {
        "command": "python ablations/run.py" + ("" if not extra else " " + " ".join(extra)),
        "measured_by": f"python benchmarks/main_job.py --repeats {args.repeats}"
        + (" --write" if args.write else ""),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "note": args.note,
        "median_seconds": statistics.median(r["seconds"] for r in runs),
        "runs": [{k: v for k, v in r.items() if k != "stdout"} for r in runs],
        "printed": runs[-1]["stdout"],
        "lab_weights": weights_digest(),
        "runs_asked": args.repeats,
    }


if __name__ == "__main__":
    main()
