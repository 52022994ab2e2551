"""The paper's FLOPs columns (Tables 1-3): its rows, their reproduction, the printed tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ustc.config import CompressionConfig
from ustc.flops.formula import VANILLA, FlopsCount, eq_s3, exact, fastv
from ustc.flops.schedule import MergeAt, TokenSchedule
from ustc.flops.specs import MODEL_SPECS, ModelSpec


@dataclass(frozen=True)
class PaperRow:
    """One printed FLOPs cell of Tables 1-3 and the config whose schedule should give it.

    tera/ratio are the printed strings (their decimals set the comparison precision); ratio is
    "" where the table has no ratio column.
    """

    table: str
    model: str
    method: str
    label: str
    config: CompressionConfig
    tera: str
    ratio: str = ""
    frames: int | None = None


def _ours(retention: float, merge: bool) -> CompressionConfig:
    return CompressionConfig(retention=retention, merger="text-aware" if merge else "none")


def paper_rows() -> list[PaperRow]:
    """Every row of Tables 1-3 whose token schedule the paper defines."""
    rows: list[PaperRow] = []
    t1 = "Table 1"
    ov7 = "llava-onevision-7b"
    rows.append(PaperRow(t1, ov7, "LLaVA-OV-7B", "100%", VANILLA, "41.4", "100%"))
    # Table 1 labels three FastV rows 100%/15%, /12%, /11%; Table S2 (same values) says /5%,
    # /2%, /1%, and only those reproduce the printed FLOPs.
    fastv_t1 = [
        (0.10, "7.9", "19.1%"),
        (0.05, "6.4", "15.5%"),
        (0.02, "5.5", "13.3%"),
        (0.01, "5.2", "12.6%"),
    ]
    for keep, tera, ratio in fastv_t1:
        rows.append(PaperRow(t1, ov7, "FastV", f"100%/{keep:.0%}", fastv(keep), tera, ratio))
    ours_t1 = [
        (0.10, ("4.0", "9.6%"), ("3.4", "8.2%")),
        (0.05, ("2.2", "5.4%"), ("2.0", "4.7%")),
        (0.02, ("1.2", "2.9%"), ("1.1", "2.6%")),
        (0.01, ("0.9", "2.1%"), ("0.8", "2.0%")),
    ]
    for r, without, with_m in ours_t1:
        rows.append(PaperRow(t1, ov7, "Ours (w/o M)", _pct(r), _ours(r, False), *without))
        rows.append(PaperRow(t1, ov7, "Ours", f"{_pct(r)}/{_pct(r / 2)}", _ours(r, True), *with_m))
    t2 = "Table 2"
    table2 = {
        "llava-video-7b": (
            ("80.9", "100%"),
            {
                0.02: (("10.2", "12.6%"), ("1.5", "1.9%"), ("1.4", "1.7%")),
                0.01: (("9.7", "11.9%"), ("1.2", "1.5%"), ("1.1", "1.4%")),
            },
        ),
        "llava-onevision-0.5b": (
            ("3.54", "100%"),
            {
                0.02: (("0.50", "14.1%"), ("0.07", "1.9%"), ("0.06", "1.8%")),
                0.01: (("0.48", "13.7%"), ("0.05", "1.3%"), ("0.05", "1.3%")),
            },
        ),
    }
    for model, (vanilla, by_r) in table2.items():
        rows.append(PaperRow(t2, model, "Vanilla", "100%", VANILLA, *vanilla))
        for r, (fast, without, with_m) in by_r.items():
            rows.append(PaperRow(t2, model, "FastV", f"100%/{_pct(r)}", fastv(r), *fast))
            rows.append(PaperRow(t2, model, "Ours (w/o M)", _pct(r), _ours(r, False), *without))
            rows.append(
                PaperRow(t2, model, "Ours", f"{_pct(r)}/{_pct(r / 2)}", _ours(r, True), *with_m)
            )
    t3 = "Table 3"
    rows.append(PaperRow(t3, ov7, "Vanilla", "100%", VANILLA, "19.0", frames=16))
    for frames, tera in ((64, "1.7"), (96, "2.2"), (128, "2.8")):
        rows.append(PaperRow(t3, ov7, "Ours", "2%/1%", _ours(0.02, True), tera, frames=frames))
    return rows


def _pct(r: float) -> str:
    return f"{r * 100:g}%"


def _decimals(printed: str) -> int:
    number = printed.rstrip("%")
    return len(number.split(".")[1]) if "." in number else 0


def _fmt(value: float, like: str) -> str:
    """``value`` printed with the decimals of the paper's cell ``like`` (a % when it has one)."""
    if like.endswith("%"):
        return f"{value * 100:.{_decimals(like)}f}%"
    return f"{value:.{_decimals(like)}f}"


@dataclass(frozen=True)
class RowResult:
    """Our figures for one :class:`PaperRow`."""

    row: PaperRow
    spec: ModelSpec
    schedule: TokenSchedule
    paper_count: FlopsCount
    exact_count: FlopsCount
    ratio: float

    @property
    def tera_text(self) -> str:
        return _fmt(self.paper_count.tera, self.row.tera)

    @property
    def ratio_text(self) -> str:
        return _fmt(self.ratio, self.row.ratio) if self.row.ratio else ""

    @property
    def matches(self) -> bool:
        return self.tera_text == self.row.tera and self.ratio_text == self.row.ratio


def reproduce(
    rows: Sequence[PaperRow] | None = None, merge_at: MergeAt = "output"
) -> list[RowResult]:
    """Eq. S3 (visual tokens only, R = 100) for each paper row; ratios against vanilla."""
    results = []
    for row in paper_rows() if rows is None else rows:
        spec = ModelSpec.builtin(row.model).with_video(frames=row.frames)
        schedule = TokenSchedule.from_config(row.config, spec, merge_at=merge_at)
        vanilla = eq_s3(spec, TokenSchedule.from_config(VANILLA, spec))
        paper_count = eq_s3(spec, schedule)
        results.append(
            RowResult(
                row, spec, schedule, paper_count, exact(spec, schedule), paper_count.ratio(vanilla)
            )
        )
    return results


def _schedule_text(schedule: TokenSchedule) -> str:
    visual = schedule.visual
    first = visual[0]
    change = next((i for i, n in enumerate(visual) if n != first), None)
    if change is None:
        return f"{first}"
    return f"{first} -> {visual[change]} from layer {change}"


def _explain(result: RowResult, merge_at: MergeAt) -> str:
    """Whether the other merge-point convention reproduces a row that does not match.

    (The entering token count is config.budget's: its per-frame rounding is the one that
    reproduces every printed row, so there is no other rounding left to try.)
    """
    row, spec = result.row, result.spec
    other: MergeAt = "input" if merge_at == "output" else "output"
    vanilla = eq_s3(spec, TokenSchedule.from_config(VANILLA, spec))
    schedule = TokenSchedule._reduced(row.config, spec, result.schedule.visual[0], 0, other)
    if schedule != result.schedule:
        alt = eq_s3(spec, schedule)
        tera = _fmt(alt.tera, row.tera)
        ratio = _fmt(alt.ratio(vanilla), row.ratio) if row.ratio else ""
        if (tera, ratio) == (row.tera, row.ratio):
            return (
                f"needs the reduction at the {other} of layer K (gives {tera} T {ratio})".replace(
                    " )", ")"
                )
            )
    return "no convention found (see docs/flops.md)"


#: LLaVA-Video's visual tokens per frame in the adapter: the paper's P = 169 is 13 x 13, the
#: original LLaVA-Video code's 2 x 2 pooling with stride 2 of the 27 x 27 SigLIP patches
#: (384 px / 14; floor(27 / 2) = 13, the 27th row and column dropped); transformers' ``LlavaOnevisionForConditionalGeneration``, the
#: class ustc.attach runs LLaVA-Video weights in, pools the same patches bilinearly to
#: ceil(27 / 2) = 14 x 14 = 196 (``apply_pooling``; its processor writes as many placeholders).
LLAVA_VIDEO_ADAPTER_P = 196


def llava_video_layout_note(merge_at: MergeAt = "output") -> list[str]:
    """Lines saying that Table 2's LLaVA-Video rows count P = 169 while the adapter runs
    :data:`LLAVA_VIDEO_ADAPTER_P`, with the Eq. S3 counts of both layouts (vanilla, and 2 % / 1 %
    with text-aware merging) and the command that gives the adapter's."""
    paper = MODEL_SPECS["llava-video-7b"]
    ran = paper.with_video(tokens_per_frame=LLAVA_VIDEO_ADAPTER_P)
    p_paper, p_ran = paper.tokens_per_frame, ran.tokens_per_frame
    parts = []
    for label, config in (
        ("vanilla", VANILLA),
        ("2% w/o M", CompressionConfig(retention=0.02, merger="none")),
        ("2%/1%", CompressionConfig(retention=0.02)),
    ):
        a, b = (
            eq_s3(spec, TokenSchedule.from_config(config, spec, merge_at=merge_at))
            for spec in (paper, ran)
        )
        n_a = TokenSchedule.from_config(config, paper, merge_at=merge_at).visual[0]
        n_b = TokenSchedule.from_config(config, ran, merge_at=merge_at).visual[0]
        parts.append(
            f"{label} {n_a} -> {n_b} tokens, {a.tera:.1f} T -> {b.tera:.1f} T "
            f"({b.total / a.total - 1:+.0%})"
        )
    return [
        f"LLaVA-Video-7B: Table 2 counts P = {p_paper} (13 x 13: the original LLaVA-Video code "
        f"pools 2 x 2 with stride 2, floor(27 / 2) = 13); ustc's adapter runs transformers' LlavaOnevision class, which pools "
        f"the same 27 x 27 patches bilinearly to 14 x 14 = {p_ran}:",
        "  " + "; ".join(parts) + ".",
        f"  What the adapter runs: ustc-flops --model llava-video-7b --tokens-per-frame {p_ran} "
        "--retention 0.02 --merger text-aware",
    ]


def format_tables(merge_at: MergeAt = "output") -> str:
    """The FLOPs columns of Tables 1-3, ours next to the paper's, as plain text."""
    results = reproduce(merge_at=merge_at)
    full_until = "K" if merge_at == "output" else "K-1"
    lines = [
        "FLOPs of the LLM (multiply-adds, 10^12), Eq. S3 over the visual tokens only, R = 100 "
        "generated tokens;",
        f"in-LLM reduction applied at the {merge_at} of layer K (layers 0..{full_until} see all "
        "tokens).  'exact' = GQA + SwiGLU count of the real Qwen2 layers.",
    ]
    header = (
        f"{'method':<14}{'retention':<12}{'F':>4}{'tokens per layer':>30}"
        f"{'T':>8}{'paper':>7}{'ratio':>8}{'paper':>8}{'exact T':>9}  ok"
    )
    current = None
    notes = []
    for result in results:
        row = result.row
        key = (row.table, row.model)
        if key != current:
            current = key
            lines += ["", f"{row.table}  {row.model}", header, "-" * len(header)]
        ok = "yes" if result.matches else "NO"
        lines.append(
            f"{row.method:<14}{row.label:<12}{result.spec.frames:>4}"
            f"{_schedule_text(result.schedule):>30}{result.tera_text:>8}{row.tera:>7}"
            f"{result.ratio_text:>8}{row.ratio:>8}{result.exact_count.tera:>9.2f}  {ok}"
        )
        if not result.matches:
            notes.append(
                f"{row.table} {row.model} {row.method} {row.label}: {_explain(result, merge_at)}"
            )
    matched = sum(r.matches for r in results)
    lines += [
        "",
        "FastV keeps the given share of all tokens after layer K = 2.  Table 1 labels its rows "
        "100%/10%, /15%, /12%, /11%; Table S2 prints the same FLOPs as /10%, /5%, /2%, /1%, "
        "the shares that reproduce them.",
        "VisionZip, FastVID and LLaVA-Scissor print the FLOPs of 'Ours (w/o M)', HoliTom those "
        "of 'Ours', at the same retention.",
        *llava_video_layout_note(merge_at),
        "",
        f"{matched}/{len(results)} printed FLOPs rows reproduced (T and ratio).",
    ]
    if notes:
        lines += ["Not reproduced, and what would reproduce them:"]
        lines += [f"  - {note}" for note in notes]
    return "\n".join(lines)
