"""Every method at 10/5/2/1 % retention on the laboratory benchmark, in the layout of Table 1.

    python ablations/compare.py                         # the whole lab test split (600 questions)
    python ablations/compare.py --limit 120             # a quicker look
    python ablations/compare.py --methods fastv,sttm,ours --retentions 0.02
    python ablations/compare.py --model /path/to/lab/weights --output results/compare.md

Rows, per retention r (blocks as in Table 1; the baselines come from ``ustc.baselines``):

=============  ========================================================  ===================
row            config                                                    retention column
=============  ========================================================  ===================
FastV          retention 1, merger ``fastv`` at the paper's K = 2,       100%/r
               keep_ratio r
Random         scorer ``random``, recycler none                          r
Uniform        method ``uniform``                                        r
VisionZip      method ``visionzip``                                      r
FastVID        method ``fastvid``                                        r
STTM           method ``sttm``                                           r
HoliTom        method ``holitom`` + merger ``last-token`` at the         r/(r/2)
               paper's K = 18, R = 50 %
Ours (w/o M)   the paper's method, no merger                             r
Ours           the paper's method, text-aware merger at K = 18, R = 50 %  r/(r/2)
Oracle         not a method: keeps the tokens that show the question's   r
               objects, then fills the budget evenly
               (``ustc.lab.evaluate.oracle_selector``): whether the
               budget can hold the evidence at all
=============  ========================================================  ===================

Columns: FLOPs (T) and FLOPs ratio of LLaVA-OneVision-7B (32 x 196 tokens, the paper's K) from
``ustc.flops`` (Eq. S3 with the paper's convention, reduction at the output of layer K, which
reproduces every printed FLOPs cell), so the FLOPs of a row are the paper's for that schedule;
the retention; the lab accuracy per question family and overall; % of the uncompressed lab model;
and the visual tokens the lab model's LLM actually received (measured by hooks, entering -> after
layer K).  The lab LLM has 4 layers, so the paper's K maps to round(K * 4 / 28)
(``ustc.evaluation.map_paper_layer``, as ``run.py --paper-layer``): K = 18 -> 3; FastV's K = 2
maps to 0 and is raised to 1, since FastV prunes with the attention of a layer that has seen the
whole video (the paper's K in brackets).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ustc.config import CompressionConfig  # noqa: E402
from ustc.evaluation import map_paper_layer  # noqa: E402
from ustc.flops import VANILLA, ModelSpec, count  # noqa: E402

#: Table 1's retention ratios
RETENTIONS = (0.10, 0.05, 0.02, 0.01)
#: the FLOPs columns are for the paper's main model
FLOPS_MODEL = "llava-onevision-7b"
#: K of the paper's in-LLM stages (the paper's method and HoliTom) and of FastV
PAPER_K = 18
FASTV_K = 2


@dataclass(frozen=True)
class Method:
    """One row kind: its label, how its config is built, and its retention column."""

    key: str
    label: str
    build: Callable[[float, int], CompressionConfig]  # (retention, paper K) -> config
    paper_layer: int | None = None  # the paper's K, when the row merges inside the LLM
    min_layer: int = 0  # the smallest K this row may be mapped to on a shallow LLM
    #: r -> a lab selector that picks the tokens instead of the config (the config then only
    #: gives the budget and the FLOPs)
    selector: Callable[[float], Any] | None = None

    def retention_text(self, r: float) -> str:
        config = self.build(r, 0)
        if config.retention == 1.0 and config.merger != "none":
            return f"100%/{_pct(config.keep_ratio)}"
        if config.merger != "none":
            return f"{_pct(r)}/{_pct(r * config.keep_ratio)}"
        return _pct(r)


def _oracle(r: float) -> Any:
    from ustc.lab.evaluate import oracle_selector

    return oracle_selector(r)


def _external(**fields: Any) -> Callable[[float, int], CompressionConfig]:
    def build(r: float, layer: int) -> CompressionConfig:
        return CompressionConfig(retention=r, layer=layer, **fields)

    return build


METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method(
            "fastv",
            "FastV",
            lambda r, k: CompressionConfig(retention=1.0, merger="fastv", layer=k, keep_ratio=r),
            FASTV_K,
            # at K = 0 no layer would see the whole video: FastV would become input pruning
            min_layer=1,
        ),
        Method("random", "Random", _external(scorer="random", recycler="none", merger="none")),
        Method("uniform", "Uniform", _external(method="uniform", merger="none")),
        Method("visionzip", "VisionZip", _external(method="visionzip", merger="none")),
        Method("fastvid", "FastVID", _external(method="fastvid", merger="none")),
        Method("sttm", "STTM", _external(method="sttm", merger="none")),
        Method(
            "holitom",
            "HoliTom",
            _external(method="holitom", merger="last-token", keep_ratio=0.5),
            PAPER_K,
        ),
        Method("ours-wo-m", "Ours (w/o M)", _external(merger="none")),
        Method("ours", "Ours", _external(merger="text-aware", keep_ratio=0.5), PAPER_K),
        Method("oracle", "Oracle", _external(merger="none"), selector=_oracle),
    )
}


def _pct(r: float) -> str:
    return f"{r * 100:g}%"


@dataclass
class Row:
    """One evaluated row of the table."""

    label: str
    retention: str
    config: CompressionConfig | None  # None: the uncompressed model
    tflops: float
    flops_ratio: float
    overall: float
    per_family: dict[str, float]
    tokens: dict[str, float]
    lab_layer: int | None = None
    paper_layer: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["config"] = None if self.config is None else self.config.to_dict()
        return out


def flops_of(
    config: CompressionConfig, paper_layer: int | None, spec: ModelSpec
) -> tuple[float, float]:
    """(TFLOPs, ratio to uncompressed) of ``spec``'s LLM with the paper's K (Eq. S3)."""
    paper = config.replace(layer=paper_layer) if paper_layer is not None else config
    # the paper's convention (layers 0..K see every token), which reproduces its FLOPs columns
    ours = count(paper, spec, merge_at="output")
    return ours.tera, ours.ratio(count(VANILLA, spec, merge_at="output"))


def plan(
    methods: Sequence[str], retentions: Sequence[float], llm_layers: int
) -> list[tuple[Method, float, CompressionConfig, int | None]]:
    """(method, r, lab config, lab K) for every row, in table order (retention blocks)."""
    rows = []
    for r in retentions:
        for key in methods:
            method = METHODS[key]
            lab_k = None
            if method.paper_layer is not None:
                lab_k = max(method.min_layer, map_paper_layer(method.paper_layer, llm_layers))
            config = method.build(r, lab_k if lab_k is not None else PAPER_K)
            rows.append((method, r, config, lab_k))
    return rows


def run(
    methods: Sequence[str],
    retentions: Sequence[float],
    *,
    limit: int | None,
    split: str,
    model: Any,
    progress: bool,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Evaluate the uncompressed model and every (method, retention) on the lab benchmark."""
    from ustc.lab.evaluate import evaluate, samples

    spec = ModelSpec.builtin(FLOPS_MODEL)
    layers = len(model.model.language_model.layers)
    data = samples(split, limit)  # rendered once, shared by every row
    t0 = time.perf_counter()
    where = f"lab {split}" + (f" (first {limit})" if limit else "")
    vanilla = evaluate(None, model=model, data=data, progress=progress and f"Vanilla · {where}")
    rows = [
        Row(
            "Vanilla",
            "100%",
            None,
            count(VANILLA, spec).tera,
            1.0,
            vanilla.overall,
            vanilla.per_family,
            vanilla.tokens,
            seconds=time.perf_counter() - t0,
        )
    ]
    log(f"Vanilla: {vanilla.summary()}")
    for method, r, config, lab_k in plan(methods, retentions, layers):
        t0 = time.perf_counter()
        bar = progress and f"{method.label} {method.retention_text(r)} · {where}"
        if method.selector is not None:
            picks = method.selector(r)
            result = evaluate(None, model=model, data=data, progress=bar, selector=picks)
        else:
            result = evaluate(config, model=model, data=data, progress=bar)
        tera, ratio = flops_of(config, method.paper_layer, spec)
        row = Row(
            method.label,
            method.retention_text(r),
            config,
            tera,
            ratio,
            result.overall,
            result.per_family,
            result.tokens,
            lab_k,
            method.paper_layer,
            time.perf_counter() - t0,
        )
        rows.append(row)
        log(f"{method.label} {row.retention}: {result.summary()}")
    return rows


def markdown(rows: Sequence[Row], families: Sequence[str]) -> str:
    """The Table 1 layout: FLOPs, ratio, retention, per-family accuracy, overall, %, tokens."""
    base = rows[0].overall if rows and rows[0].config is None else None
    head = [
        "Method",
        "FLOPs (T)",
        "FLOPs Ratio",
        "Retention Ratio",
        *families,
        "Overall",
        "%",
        "LLM tokens",
        "K (paper K)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for row in rows:
        tokens = f"{row.tokens.get('llm_visual', float('nan')):.0f}"
        after = row.tokens.get("after_merge")
        if after is not None and after != row.tokens.get("llm_visual"):
            tokens += f" -> {after:.0f}"
        layer = "-" if row.lab_layer is None else f"{row.lab_layer} ({row.paper_layer})"
        cells = [
            row.label,
            f"{row.tflops:.1f}",
            f"{100 * row.flops_ratio:.1f}%",
            row.retention,
            *(f"{row.per_family.get(f, float('nan')):.1f}" for f in families),
            f"{row.overall:.1f}",
            "-" if not base else f"{100 * row.overall / base:.1f}",
            tokens,
            layer,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load(model_path: str | None, random_init: bool) -> Any:
    """The lab model: shipped weights, a folder, or (``--random-init``) untrained weights."""
    from ustc.lab.model import build_model, load_model

    if random_init:
        return build_model()
    return load_model(model_path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ablations/compare.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, in row order: {', '.join(METHODS)}",
    )
    p.add_argument(
        "--retentions",
        default=",".join(f"{r:g}" for r in RETENTIONS),
        help="comma-separated retention ratios r (default 0.1,0.05,0.02,0.01)",
    )
    p.add_argument("--limit", type=int, default=None, help="first N questions of the split")
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--model", default=None, help="folder of lab weights (default: the shipped)")
    p.add_argument(
        "--random-init",
        "--random_init",
        dest="random_init",
        action="store_true",
        help="an untrained lab model (a smoke test of the pipeline; chance accuracy)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output", default=None, help="write the Markdown table here")
    p.add_argument("--json", default=None, help="write every row (config, tokens, times) here")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-row lines")
    return p


def parse_list(text: str, kind: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{kind} is empty")
    return items


def main(argv: Sequence[str] | None = None) -> list[Row]:
    p = parser()
    args = p.parse_args(argv)
    try:
        methods = parse_list(args.methods, "methods")
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
        retentions = [float(r) for r in parse_list(args.retentions, "retentions")]
        for r in retentions:
            CompressionConfig(retention=r)  # the same check and message as everywhere
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if args.random_init and args.model:
            raise ValueError("give either --model or --random-init, not both")
        model = load(args.model, args.random_init)
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ustc.lab.scenes import FAMILIES

    log = (lambda _: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    rows = run(
        methods,
        retentions,
        limit=args.limit,
        split=args.split,
        model=model,
        progress=not args.quiet,
        log=log,
    )
    table = markdown(rows, FAMILIES)
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(table + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([r.to_dict() for r in rows], indent=1))
    return rows


if __name__ == "__main__":
    main()
