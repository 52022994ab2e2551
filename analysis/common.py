"""Shared pieces of the analysis commands: figure files, the lab model, its videos and tokens.

Shapes: B videos, F frames, P tokens per frame, N = F*P, D features, H x W pixels.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import matplotlib

matplotlib.use("Agg")  # the commands run headless (CI, SSH); never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from ustc.config import CompressionConfig  # noqa: E402
from ustc.models.base import LastRun  # noqa: E402

#: figure formats every command writes
FORMATS = ("png", "pdf")
DPI = 150


def save_figure(fig: Figure, out: str | Path, stem: str) -> list[Path]:
    """Write ``fig`` as ``out/stem.png`` and ``out/stem.pdf``; close it; return the paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = folder / f"{stem}.{fmt}"
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def output_parser(description: str, prog: str) -> argparse.ArgumentParser:
    """An argument parser with ``--out DIR`` (default ``results/figures``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--out", default="results/figures", help="folder for the PNG and PDF (created)"
    )
    return parser


def add_lab_args(parser: argparse.ArgumentParser, limit: int | None = 24) -> None:
    """Flags choosing the lab model and the lab videos."""
    group = parser.add_argument_group("laboratory benchmark")
    group.add_argument(
        "--weights",
        default=None,
        help="folder of lab weights (config.json + model.safetensors); default: the shipped ones",
    )
    group.add_argument(
        "--untrained",
        action="store_true",
        help="use a randomly initialised lab model (smoke tests; the figure says so)",
    )
    group.add_argument("--split", default="test", help="lab split: test, val or train")
    group.add_argument("--start", type=int, default=0, help="index of the first lab video")
    if limit is not None:
        group.add_argument("--limit", type=int, default=limit, help="number of lab videos")


def load_lab_model(weights: str | Path | None = None, untrained: bool = False) -> Any:
    """The lab's LLaVA-OneVision: trained weights (shipped, or ``weights``), or a random one.

    Raises ``ValueError`` naming the missing files and how to make them.
    """
    from ustc.lab.model import build_model, load_model

    if untrained:
        if weights is not None:
            raise ValueError("pass either --weights or --untrained, not both")
        return build_model()
    try:
        return load_model(weights)
    except FileNotFoundError as exc:
        raise ValueError(f"{exc}; or pass --untrained for a random model") from None


def model_label(untrained: bool, weights: str | Path | None = None) -> str:
    """A short description for figure titles: which lab model made the figure."""
    if untrained:
        return "untrained lab model (random weights)"
    return "lab model, shipped weights" if weights is None else f"lab model, weights {weights}"


def lab_samples(split: str, start: int, count: int) -> list[Any]:
    """Lab videos ``start .. start + count - 1`` of ``split`` (deterministic)."""
    from ustc.lab import scenes

    if count < 1:
        raise ValueError(f"need at least one lab video, got --limit {count}")
    if start < 0:
        raise ValueError(f"--start must be >= 0, got {start}")
    return [scenes.make_sample(split, i) for i in range(start, start + count)]


def lab_inputs(model: Any, sample: Any) -> tuple[Tensor, Tensor]:
    """``input_ids`` (1, n) with the video placeholders and ``pixel_values_videos`` (1, F, 3, H, W)."""
    from ustc.lab.model import build_tokenizer, encode_prompts, pixel_values

    frames, p = lab_grid(model)
    ids = encode_prompts(build_tokenizer(), [sample.question], frames * p + 1)
    return torch.tensor(ids), pixel_values(sample.frames[None])


def lab_grid(model: Any) -> tuple[int, int]:
    """(F, P) of the lab model: frames per video and pooled tokens per frame."""
    vision = model.config.vision_config
    side = -(-vision.image_size // vision.patch_size)
    frames = int(getattr(model.config, "lab", {}).get("frames", 8))
    return frames, (-(-side // 2)) ** 2


@torch.no_grad()
def run_attached(model: Any, config: CompressionConfig, sample: Any) -> LastRun:
    """One prefill of ``sample`` with ``ustc.attach(model, config)``; the handle's ``last``.

    The handle is removed afterwards, so the model is unchanged.
    """
    import ustc

    ids, px = lab_inputs(model, sample)
    with ustc.attach(model, config) as handle:
        model(
            input_ids=ids,
            pixel_values_videos=px,
            attention_mask=torch.ones_like(ids),
            logits_to_keep=1,
        )
        if handle.last is None:
            raise RuntimeError("the attached model compressed nothing: no video in the prompt?")
        return handle.last


@dataclass(frozen=True)
class VideoTokens:
    """The visual tokens of B lab videos as the LLM would receive them uncompressed.

    features: (B, F, P, D) projected and pooled tokens (``get_video_features`` minus the
              image_newline); scores: (B, F, P) Eq. (1) attention scores captured by the
              adapter; pixels: (B, F, H, W, 3) uint8 frames.
    """

    features: Tensor
    scores: Tensor
    pixels: np.ndarray


#: a config whose scorer needs Eq. (1), so the adapter captures the vision scores
_SCORE_PROBE = CompressionConfig(retention=0.5, scorer="attn", recycler="none", merger="none")


@torch.no_grad()
def video_tokens(model: Any, samples: Sequence[Any]) -> VideoTokens:
    """Features and Eq. (1) scores of each sample's video, through the model's own code path.

    Scores come from the LLaVA-OneVision adapter (``handle.last.vision_scores``); features from
    ``model.model.get_video_features``, the same call the model makes in its forward.
    """
    frames, p = lab_grid(model)
    feats, scores = [], []
    for sample in samples:
        last = run_attached(model, _SCORE_PROBE, sample)
        assert last.vision_scores is not None  # the probe's scorer needs them
        scores.append(last.vision_scores.float())
        _, px = lab_inputs(model, sample)
        pooled = model.model.get_video_features(
            pixel_values_videos=px,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output
        feats.append(pooled[:, : frames * p].reshape(1, frames, p, -1).float())
    pixels = np.stack([s.frames for s in samples])
    return VideoTokens(torch.cat(feats), torch.cat(scores), pixels)


#: how the paper writes the baselines' names
BASELINE_LABELS = {
    "holitom": "HoliTom",
    "fastvid": "FastVID",
    "visionzip": "VisionZip",
    "fastv": "FastV",
    "dycoke": "DyCoke",
    "llava-scissor": "LLaVA-Scissor",
}

#: names of the external-compression variants the figures compare, besides Table 5's rows
METHOD_ALIASES = {"ours": "attn+sim+cluster"}


def method_config(name: str, retention: float) -> CompressionConfig:
    """The external compression called ``name`` at ``retention``, without in-LLM merging.

    name: ``ours`` (= ``attn+sim+cluster``), a Table 5 row of ``ablations/run.py --modules``
    (``attn``, ``sim``, ``cluster``, ``attn+sim``, ``attn+cluster``, ``sim+cluster``,
    ``attn+sim+cluster``), or a baseline registered in ``ustc.METHODS``.
    """
    from ablations.paper_tables import MODULE_ROWS
    from ustc.presets import TABLE5_ROWS
    from ustc.registry import METHODS

    row = METHOD_ALIASES.get(name, name)
    if row in MODULE_ROWS:
        return TABLE5_ROWS[MODULE_ROWS[row]].replace(retention=retention)
    if row in METHODS and row != "ustc":
        return CompressionConfig(retention=retention, method=row, merger="none")
    known = [*METHOD_ALIASES, *MODULE_ROWS, *(m for m in METHODS.names() if m != "ustc")]
    raise ValueError(f"unknown method {name!r}; known: {', '.join(known)}")


def method_label(name: str) -> str:
    """How a method name reads in a legend."""
    if name == "ours":
        return "Ours (Attn+Sim+Cluster)"
    if name == "attn":
        return "Attention only"
    return BASELINE_LABELS.get(name, name)


def parse_methods(text: str, retention: float) -> dict[str, CompressionConfig]:
    """``"ours,attn"`` -> ordered {name: config}; ValueError on an unknown or repeated name."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--methods needs at least one name")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods names a method twice: {text!r}")
    return {name: method_config(name, retention) for name in names}


def fail(message: str) -> NoReturn:
    """Exit a command with ``message`` on stderr and status 2 (a usage error, no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
