"""``python -m ustc.flops`` / ``ustc-flops``: parses the flags and prints (the paper's tables, or
one config's count)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ustc.config import CompressionConfig
from ustc.flops.formula import GENERATED_TOKENS, VANILLA, eq_s3, exact
from ustc.flops.paper import _schedule_text, format_tables
from ustc.flops.schedule import _MERGE_AT, TokenSchedule
from ustc.flops.specs import MODEL_SPECS, ModelSpec, _check_int


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ustc.flops``: the paper's FLOPs columns, or one config's count."""
    parser = argparse.ArgumentParser(
        prog="python -m ustc.flops",
        description="Eq. S3 FLOPs of a Video-LLM's LLM under token compression. Without --model, "
        "print the FLOPs columns of the paper's Tables 1-3 next to the printed values.",
    )
    parser.add_argument("--model", help=f"built-in ({', '.join(MODEL_SPECS)}) or a config.json")
    parser.add_argument("--frames", type=int, help="F, frames per video")
    parser.add_argument("--tokens-per-frame", type=int, help="P, visual tokens per frame")
    parser.add_argument("--retention", type=float, default=1.0, help="r (default 1)")
    parser.add_argument("--merger", default="none", help="in-LLM merger (default none)")
    parser.add_argument("--layer", type=int, default=18, help="K (default 18)")
    parser.add_argument("--keep-ratio", type=float, default=0.5, help="R (default 0.5)")
    parser.add_argument("--text-tokens", type=int, default=0, help="prompt tokens (default 0)")
    parser.add_argument("--generated", type=int, default=GENERATED_TOKENS, help="R of Eq. S3")
    parser.add_argument(
        "--merge-at",
        choices=_MERGE_AT,
        default=None,
        help="reduce at the input or output of layer K (default: input for "
        "--model, output for the paper tables)",
    )
    args = parser.parse_args(argv)
    if args.model is None:
        print(format_tables(args.merge_at or "output"))
        return
    try:
        if args.model in MODEL_SPECS:
            spec = ModelSpec.builtin(args.model)
        else:
            spec = ModelSpec.from_config(args.model)
        spec = spec.with_video(args.frames, args.tokens_per_frame)
        config = CompressionConfig(
            retention=args.retention,
            merger=args.merger,
            layer=args.layer,
            keep_ratio=args.keep_ratio,
        )
        schedule = TokenSchedule.from_config(
            config, spec, text_tokens=args.text_tokens, merge_at=args.merge_at or "input"
        )
        vanilla = TokenSchedule.from_config(VANILLA, spec, text_tokens=args.text_tokens)
        _check_int("--generated", args.generated, minimum=0)
    except ValueError as error:
        parser.error(str(error))
    print(
        f"{spec.name}: F={spec.frames} P={spec.tokens_per_frame}, "
        f"visual tokens per layer: {_schedule_text(schedule)}, text tokens {schedule.text}"
    )
    for label, fn in (("Eq. S3", eq_s3), ("exact", exact)):
        ours, full = fn(spec, schedule, args.generated), fn(spec, vanilla, args.generated)
        print(
            f"{label:>7}: {ours.tera:.4f} T multiply-adds ({ours.ratio(full):.2%} of "
            f"{full.tera:.4f} T uncompressed)"
        )


if __name__ == "__main__":
    main()
