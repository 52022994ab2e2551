"""Multiple-choice accuracy of the lab model, per question family and overall, for any config.

A question is answered by the letter (A-D) whose token has the largest logit at the last prompt
position, the position where the model would write its answer.  Questions are evaluated in batches
of equal prompt length (so no padding is ever needed); compression is applied with
``ustc.attach(model, config)``, the same code path as for a real LLaVA-OneVision model, and the
number of tokens entering the LLM (and its layers from K on) is measured with hooks on the model's
decoder layers, not taken from the config.

    from ustc.lab import evaluate, default_config
    print(evaluate(None).overall)                    # uncompressed
    res = evaluate(default_config(retention=0.02))   # the method at 2 %
    res.per_family, res.tokens, res.timings
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ustc.config import CompressionConfig
from ustc.lab import scenes
from ustc.lab.model import (
    VIDEO_TOKEN_ID,
    LabShape,
    build_tokenizer,
    encode_prompts,
    letter_ids,
    load_model,
    pixel_values,
)
from ustc.lab.scenes import FAMILIES, Sample

#: (features (B, N, D), frames F, the batch's samples) -> kept indices (B, M) into N, ascending
Selector = Callable[[Tensor, int, Sequence[Sample]], Tensor]


@dataclass
class EvalResult:
    """Accuracy in % overall and per family; token counts are means per question.

    tokens: ``visual_in`` (F*P features the vision tower produced), ``llm_visual`` (visual tokens
            entering the LLM), ``after_merge`` (visual tokens in the layers from K on),
            ``sequence`` (whole prompt entering the LLM).
    timings: seconds: ``total``, ``per_question``, ``data`` (rendering the videos).
    answers: the letter index (0-3) chosen for each question, in the order of the data, and
             ``margins`` its logit lead over the runner-up letter: what a determinism check
             compares (a thread count or batch size that changed a choice shows up here).
    """

    overall: float
    per_family: dict[str, float]
    n: int
    tokens: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    answers: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)

    def summary(self) -> str:
        fams = "  ".join(f"{k} {v:5.1f}" for k, v in self.per_family.items())
        return (
            f"overall {self.overall:5.1f}  ({fams})  n={self.n}  "
            f"llm_visual={self.tokens.get('llm_visual', float('nan')):.1f}  "
            f"{self.timings.get('total', 0.0):.1f}s"
        )


def samples(split: str = "test", limit: int | None = None) -> list[Sample]:
    """The first ``limit`` samples of ``split`` (its default size when ``limit`` is None), with
    their scenes (what :func:`oracle_selector` reads)."""
    size = scenes.split_size(split)
    if limit is None:
        if size is None:
            raise ValueError("the train split is an unbounded stream: pass limit=")
        limit = size
    if limit < 1:
        raise ValueError(f"limit must be a positive number of questions, got {limit}")
    return [scenes.make_sample(split, i, keep_scene=True) for i in range(limit)]


def _budget(retention: float, frames: int, tokens: int) -> int:
    """F * clamp(round(r * P), 1, P): the number of visual tokens every method keeps."""
    return CompressionConfig(retention=retention, merger="none").budget(frames, tokens // frames)


def random_selector(retention: float, seed: int = 0) -> Selector:
    """Keep a random F*clamp(round(r*P), 1, P) of the N visual tokens (seeded; the "random 2 %" baseline).

    Not a registered strategy: it exists so the lab can show how far blind token dropping falls.
    """
    gen = torch.Generator().manual_seed(seed)

    def select(features: Tensor, frames: int, batch: Sequence[Sample] = ()) -> Tensor:
        b, n, _ = features.shape
        scores = torch.rand(b, n, generator=gen)
        m = _budget(retention, frames, n)
        return scores.topk(m, dim=1).indices.sort(dim=1).values.to(features.device)

    return select


def oracle_selector(retention: float, interior_seed: int | None = None) -> Selector:
    """Keep the tokens that show what the question is about, then fill the budget uniformly.

    The generator knows which tokens show every object (:func:`evidence_order`).  Keeping them
    first, within the same F*clamp(round(r*P), 1, P) budget as every method, shows whether the
    budget can hold the evidence at all: the ceiling a selection could reach at that retention.
    Not a registered strategy (no method can see the scene).

    interior_seed: None keeps each object's centre token (the token it covers most) per frame;
    a seed keeps a random interior token instead (:func:`evidence_order`'s ``interior``), drawn
    from ``numpy.random.default_rng([interior_seed, sample.index])``: the same evidence in
    another shape, which a model that learnt objects, not the oracle, reads as well.
    """

    def select(features: Tensor, frames: int, batch: Sequence[Sample]) -> Tensor:
        b, n, _ = features.shape
        if len(batch) != b or any(s.scene is None for s in batch):
            raise ValueError("the oracle needs the batch's samples with their scenes")
        m = _budget(retention, frames, n)
        rows = []
        for s in batch:
            pick = (
                None if interior_seed is None else np.random.default_rng([interior_seed, s.index])
            )
            rows.append(np.sort(evidence_order(s, n, interior=pick)[:m]))
        return torch.from_numpy(np.stack(rows)).to(features.device)

    return select


def _spread(frames: np.ndarray) -> list[int]:
    """The frames in an order whose every prefix is spread over the video: the first one, then
    always the frame farthest from those already taken (the earliest on a tie)."""
    chosen = [int(frames[0])]
    while len(chosen) < len(frames):
        gap = np.min(np.abs(frames[:, None] - np.array(chosen)[None]), axis=1)
        chosen.append(int(frames[int(np.argmax(gap))]))
    return chosen


#: a token is inside an object when the object covers at least this share of its pixels
INTERIOR_COVER = 0.5


def evidence_order(
    sample: Sample,
    tokens: int,
    min_cover: float = scenes.MIN_COVER,
    interior: np.random.Generator | None = None,
) -> np.ndarray:
    """Every visual token of ``sample`` (N = F * P of them) in the oracle's order of priority.

    1. One token per (object, frame), the one the object covers most, taken round-robin over the
       objects so that every prefix shows each of them: the object the answer names first (the
       one that stays still, was hit, appears briefly), then the hitter, then the rest in drawing
       order; each object's frames spread over the video, starting with its first appearance.
       With ``interior`` (a generator), a random token of those the object covers at least
       ``INTERIOR_COVER`` of (its interior) instead, drawn afresh per (object, frame); the most
       covered one where no token is that covered.
    2. The other tokens that show an object, most covered first.
    3. The rest, evenly spaced over the video (the uniform fill).
    """
    scene = sample.scene
    if scene is None:
        raise ValueError("evidence_order needs a sample made with keep_scene=True")
    cover = scenes.token_cover(scene)  # (n_objects, F, P)
    frames, per_frame = cover.shape[1:]
    if frames * per_frame != tokens:
        raise ValueError(f"the scene has {frames} x {per_frame} tokens, the model {tokens}")
    q = sample.question
    named = (
        [o.colour for o in scene.objects].index(q.options[q.answer])
        if q.family in ("stationary", "hit", "rare")
        else None
    )
    objects = [i for i in (named, scene.hitter) if i is not None]
    objects += [i for i in range(len(scene.objects)) if i not in objects]
    visits = [_spread(np.flatnonzero(cover[i].max(-1) >= min_cover)) for i in objects]
    taken: list[int] = []
    seen = np.zeros(tokens, dtype=bool)
    for round_ in range(frames):
        for i, frames_of in zip(objects, visits, strict=True):
            if round_ >= len(frames_of):
                continue
            t = frames_of[round_]
            candidates = np.argsort(-cover[i, t], kind="stable")
            if interior is not None:
                inside = candidates[cover[i, t, candidates] >= INTERIOR_COVER]
                if len(inside):
                    candidates = interior.permutation(inside)
            for p in candidates:
                if cover[i, t, p] < min_cover:
                    break
                if not seen[t * per_frame + p]:
                    taken.append(t * per_frame + int(p))
                    seen[taken[-1]] = True
                    break
    shown = cover[objects].reshape(len(objects), -1)
    for i in np.argsort(-shown.max(0), kind="stable"):
        if shown[:, i].max() < min_cover:
            break
        if not seen[i]:
            taken.append(int(i))
            seen[i] = True
    rest = np.flatnonzero(~seen)
    order = np.argsort(_van_der_corput(len(rest)), kind="stable")
    return np.concatenate([np.array(taken, dtype=np.int64), rest[order]])


def length_batches(prompts: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """Indices of ``prompts`` in batches of at most ``size`` prompts of one length (no padding),
    shortest prompts first, each batch in the prompts' order."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_len[len(ids)].append(i)
    return [
        group[j : j + size]
        for _, group in sorted(by_len.items())
        for j in range(0, len(group), size)
    ]


def _van_der_corput(n: int) -> np.ndarray:
    """The base-2 radical inverse of 0 .. n-1: sorting by it makes every prefix evenly spaced."""
    out = np.zeros(n)
    index = np.arange(n)
    scale = 0.5
    while index.any():
        out += (index & 1) * scale
        index >>= 1
        scale /= 2
    return out


class _TokenCounter:
    """Forward pre-hooks on decoder layers 0 and K that record the sequence length they see."""

    def __init__(self, model: Any, layer: int | None) -> None:
        layers = model.model.language_model.layers
        self.lengths: dict[str, int] = {}
        self._hooks = [layers[0].register_forward_pre_hook(self._hook("in"), with_kwargs=True)]
        if layer is not None and 0 < layer < len(layers):
            hook = self._hook("after_merge")
            self._hooks.append(layers[layer].register_forward_pre_hook(hook, with_kwargs=True))

    def _hook(self, key: str) -> Callable[..., None]:
        def record(module: Any, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.lengths[key] = hidden.shape[1]

        return record

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


@torch.no_grad()
def _forward_selected(
    model: Any, ids: Tensor, px: Tensor, select: Selector, frames: int, batch: Sequence[Sample]
) -> Tensor:
    """Logits at the last position with only the selected visual tokens entering the LLM.

    The kept tokens keep their original positions (gapped ``position_ids``), as the compressor
    does; the image_newline is kept.
    """
    inner = model.model
    cfg = model.config
    feats = inner.get_video_features(
        pixel_values_videos=px,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    ).pooler_output
    n = feats.shape[1] - 1
    keep = select(feats[:, :n], frames, batch)  # (B, M)
    b, device = ids.shape[0], feats.device
    first = int((ids[0] == VIDEO_TOKEN_ID).nonzero()[0])
    idx = torch.cat([keep, torch.full((b, 1), n, dtype=keep.dtype, device=device)], 1)
    before = torch.arange(first, device=device).expand(b, -1)
    after = torch.arange(first + n + 1, ids.shape[1], device=device).expand(b, -1)
    positions = torch.cat([before, idx + first, after], 1)
    video = torch.gather(feats, 1, idx[..., None].expand(-1, -1, feats.shape[-1]))
    embed = inner.get_input_embeddings()
    embeds = torch.cat([embed(ids[:, :first]), video, embed(ids[:, first + n + 1 :])], 1)
    out = model(
        inputs_embeds=embeds,
        position_ids=positions,
        attention_mask=torch.ones_like(positions),
        logits_to_keep=1,
    )
    return out.logits[:, -1]


def evaluate(
    config: CompressionConfig | None = None,
    split: str = "test",
    limit: int | None = None,
    progress: bool | str = True,
    model: Any = None,
    batch_size: int = 25,
    selector: Selector | None = None,
    data: Sequence[Sample] | None = None,
) -> EvalResult:
    """Accuracy of the lab model on ``split`` under ``config`` (None: uncompressed).

    config:   a CompressionConfig applied with ``ustc.attach``; None or an identity config runs
              the plain model.
    split:    ``test`` (600 questions, 100 per family), ``val`` (300) or ``train`` (needs limit).
    limit:    evaluate only the first ``limit`` questions.
    model:    a lab model (default: the shipped weights, :func:`ustc.lab.load_model`).
    selector: instead of ``config``, keep the visual tokens this function picks (e.g.
              :func:`random_selector`); mutually exclusive with a compressing config.
    data:     samples to use instead of ``split``/``limit`` (already rendered).
    progress: False for no progress bar; True for one labelled ``lab <split>``; a string labels
              it (the callers name the table, row and benchmark: ``table5 modules=attn · lab
              test``).
    """
    if selector is not None and config is not None and not config.is_identity:
        raise ValueError("pass either a compressing config or a selector, not both")
    start = time.perf_counter()
    model = load_model() if model is None else model
    tokenizer = build_tokenizer()
    frames = int(model.config.lab["frames"]) if hasattr(model.config, "lab") else LabShape().frames
    t0 = time.perf_counter()
    source = "lab" if data is not None else f"lab {split}"  # the bar's label without a caller's
    data = list(data) if data is not None else samples(split, limit)
    data_seconds = time.perf_counter() - t0
    device = next(model.parameters()).device
    letters = torch.tensor(letter_ids(tokenizer), device=device)
    p = _tokens_per_frame(model)
    video_tokens = frames * p + 1

    handle = None
    if config is not None and not config.is_identity:
        import ustc

        handle = ustc.attach(model, config)
    layer = config.layer if config is not None and config.merger != "none" else None
    counter = _TokenCounter(model, layer)
    correct: dict[str, list[bool]] = defaultdict(list)
    counts: dict[str, list[int]] = defaultdict(list)
    answers = [-1] * len(data)
    margins = [0.0] * len(data)
    try:
        prompts = encode_prompts(tokenizer, [s.question for s in data], video_tokens)
        batches = length_batches(prompts, batch_size)
        label = progress if isinstance(progress, str) else source
        bar = _progress(len(data), bool(progress), label)
        for batch in batches:
            ids = torch.tensor([prompts[i] for i in batch], device=device)
            px = pixel_values(np.stack([data[i].frames for i in batch])).to(device)
            if selector is not None:
                logits = _forward_selected(
                    model, ids, px, selector, frames, [data[i] for i in batch]
                )
            else:
                with torch.no_grad():
                    out = model(
                        input_ids=ids,
                        pixel_values_videos=px,
                        attention_mask=torch.ones_like(ids),
                        logits_to_keep=1,
                    )
                logits = out.logits[:, -1]
            letter_logits = logits[:, letters].float()
            choice = letter_logits.argmax(-1)
            top2 = letter_logits.topk(2, dim=-1).values
            text_tokens = ids.shape[1] - video_tokens
            seq_in = counter.lengths["in"]
            counts["sequence"] += [seq_in] * len(batch)
            counts["llm_visual"] += [seq_in - text_tokens - 1] * len(batch)
            if "after_merge" in counter.lengths:
                counts["after_merge"] += [counter.lengths["after_merge"] - text_tokens - 1] * len(
                    batch
                )
            for k, i in enumerate(batch):
                correct[data[i].family].append(bool(choice[k] == data[i].question.answer))
                answers[i] = int(choice[k])
                margins[i] = float(top2[k, 0] - top2[k, 1])
            bar.update(len(batch))
        bar.close()
    finally:
        counter.remove()
        if handle is not None:
            handle.remove()

    total = time.perf_counter() - start
    n = sum(len(v) for v in correct.values())
    per_family = {f: 100.0 * float(np.mean(correct[f])) for f in FAMILIES if correct[f]}
    overall = 100.0 * sum(sum(v) for v in correct.values()) / max(n, 1)
    tokens = {"visual_in": float(frames * p)}
    tokens.update({k: float(np.mean(v)) for k, v in counts.items()})
    if "after_merge" not in tokens:
        tokens["after_merge"] = tokens["llm_visual"]
    return EvalResult(
        overall=overall,
        per_family=per_family,
        n=n,
        tokens=tokens,
        timings={"total": total, "per_question": total / max(n, 1), "data": data_seconds},
        config=config.to_dict() if config is not None else None,
        answers=answers,
        margins=margins,
    )


def _tokens_per_frame(model: Any) -> int:
    v = model.config.vision_config
    side = -(-v.image_size // v.patch_size)
    return (-(-side // 2)) ** 2


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, label: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="q", leave=False)
