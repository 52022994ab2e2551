"""Time the external compressor: every registered combination, scaling with frames, and the ratio
to the straightforward reference (``benchmarks/reference_impl.py``) measured in the same run.

    python benchmarks/compressor.py                       # CPU, 32 x 196 x 3584, all combinations
    python benchmarks/compressor.py --device cuda --dtype bfloat16 --scaling 16 32 64 128 256
    python benchmarks/compressor.py --dim 896 --repeats 3 --output results/compressor.json

Prints one line per measurement: median of ``--repeats`` runs (after one warm-up), and the peak
extra memory (CUDA: max_memory_allocated; CPU: peak RSS growth of a fresh process per point).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_impl import reference_compress  # noqa: E402
from timing import median_seconds  # noqa: E402

from ustc import SCORERS, CompressionConfig, Compressor  # noqa: E402

EXTERNAL_RECYCLERS = ("none", "dpc")


def make_inputs(frames: int, tokens: int, dim: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Features with video-like redundancy: each frame is a noisy copy of a few scene vectors."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.randn(tokens // 4 + 1, dim, generator=g)
    layout = torch.randint(0, scene.shape[0], (tokens,), generator=g)
    base = scene[layout]
    noise = 0.6 * torch.randn(frames, tokens, dim, generator=g)
    features = (base.unsqueeze(0) + noise).unsqueeze(0)
    attention = torch.rand(1, frames, tokens, generator=g)
    return features.to(device=device, dtype=dtype), attention.to(device)


def rss_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_memory(config: CompressionConfig, args, frames: int) -> float:
    """Peak extra memory in MiB of one compress call at ``frames`` frames."""
    if args.device.startswith("cuda"):
        features, attention = make_inputs(
            frames, args.tokens, args.dim, args.device, args.dtype, args.seed
        )
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        Compressor(config).compress(features, attention)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    # a fresh process per point; its peak RSS (VmHWM) is reset after the inputs exist, so the
    # figure is what the compression itself adds on top of them
    code = (
        "import sys, torch; sys.path.insert(0, 'benchmarks');"
        "from compressor import make_inputs, rss_kib; from ustc import CompressionConfig, Compressor;"
        f"x, a = make_inputs({frames}, {args.tokens}, {args.dim}, 'cpu', torch.{args.dtype_name}, {args.seed});"
        "open('/proc/self/clear_refs', 'w').write('5'); before = rss_kib('VmRSS');"
        f"Compressor(CompressionConfig(**{config.to_dict()!r})).compress(x, a);"
        "print((rss_kib('VmHWM') - before) / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic features")
    parser.add_argument(
        "--scaling", type=int, nargs="*", default=[], help="frame counts to scale over"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the reference timing")
    parser.add_argument("--output", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    args.dtype_name = args.dtype
    args.dtype = getattr(torch, args.dtype)

    machine = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu x{torch.get_num_threads()} threads"
    )
    print(
        f"# {machine}; {args.frames} x {args.tokens} tokens, D = {args.dim}, r = {args.retention}, "
        f"{args.dtype_name}, seed {args.seed}"
    )
    features, attention = make_inputs(
        args.frames, args.tokens, args.dim, args.device, args.dtype, args.seed
    )
    report: dict = {
        "machine": machine,
        "args": {k: str(v) for k, v in vars(args).items()},
        "combinations": [],
        "scaling": [],
    }

    scorers = [s for s in SCORERS.names() if SCORERS.get(s).__module__ == "ustc.scoring"]
    for scorer, recycler in itertools.product(scorers, EXTERNAL_RECYCLERS):
        config = CompressionConfig(
            retention=args.retention, scorer=scorer, recycler=recycler, merger="none"
        )
        compressor = Compressor(config)
        seconds = median_seconds(
            lambda c=compressor: c.compress(features, attention), args.repeats, args.device
        )
        row = {"scorer": scorer, "recycler": recycler, "median_ms": seconds * 1e3}
        if not args.no_reference and scorer != "sim":
            ref_s = median_seconds(
                lambda c=config: reference_compress(c, features.cpu(), attention.cpu()), 1, "cpu"
            )
            ours = compressor.compress(features, attention).indices.cpu()
            same = torch.equal(ours, reference_compress(config, features.cpu(), attention.cpu()))
            row.update(reference_ms=ref_s * 1e3, speedup=ref_s / seconds, identical=same)
        report["combinations"].append(row)
        extra = (
            f"  reference {row['reference_ms']:9.1f} ms  x{row['speedup']:.1f}  identical={row['identical']}"
            if "reference_ms" in row
            else ""
        )
        print(f"{scorer:>9} + {recycler:<5} {row['median_ms']:9.1f} ms{extra}")

    default = CompressionConfig(retention=args.retention, merger="none")
    for frames in args.scaling:
        x, a = make_inputs(frames, args.tokens, args.dim, args.device, args.dtype, args.seed)
        seconds = median_seconds(
            lambda x=x, a=a: Compressor(default).compress(x, a),
            max(1, args.repeats // 2),
            args.device,
        )
        mem = peak_extra_memory(default, args, frames)
        report["scaling"].append(
            {
                "frames": frames,
                "tokens": frames * args.tokens,
                "median_ms": seconds * 1e3,
                "peak_extra_mib": mem,
            }
        )
        print(
            f"frames {frames:4d}  N = {frames * args.tokens:6d}  {seconds * 1e3:10.1f} ms  peak +{mem:8.1f} MiB"
        )

    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
