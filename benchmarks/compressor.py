"""Time the external compressor against the honest alternatives, in one process, interleaved.

    python benchmarks/compressor.py                       # 32 x 196 x 3584, structured video
    python benchmarks/compressor.py --data structured scenes --sections combinations baselines
    python benchmarks/compressor.py --device cuda --dtype bfloat16 --scaling 32 64 128 256
    python benchmarks/compressor.py --smoke               # every code path in seconds (CPU)
    OMP_WAIT_POLICY=PASSIVE python benchmarks/compressor.py --cpu-figures --write docs/performance.md
    python benchmarks/compressor.py --cpu-figures --quick # the same tables at toy sizes (tests)

Sections (``--sections``):

- ``combinations``: every scorer x recycler of ``ustc`` against ``dense_compress``
  (``benchmarks/reference_impl.py``: the vectorised dense implementation, one distance matrix,
  top-k, masked min, argmin) and, for DPC-KNN, ``ustc.blocked`` (the GPU path).  ``identical``
  says the kept tokens and assignments equal the dense implementation's; ``loop`` that the
  Python-loop reference keeps the same tokens too (``--no-loop`` skips it; it is slow).
- ``baselines``: the paper's method (dense-dispatch and blocked), ustc without the recycler, the
  dense implementation and the registered baselines (``ustc.METHODS``: VisionZip, HoliTom-style,
  FastVID-style, FlashVID-style, STTM) on the same inputs; ratio = the method's time / ustc's.
- ``scaling`` (``--scaling F1 F2 ...``): the paper's method over frame counts, time and peak extra
  memory (CUDA: ``max_memory_allocated``; CPU: peak RSS growth of a fresh process per point).

``--cpu-figures``: the tables of docs/performance.md's CPU section (``cpu_figures``): ustc against
every registered baseline at 32 frames (D 3584 and 896), and over 16-256 frames at D 896, time and
peak extra memory; ``--write`` replaces that section between its markers, ``--json`` keeps the
figures.

Every timing is the median of ``--repeats`` rounds after one warm-up; in each round every variant
runs once, in turn, so that a change of the machine's load hits all of them alike.  Ratios are
only meaningful within one run.  ``--output`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_impl import dense_compress, reference_compress  # noqa: E402
from synthetic import DATASETS, make_inputs  # noqa: E402
from timing import sync  # noqa: E402

from ustc import SCORERS, CompressionConfig, Compressor  # noqa: E402
from ustc.blocked import BlockedDPC, uses_low_precision_products  # noqa: E402

EXTERNAL_RECYCLERS = ("none", "dpc")
BASELINES = ("visionzip", "holitom", "fastvid", "flashvid", "sttm")
SECTIONS = ("combinations", "baselines", "scaling")
METHOD_NAMES = ("ustc", "ustc blocked", "ustc w/o recycler", "dense reference", *BASELINES)


def interleaved_medians(
    variants: dict[str, Callable[[], Any]], rounds: int, device: str
) -> dict[str, float]:
    """Median seconds of each variant over ``rounds`` rounds (one call of each per round, in
    turn), after one warm-up call of each."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def blocked_compressor(config: CompressionConfig, products: str = "auto") -> Compressor:
    """``Compressor(config)`` with ``ustc.blocked``'s DPC-KNN as its recycler (what
    ``recycle.dpc_knn`` runs on CUDA once it dispatches there)."""
    compressor = Compressor(config)
    if config.recycler == "dpc":
        compressor.recycler = BlockedDPC(k=config.k, products=products)
    return compressor


def rss_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_memory(
    config: CompressionConfig, blocked: bool, args, frames: int, inputs: tuple | None = None
) -> float:
    """Peak extra memory in MiB of one compress call at ``frames`` frames (on CUDA on
    ``inputs``, the features and attention already on the device, when given)."""
    if args.device.startswith("cuda"):
        x, a = inputs or make_inputs(
            frames, args.tokens, args.dim, args.device, args.dtype, args.seed, args.data[0]
        )
        compressor = blocked_compressor(config) if blocked else Compressor(config)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        compressor.compress(x, a)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    # a fresh process per point; its peak RSS (VmHWM) is reset after the inputs exist, so the
    # figure is what the compression itself adds on top of them
    build = "blocked_compressor" if blocked else "Compressor"
    code = (
        "import sys, torch; sys.path.insert(0, 'benchmarks');"
        "from compressor import blocked_compressor, rss_kib; from synthetic import make_inputs;"
        "from ustc import CompressionConfig, Compressor;"
        f"x, a = make_inputs({frames}, {args.tokens}, {args.dim}, 'cpu', torch.{args.dtype_name},"
        f" {args.seed}, {args.data[0]!r});"
        "open('/proc/self/clear_refs', 'w').write('5'); before = rss_kib('VmRSS');"
        f"{build}(CompressionConfig(**{config.to_dict()!r})).compress(x, a);"
        "print((rss_kib('VmHWM') - before) / 1024)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    return float(out.stdout.strip())


def combinations(args, data: str, features, attention) -> list[dict]:
    """Every scorer x recycler: ustc, ustc.blocked (dpc), the dense implementation."""
    rows = []
    scorers = [s for s in SCORERS.names() if SCORERS.get(s).__module__ == "ustc.scoring"]
    for scorer, recycler in itertools.product(scorers, EXTERNAL_RECYCLERS):
        config = CompressionConfig(
            retention=args.retention, scorer=scorer, recycler=recycler, merger="none"
        )
        ours = Compressor(config)
        variants: dict[str, Callable[[], Any]] = {
            "ustc": lambda c=ours: c.compress(features, attention)
        }
        if recycler == "dpc":
            blocked = blocked_compressor(config)
            variants["blocked"] = lambda c=blocked: c.compress(features, attention)
        if scorer != "sim":  # the references offer candidates in attention order only
            variants["dense"] = lambda c=config: dense_compress(c, features, attention)
        medians = interleaved_medians(variants, args.repeats, args.device)
        row: dict[str, Any] = {"data": data, "scorer": scorer, "recycler": recycler}
        row.update({f"{name}_ms": s * 1e3 for name, s in medians.items()})
        result = ours.compress(features, attention)
        if "blocked" in variants:
            other = blocked.compress(features, attention)
            row["blocked_same_as_ustc"] = torch.equal(other.indices, result.indices) and (
                torch.equal(other.assignment, result.assignment)
            )
        if "dense" in medians:
            indices, assignment = dense_compress(config, features, attention)
            row["speedup_vs_dense"] = medians["dense"] / medians["ustc"]
            row["identical"] = torch.equal(result.indices, indices) and torch.equal(
                result.assignment, assignment
            )
            if not args.no_loop:
                loop = reference_compress(config, features.cpu(), attention.cpu())
                row["loop_identical"] = torch.equal(loop, indices.cpu())
        rows.append(row)
        figures = "  ".join(f"{name} {s * 1e3:9.1f} ms" for name, s in medians.items())
        flags = "  ".join(
            f"{k}={row[k]}"
            for k in ("identical", "loop_identical", "blocked_same_as_ustc")
            if k in row
        )
        speed = f"  dense/ustc x{row['speedup_vs_dense']:.2f}" if "speedup_vs_dense" in row else ""
        print(f"{data:>10} {scorer:>9} + {recycler:<5} {figures}{speed}  {flags}", flush=True)
    return rows


def baselines(args, data: str, features, attention) -> list[dict]:
    """The paper's method beside the registered baselines, same inputs, interleaved rounds."""
    full = CompressionConfig(retention=args.retention, merger="none")
    methods: dict[str, Callable[[], Any]] = {}
    ours = Compressor(full)
    methods["ustc"] = lambda: ours.compress(features, attention)
    blocked = blocked_compressor(full)
    methods["ustc blocked"] = lambda: blocked.compress(features, attention)
    no_recycler = Compressor(
        CompressionConfig(retention=args.retention, recycler="none", merger="none")
    )
    methods["ustc w/o recycler"] = lambda: no_recycler.compress(features, attention)
    methods["dense reference"] = lambda: dense_compress(full, features, attention)
    for name in BASELINES:
        method = Compressor(CompressionConfig(retention=args.retention, method=name, merger="none"))
        methods[name] = lambda m=method: m.compress(features, attention)
    if args.methods:
        methods = {name: fn for name, fn in methods.items() if name in args.methods}
    medians = interleaved_medians(methods, args.repeats, args.device)
    base = medians["ustc"]
    rows = []
    for name, seconds in medians.items():
        rows.append(
            {"data": data, "method": name, "median_ms": seconds * 1e3, "ratio": seconds / base}
        )
        print(
            f"{data:>10} {name:<18} {seconds * 1e3:10.1f} ms  {seconds / base:6.2f} x ustc",
            flush=True,
        )
    return rows


def scaling(args) -> list[dict]:
    """The paper's method over frame counts: time and peak extra memory, dense dispatch and
    blocked (the blocked path on CUDA, or on the CPU with ``--blocked``)."""
    config = CompressionConfig(retention=args.retention, merger="none")
    variants = ["ustc"] + (["blocked"] if args.blocked else [])
    rows = []
    for frames in args.scaling:
        x, a = make_inputs(
            frames, args.tokens, args.dim, args.device, args.dtype, args.seed, args.data[0]
        )
        fns = {
            "ustc": lambda x=x, a=a: Compressor(config).compress(x, a),
            "blocked": lambda x=x, a=a: blocked_compressor(config).compress(x, a),
        }
        medians = interleaved_medians(
            {v: fns[v] for v in variants}, max(1, args.repeats // 2), args.device
        )
        for variant in variants:
            mem = peak_extra_memory(config, variant == "blocked", args, frames, (x, a))
            previous = next((r for r in reversed(rows) if r["variant"] == variant), None)
            ms = medians[variant] * 1e3
            row = {
                "variant": variant,
                "frames": frames,
                "tokens": frames * args.tokens,
                "median_ms": ms,
                "ratio_to_previous": ms / previous["median_ms"] if previous else None,
                "peak_extra_mib": mem,
            }
            rows.append(row)
            ratio = f"x{row['ratio_to_previous']:.2f}" if previous else ""
            print(
                f"{variant:>8} frames {frames:4d}  N = {frames * args.tokens:6d}  {ms:10.1f} ms "
                f"{ratio:>6}  peak +{mem:8.1f} MiB",
                flush=True,
            )
        del x, a
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=196, help="tokens per frame (P)")
    parser.add_argument("--dim", type=int, default=3584, help="feature size D (LLaVA-OV-7B: 3584)")
    parser.add_argument("--retention", type=float, default=0.02)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per median")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic features")
    parser.add_argument("--data", nargs="+", default=["structured"], choices=sorted(DATASETS))
    parser.add_argument(
        "--sections", nargs="+", default=["combinations", "baselines"], choices=SECTIONS
    )
    parser.add_argument(
        "--scaling", type=int, nargs="*", default=[], help="frame counts to scale over"
    )
    parser.add_argument(
        "--blocked", action="store_true", help="scale the blocked path too (default on CUDA)"
    )
    parser.add_argument(
        "--no-loop", action="store_true", help="skip the Python-loop identity check"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHOD_NAMES,
        help="baselines section: only these (ustc always; default all)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: every code path in seconds"
    )
    parser.add_argument("--output", type=Path, help="write the figures as JSON")
    parser.add_argument(
        "--cpu-figures",
        action="store_true",
        help="the CPU tables of docs/performance.md (benchmarks/cpu_figures.py); ignores the "
        "size and section options",
    )
    parser.add_argument("--quick", action="store_true", help="--cpu-figures at toy sizes")
    parser.add_argument("--write", type=Path, help="--cpu-figures: replace the doc's section")
    parser.add_argument("--json", type=Path, help="--cpu-figures: keep the figures as JSON")
    parser.add_argument(
        "--render",
        type=Path,
        help="--cpu-figures: rewrite the doc's section from the stored figures, measuring nothing",
    )
    args = parser.parse_args(argv)
    if args.cpu_figures:
        import cpu_figures

        return cpu_figures.main(args)
    if args.quick or args.write or args.json or args.render:
        parser.error("--quick, --write, --json and --render go with --cpu-figures")
    if args.smoke:
        args.frames, args.tokens, args.dim, args.repeats = 4, 16, 64, 1
        args.retention = max(args.retention, 0.1)
        args.scaling = [2, 4] if args.scaling or "scaling" in args.sections else []
    if args.methods:
        args.methods = ["ustc", *args.methods]
    if args.scaling and "scaling" not in args.sections:
        args.sections.append("scaling")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.blocked = args.blocked or args.device.startswith("cuda")
    args.dtype_name = args.dtype
    args.dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    machine = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()} threads"
    probe = torch.zeros(1, dtype=args.dtype, device=args.device)
    print(
        f"# {machine}; torch {torch.__version__}; {args.frames} x {args.tokens} tokens, "
        f"D = {args.dim}, r = {args.retention}, {args.dtype_name}, seed {args.seed}; "
        f"bf16 products with float32 output: {uses_low_precision_products(probe)}",
        flush=True,
    )
    report: dict = {
        "machine": machine,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": list(_load_average()),
        "args": {k: str(v) for k, v in vars(args).items()},
        "low_precision_products": uses_low_precision_products(probe),
        "combinations": [],
        "baselines": [],
        "scaling": [],
    }
    for data in args.data:
        if not {"combinations", "baselines"} & set(args.sections):
            break
        features, attention = make_inputs(
            args.frames, args.tokens, args.dim, args.device, args.dtype, args.seed, data
        )
        if "combinations" in args.sections:
            report["combinations"] += combinations(args, data, features, attention)
        if "baselines" in args.sections:
            report["baselines"] += baselines(args, data, features, attention)
    if "scaling" in args.sections:
        report["scaling"] = scaling(args)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
    return report


def _load_average() -> tuple[float, ...]:
    try:
        with open("/proc/loadavg") as f:
            return tuple(float(v) for v in f.read().split()[:3])
    except OSError:
        return ()


if __name__ == "__main__":
    main()
