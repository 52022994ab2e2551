"""Compress once, ask many: Q questions about one video, asked alone or from a prepared session.

    python benchmarks/ask_many.py                          # small LLaVA-OneVision on the CPU
    python benchmarks/ask_many.py --size 7b --device cuda  # the 7B architecture on a GPU
    python benchmarks/ask_many.py --output benchmarks/ask_many-cpu.json \
        --update-docs docs/performance.md                  # the figures of docs/performance.md

For Q = 1, 3, 10 questions about one video (random weights, the model of
``benchmarks/efficiency.py``), the wall time of

* alone: Q ``generate()`` calls on prefix + question (vision, compression, whole prefill each);
* reuse: one ``ustc.prepare`` then Q ``session.ask`` calls,
* batch (with ``--batch``): one ``ustc.prepare`` then one ``session.ask_batch`` of the Q
  questions (one ``generate()`` on Q rows),

and the peak memory of each (a fresh process per figure: peak RSS on the CPU, peak allocated
memory on CUDA), beside the prediction

    reuse(Q) = alone(Q) - (Q - 1) * S,
    S = vision + compression + prefill * (K n' / (K n' + (L - K) n'')) * (n_p' / n')

S is what a question no longer pays: the vision tower and the external compression, and the
prefix's share (n_p' of the n' tokens entering the LLM) of the layers below K, whose share of the
prefill is K n' of the K n' + (L - K) n'' token-layers (n'' tokens after the merge at K).  The
components are measured on one question asked alone, in the same run; the table compares the
measured saving alone(Q) - reuse(Q) with (Q - 1) * S.  Times are medians of ``--repeats`` rounds
after a warm-up round, alone and reuse interleaved in each round so that a burst of load on a
shared machine hits both; one torch thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import ustc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from doc_sections import replace_section  # noqa: E402
from efficiency import SIZES, build, make_inputs  # noqa: E402
from timing import sync  # noqa: E402

COUNTS = (1, 3, 10)
QUESTION_TOKENS = 20


def questions(count: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.randint(100, 1000, (1, QUESTION_TOKENS), generator=g).to(device) for _ in range(count)
    ]


def split(inputs: dict, model) -> tuple[dict, torch.Tensor]:
    """The prompt of ``make_inputs`` cut after its video: (prefix inputs, question ids)."""
    ids = inputs["input_ids"]
    cut = int((ids[0] == model.config.video_token_id).nonzero().max()) + 1
    prefix = {
        k: v[:, :cut] if k in ("input_ids", "attention_mask") else v for k, v in inputs.items()
    }
    return prefix, ids[:, cut:]


def prompt(prefix: dict, question: torch.Tensor) -> dict:
    """prefix + question: the inputs of asking alone."""
    ids = torch.cat([prefix["input_ids"], question], dim=1)
    return {**prefix, "input_ids": ids, "attention_mask": torch.ones_like(ids)}


MODES = ("alone", "reuse", "batch")


def run(model, prefix: dict, asked: list[torch.Tensor], mode: str, new_tokens: int) -> None:
    """Ask every question: each alone, from one prepared session one at a time (reuse), or
    from one prepared session in one batch."""
    if mode == "reuse":
        session = ustc.prepare(model, prefix)
        for q in asked:
            session.ask(q, max_new_tokens=new_tokens)
        session.close()
    elif mode == "batch":
        session = ustc.prepare(model, prefix)
        session.ask_batch(asked, max_new_tokens=new_tokens)
        session.close()
    else:
        with torch.no_grad():
            for q in asked:
                model.generate(**prompt(prefix, q), max_new_tokens=new_tokens)


def components(model, handle, prefix: dict, question: torch.Tensor, args) -> dict:
    """Vision (with the Eq. 1 scores), external compression and prefill times of one question
    asked alone: medians of ``--repeats`` after a warm-up."""
    durations: dict[str, list[float]] = {"vision": [], "prefill": []}
    start: dict[str, float] = {}

    def timer(name: str, begin: bool):
        def hook(*_: object) -> None:
            sync(args.device)
            if begin:
                start[name] = time.perf_counter()
            else:
                durations[name].append(time.perf_counter() - start[name])

        return hook

    hooks = []
    # registered after the compressor's hooks: the prefill excludes the compression before it
    for name, module in (
        ("vision", model.model.vision_tower),
        ("prefill", model.model.language_model),
    ):
        hooks.append(module.register_forward_pre_hook(timer(name, True)))
        hooks.append(module.register_forward_hook(timer(name, False)))
    session = ustc.prepare(model, prefix)
    prefix_in = session.prefix.keep.shape[1]
    session.close()
    kwargs = prompt(prefix, question)
    vision, prefill, process = [], [], []
    try:
        with torch.no_grad():
            for _ in range(args.repeats + 1):
                handle.reset_stats()
                for values in durations.values():
                    values.clear()
                model.generate(**kwargs, max_new_tokens=1)  # one LLM forward: the prefill
                vision.append(durations["vision"][0])
                prefill.append(durations["prefill"][0])
                process.append(handle.stats.compress_seconds)
    finally:
        for hook in hooks:
            hook.remove()
    stats = handle.stats
    n_in, n_after = stats.sequence_in, stats.sequence_after_merge
    layers = len(handle.decoder_layers())
    k = handle.config.layer if handle.merge_active else layers
    return {
        "vision_s": statistics.median(vision[1:]),
        "process_s": statistics.median(process[1:]),
        "prefill_s": statistics.median(prefill[1:]),
        "n_in": n_in,
        "n_after": n_after,
        "prefix_in": prefix_in,
        "below_k_share": k * n_in / (k * n_in + (layers - k) * n_after),
    }


def peak_memory(args, mode: str, count: int) -> float:
    """Peak memory (MiB) of a fresh process asking ``count`` questions (``mode`` of ``run``)."""
    command = [sys.executable, __file__, "--worker", mode, str(count)]
    command += ["--size", args.size, "--device", args.device, "--retention", str(args.retention)]
    command += ["--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def setup(args):
    model = build(args.size, args.device, "sdpa")
    frames = SIZES[args.size]["frames"]
    inputs = make_inputs(model, frames, args.device, question_tokens=QUESTION_TOKENS)
    prefix, _ = split(inputs, model)
    config = ustc.CompressionConfig(
        retention=args.retention, merger="text-aware", layer=SIZES[args.size]["layer"]
    )
    handle = ustc.attach(model, config)
    return model, handle, prefix, frames


def worker(args) -> None:
    mode, count = args.worker
    model, _, prefix, _ = setup(args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run(model, prefix, questions(int(count), args.device), mode, args.new_tokens)
    if args.device.startswith("cuda"):
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--retention", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--counts", type=int, nargs="*", default=list(COUNTS))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument(
        "--batch", action="store_true", help="also time one session.ask_batch of the questions"
    )
    parser.add_argument("--output", type=Path)
    parser.add_argument("--update-docs", type=Path, help="render the figures into this page")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return []
    torch.manual_seed(0)
    model, handle, prefix, frames = setup(args)
    part = components(model, handle, prefix, questions(1, args.device)[0], args)
    saved = part["vision_s"] + part["process_s"]
    saved += part["prefill_s"] * part["below_k_share"] * part["prefix_in"] / part["n_in"]
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    layers = len(handle.decoder_layers())
    setup_line = (
        f"{machine}; LLaVA-OneVision {args.size} (random weights), {frames} frames, sdpa, "
        f"retention {args.retention:g}, text-aware merge at K={handle.config.layer} of "
        f"L={layers}, questions of {QUESTION_TOKENS} tokens, {args.new_tokens} new tokens"
    )
    parts_line = (
        f"one question alone: vision {part['vision_s'] * 1e3:.1f} ms, compression "
        f"{part['process_s'] * 1e3:.1f} ms, prefill {part['prefill_s'] * 1e3:.1f} ms "
        f"(n'={part['n_in']}, n''={part['n_after']}, prefix n_p'={part['prefix_in']}); "
        f"S = {saved * 1e3:.1f} ms saved per extra question"
    )
    print(f"# {setup_line}\n# {parts_line}")
    rows = []
    for count in args.counts:
        asked = questions(count, args.device)
        modes = MODES if args.batch else MODES[:2]
        # the modes interleaved, so that a burst of load on the shared machine hits them all
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for repeat in range(args.repeats + 1):
            for mode in modes:
                sync(args.device)
                start = time.perf_counter()
                run(model, prefix, asked, mode, args.new_tokens)
                sync(args.device)
                if repeat:  # the first round is a warm-up
                    times[mode].append(time.perf_counter() - start)
        alone, reuse = statistics.median(times["alone"]), statistics.median(times["reuse"])
        predicted_saved = (count - 1) * saved
        row = {
            "questions": count,
            "alone_s": alone,
            "reuse_s": reuse,
            "predicted_reuse_s": alone - predicted_saved,
            "saved_s": alone - reuse,
            "predicted_saved_s": predicted_saved,
            # the saving measured over the predicted one (1 question: nothing to save)
            "saved_over_predicted": (alone - reuse) / predicted_saved if count > 1 else None,
        }
        if args.batch:
            row["batch_s"] = statistics.median(times["batch"])
        if not args.no_memory:
            for mode in modes:
                row[f"{mode}_peak_mib"] = peak_memory(args, mode, count)
        rows.append(row)
    header = (
        f"{'Q':>3}{'alone s':>10}{'reuse s':>10}{'predicted':>11}{'saved s':>10}"
        f"{'pred. saved':>12}{'ratio':>8}"
    )
    if args.batch:
        header += f"{'batch s':>10}"
    if not args.no_memory:
        header += f"{'alone MiB':>11}{'reuse MiB':>11}"
        header += f"{'batch MiB':>11}" if args.batch else ""
    print(header)
    for row in rows:
        line = (
            f"{row['questions']:>3}{row['alone_s']:10.3f}{row['reuse_s']:10.3f}"
            f"{row['predicted_reuse_s']:11.3f}{row['saved_s']:10.3f}"
            f"{row['predicted_saved_s']:12.3f}{_ratio(row):>8}"
        )
        if args.batch:
            line += f"{row['batch_s']:10.3f}"
        if not args.no_memory:
            line += f"{row['alone_peak_mib']:11.0f}{row['reuse_peak_mib']:11.0f}"
            line += f"{row['batch_peak_mib']:11.0f}" if args.batch else ""
        print(line)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "machine": machine,
            "setup": setup_line,
            "threads": args.threads,
            "components": {**part, "saved_per_question_s": saved},
            "command": " ".join(["python benchmarks/ask_many.py", *(argv or sys.argv[1:])]),
            "rows": rows,
        }
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        if args.update_docs:
            update_docs(args.update_docs, result)
    return rows


def _ratio(row: dict) -> str:
    ratio = row["saved_over_predicted"]
    return "-" if ratio is None else f"{ratio:.2f}"


START, END = "<!-- ask-many:start -->", "<!-- ask-many:end -->"


def render(result: dict) -> str:
    """The figures of docs/performance.md's section, from the JSON this script writes."""
    part = result["components"]
    lines = [
        f"Measured on {result['setup']}, {result['threads']} torch thread(s), with",
        "",
        f"    {result['command']}",
        "",
        f"One question alone: vision tower {part['vision_s'] * 1e3:.0f} ms, compression "
        f"{part['process_s'] * 1e3:.0f} ms, prefill {part['prefill_s'] * 1e3:.0f} ms "
        f"(n' = {part['n_in']}, n'' = {part['n_after']}, the prefix n_p' = {part['prefix_in']}), "
        f"so the predicted saving is S = {part['saved_per_question_s'] * 1e3:.0f} ms per extra "
        "question. Times are medians of the repeats (alone and reuse interleaved).",
        "",
    ]
    batch = any("batch_s" in row for row in result["rows"])
    lines += [
        "| questions | alone (s) | reuse (s) | predicted reuse (s) | saved (s) "
        "| predicted saved (s) | saved / predicted | "
        + ("batch (s) | " if batch else "")
        + "peak alone (MiB) | peak reuse (MiB) |"
        + (" peak batch (MiB) |" if batch else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if batch else ""),
    ]
    for row in result["rows"]:
        peaks = [row.get("alone_peak_mib"), row.get("reuse_peak_mib")]
        peaks += [row.get("batch_peak_mib")] if batch else []
        peak_cells = " | ".join("-" if p is None else f"{p:.0f}" for p in peaks)
        batch_cell = f"{row['batch_s']:.2f} | " if batch else ""
        lines.append(
            f"| {row['questions']} | {row['alone_s']:.2f} | {row['reuse_s']:.2f} | "
            f"{row['predicted_reuse_s']:.2f} | {row['saved_s']:.2f} | "
            f"{row['predicted_saved_s']:.2f} | {_ratio(row)} | {batch_cell}{peak_cells} |"
        )
    return "\n".join(lines)


def update_docs(page: Path, result: dict) -> None:
    """Replace the text between the ask-many markers of ``page`` with ``render(result)``."""
    replace_section(page, START, END, render(result))


if __name__ == "__main__":
    main()
