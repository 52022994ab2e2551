"""Train the lab's micro Video-LLM from scratch on generated videos (deterministic on the CPU).

    python -m ustc.lab.train --out ustc/lab/weights            # the shipped weights
    python -m ustc.lab.train --out /tmp/lab --steps 200        # a quick look
    python -m ustc.lab.train --out /tmp/lab --device cuda      # on a GPU (not bit-identical)
    python -m ustc.lab.train --out DIR --stop 1000             # the first 1000 steps, then
    python -m ustc.lab.train --out DIR --resume                # the rest of the schedule

Each step renders ``--batch`` new videos of the training stream (sample indices
``step * batch ...``, never repeated) and asks ``--questions`` questions about each: the video's own
family and others its scene defines.  The prompt prefix up to the end of the video is run once per
video and its KV cache is shared by that video's questions (mathematically the same as running
each full prompt, ``--questions`` times cheaper on the visual tokens).  The loss is the language
model's cross-entropy on the answer letter plus an auxiliary loss, through a linear probe that is
thrown away after training, on the visual tokens entering the LLM: which colours and shapes each
8 x 8 px token shows (the per-token labels the renderer knows).  The probe only speeds up
learning to see; the shipped model is a plain ``LlavaOnevisionForConditionalGeneration``.

That is phase 1 (``--steps``).  A model trained on whole videos only cannot read the few tokens a
compressor leaves it, so two more phases show it token subsets at their original positions, with
a fresh optimiser and no probe: phase 2 (``--subset-steps``) mixes whole videos with subsets of
every budget from 1 % to 100 %, phase 3 (``--sparse-steps``) concentrates on budgets of 1-10 %
with object-balanced subsets (``_Trainer.subset``).  The subsets depend on the step and the
scene, never on the question or on any method's choice.

Writes ``model.safetensors`` and ``config.json`` (``save_pretrained``) and ``lab.json`` (settings,
the loss log, the validation curve, final validation and test accuracy, time and machine) to
``--out``.  Every ``--eval-every`` steps it also writes ``checkpoint.pt`` (model, probe, optimiser,
schedule, log), from which ``--resume`` continues bit for bit; the checkpoint is deleted when the
schedule is complete.  SIGINT or SIGTERM (Ctrl-C, a session's end) lets the step under way finish,
writes the checkpoint and stops, so a stopped run loses nothing (a second signal, or a kill that
cannot be caught, loses at most the steps since the last checkpoint).  ``--resume`` refuses,
in one line and before writing anything, a checkpoint that is missing, unreadable, or written for
another schedule (``SCHEDULE``) or model shape.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ustc.lab import scenes
from ustc.lab.evaluate import _budget, evaluate, oracle_selector, samples
from ustc.lab.model import (
    VIDEO_TOKEN_ID,
    LabShape,
    build_model,
    build_tokenizer,
    encode_prompts,
    pixel_values,
)
from ustc.models.compat import cache_keyword, output_cache


def _round_robin(
    rng: np.random.Generator, cover: np.ndarray, frames: int, min_cover: float = scenes.MIN_COVER
) -> np.ndarray:
    """One token per (object, frame) in which the object shows, the one it covers most (its
    centre: the same token in every frame while the object stands still); objects in random
    order, each object's frames in random order, taken round-robin.  cover: (n_objects, N)."""
    per_frame = cover.shape[1] // frames
    by_frame = cover.reshape(len(cover), frames, per_frame)
    visits = [rng.permutation(np.flatnonzero(o.max(-1) >= min_cover)) for o in by_frame]
    taken: list[int] = []
    for round_ in range(frames):
        for i in rng.permutation(len(cover)):
            if round_ < len(visits[i]):
                t = visits[i][round_]
                token = t * per_frame + int(np.argmax(by_frame[i, t]))
                if token not in taken:
                    taken.append(token)
    return np.array(taken, dtype=np.int64)


def _balanced(
    rng: np.random.Generator, cover: np.ndarray, frames: int, order: np.ndarray, dense: bool
) -> np.ndarray:
    """Phase 3's object-balanced reordering of ``order`` (every token once): ``_round_robin``'s
    tokens, then the others in random order, or (``dense``) the other tokens that show an object
    first, most covered first.  cover: (n_objects, N)."""
    first = _round_robin(rng, cover, frames)
    rest = order[~np.isin(order, first)]
    rest = rest[np.argsort(rng.uniform(size=len(rest)), kind="stable")]
    if dense:
        most = cover.max(0)[rest]
        rest = rest[np.argsort(np.where(most >= scenes.MIN_COVER, -most, 1.0), kind="stable")]
    return np.concatenate([first, rest])


def _batch(
    step: int, batch: int, questions: int, shape: LabShape, open_ratio: float = 0.0
) -> dict[str, Any]:
    """Videos, aux labels and questions of one training step (a function of ``step`` only)."""
    rng = np.random.default_rng([scenes.LAB_SEED, 7, step])
    data = [
        scenes.make_sample("train", step * batch + i, shape.frames, shape.size, keep_scene=True)
        for i in range(batch)
    ]
    asked = []
    for s in data:
        pool = s.extra or [s.question]
        picks = rng.choice(len(pool), size=questions - 1, replace=len(pool) < questions - 1)
        asked.append([s.question, *(pool[i] for i in picks)])
    open_ended = (rng.random(batch * questions) < open_ratio).tolist()
    evidence, objects = [], []
    for s, qs in zip(data, asked, strict=True):
        cover = scenes.token_cover(s.scene)  # type: ignore[arg-type]
        cover = cover.reshape(len(cover), -1)
        shown = cover >= scenes.MIN_COVER
        evidence += [
            torch.from_numpy(scenes.evidence_tokens(s.scene, q, shown))  # type: ignore[arg-type]
            for q in qs
        ]
        objects.append(cover)
    labels = [scenes.token_labels(s.scene) for s in data]  # type: ignore[arg-type]
    colours = torch.from_numpy(np.stack([c for c, _ in labels]))
    shapes = torch.from_numpy(np.stack([s for _, s in labels]))
    return {
        "frames": np.stack([s.frames for s in data]),
        "questions": asked,
        "aux": torch.cat([colours, shapes], -1).flatten(1, 2),  # (B, N, 12)
        "open": open_ended,
        "evidence": torch.stack(evidence),  # (B * questions, N) bool
        "objects": objects,  # B x (n_objects, N): how much of each token every object covers
    }


def _loss(
    model: Any,
    probe: torch.nn.Linear,
    tokenizer: Any,
    batch: dict[str, Any],
    shape: LabShape,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Answer cross-entropy (shared-prefix KV cache), the auxiliary token-label loss of the probe
    and the attention guidance; the training accuracy.

    keep: (B, M) ascending indices of the visual tokens the LLM sees (the rest dropped, the kept
    ones at their original positions, as a token compressor leaves them); None: all of them.
    """
    inner = model.model
    lm = inner.language_model
    cfg = model.config
    device = next(model.parameters()).device
    feats = inner.get_video_features(
        pixel_values_videos=pixel_values(batch["frames"]).to(device),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    ).pooler_output  # (B, N + 1, D)
    n = feats.shape[1] - 1
    # the probe reads RMS-normalised features: a probe on raw features pays the projector to
    # inflate their norm far above the text embeddings', which starves the LLM of its say
    visual = feats[:, :n]
    visual = visual * torch.rsqrt(visual.pow(2).mean(-1, keepdim=True) + 1e-6)
    aux = F.binary_cross_entropy_with_logits(probe(visual), batch["aux"].to(device))

    flat = [q for qs in batch["questions"] for q in qs]
    with_options = [not o for o in batch["open"]]
    ids = encode_prompts(tokenizer, flat, shape.video_tokens, with_options)
    cut = ids[0].index(VIDEO_TOKEN_ID) + shape.video_tokens
    b, q = len(batch["questions"]), len(batch["questions"][0])
    prefix = torch.tensor(ids[0][: cut - shape.video_tokens], device=device).expand(b, -1)
    start = prefix.shape[1]
    evidence = batch["evidence"].to(device)
    placed: dict[str, torch.Tensor] = {}
    if keep is not None:
        keep = keep.to(device)
        index = keep[..., None].expand(-1, -1, feats.shape[-1])
        feats = torch.cat([feats[:, :n].gather(1, index), feats[:, n:]], 1)
        newline = torch.full((b, 1), n, dtype=keep.dtype, device=device)
        video = torch.cat([keep, newline], 1) + start
        before = torch.arange(start, device=device).expand(b, -1)
        placed["position_ids"] = torch.cat([before, video], 1)
        evidence = evidence.gather(1, keep.repeat_interleave(q, 0))
    embeds = torch.cat([inner.get_input_embeddings()(prefix), feats], 1)
    cache = output_cache(lm(inputs_embeds=embeds, use_cache=True, **placed))
    cache.batch_repeat_interleave(q)
    seen_tokens = feats.shape[1] - 1

    lengths = torch.tensor([len(x) - cut for x in ids], device=device)
    suffix = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)  # right padding: causal
    for i, x in enumerate(ids):
        suffix[i, : len(x) - cut] = torch.tensor(x[cut:])
    suffix = suffix.to(device)
    layer = lm.layers[-1].self_attn
    keys = cache.layers[len(lm.layers) - 1].keys[:, :, start : start + seen_tokens]
    if keep is not None:  # the text continues after the video's last original position
        after = start + n + 1 + torch.arange(suffix.shape[1], device=device)
        placed = {"position_ids": after.expand(len(ids), -1)}
    seen: dict[str, Any] = {}

    def grab(module: Any, args: tuple, kwargs: dict) -> None:
        seen["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["rope"] = kwargs["position_embeddings"]

    hook = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        hidden = lm(
            input_ids=suffix, use_cache=False, **{cache_keyword(lm): cache}, **placed
        ).last_hidden_state
    finally:
        hook.remove()
    pointer = _pointer_loss(layer, seen, keys, lengths - 1, evidence)
    pointer = pointer + _option_loss(
        layer, seen, suffix, lengths - 1, flat, with_options, tokenizer
    )
    last = hidden[torch.arange(len(ids), device=device), lengths - 1]
    logits = model.lm_head(last)
    answers = [
        x.letter if o else x.options[x.answer] for x, o in zip(flat, with_options, strict=True)
    ]
    target = torch.tensor(tokenizer.convert_tokens_to_ids(answers), device=device)
    answer = F.cross_entropy(logits, target)
    acc = float((logits.argmax(-1) == target).float().mean())
    return answer, aux, pointer, acc


def _option_loss(
    attn: Any,
    seen: dict[str, Any],
    suffix: torch.Tensor,
    last: torch.Tensor,
    flat: list[scenes.Question],
    with_options: list[bool],
    tokenizer: Any,
) -> torch.Tensor:
    """Cross-entropy of head 1 of the last layer, from the answer position over the prompt after
    the video, against the correct option's word: teaches the model to read the option list.
    """
    rows = [i for i, o in enumerate(with_options) if o]
    if not rows:
        return suffix.new_zeros((), dtype=torch.float32)
    newline, dot = tokenizer.convert_tokens_to_ids(["\n", "."])
    target = []
    for i in rows:
        letter = tokenizer.convert_tokens_to_ids(flat[i].letter)
        ids = suffix[i].tolist()
        at = next(j for j in range(len(ids) - 2) if ids[j : j + 3] == [newline, letter, dot])
        target.append(at + 3)
    device = suffix.device
    idx = torch.tensor(rows, device=device)
    hidden, (cos, sin) = seen["hidden"][idx], seen["rope"]
    cos, sin = (x.expand(len(suffix), -1, -1)[idx] for x in (cos, sin))
    d = attn.head_dim
    half = d // 2

    def rope(x: torch.Tensor) -> torch.Tensor:
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    k = rope(attn.k_proj(hidden)[..., :d])  # kv head 0, (R, Ls, d)
    q = rope(attn.q_proj(hidden)[..., d : 2 * d])  # head 1 (shares kv head 0)
    q_last = q[torch.arange(len(rows), device=device), last[idx]]
    scores = torch.einsum("rd,rsd->rs", q_last, k) / math.sqrt(d)
    causal = torch.arange(k.shape[1], device=device)[None] > last[idx, None]
    return F.cross_entropy(scores.masked_fill(causal, -1e4), torch.tensor(target, device=device))


def _pointer_loss(
    attn: Any, seen: dict[str, Any], keys: torch.Tensor, last: torch.Tensor, evidence: torch.Tensor
) -> torch.Tensor:
    """-log of the attention mass that head 0 of the last layer puts, from the answer position,
    on the visual tokens showing the evidence (softmax over the N visual keys only).

    keys: (BQ, H_kv, N, d) post-RoPE keys of the visual tokens; last: (BQ,) answer positions in
    the suffix; evidence: (BQ, N) bool.  This teaches the model where to look; it is a training
    signal only and leaves no trace in the model.
    """
    rows = torch.arange(len(last), device=last.device)
    h = seen["hidden"][rows, last]  # (BQ, D)
    d = keys.shape[-1]
    q = attn.q_proj(h)[:, :d]  # head 0
    cos, sin = (x.expand(len(last), -1, -1)[rows, last] for x in seen["rope"])
    half = d // 2
    rotated = torch.cat([-q[:, half:], q[:, :half]], -1)
    q = q * cos + rotated * sin
    scores = torch.einsum("bd,bnd->bn", q, keys[:, 0]) / math.sqrt(d)
    logp = torch.log_softmax(scores, -1)
    mass = torch.logsumexp(logp.masked_fill(~evidence, -1e4), -1)
    has = evidence.any(-1)
    return -(mass[has]).mean() if has.any() else scores.sum() * 0


#: settings a resumed run must share with the checkpoint it continues (the rest may differ)
SCHEDULE = (
    "steps",
    "batch",
    "questions",
    "lr",
    "warmup",
    "aux_weight",
    "open_ratio",
    "seed",
    "subset_steps",
    "subset_lr",
    "subset_share",
    "sparse_steps",
    "sparse_lr",
)
CHECKPOINT = "checkpoint.pt"


def _save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    """Written whole or not at all: a run killed while saving keeps the previous checkpoint."""
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out / CHECKPOINT)


class BadInput(ValueError):
    """A bad argument or ``--resume`` checkpoint, found before any training step: the command
    prints it in one line (exit status 2) and nothing in ``--out`` has been written."""


class MissingCheckpoint(BadInput, FileNotFoundError):
    """``--resume`` without a checkpoint to continue."""


def _load_checkpoint(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint ``--resume`` continues, refused (one-line error, nothing written) when it is
    missing, unreadable, or written for another schedule or model shape."""
    path = out / CHECKPOINT
    if not path.is_file():
        done = ""
        try:
            steps = json.loads((out / "lab.json").read_text())["steps_run"]
            done = f"; its lab.json records a finished run of {steps} steps"
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no record of a run there: the message above says it all
        raise MissingCheckpoint(
            f"--resume: no {CHECKPOINT} in {out} (a run writes one at every eval){done}"
        )
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
        settings, step = state["settings"], int(state["step"])
    except Exception as err:  # noqa: BLE001  (any unreadable file gets the same one-line error)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInput(f"--resume: {path} cannot be read as a checkpoint ({first})") from err
    differ = [
        f"--{k.replace('_', '-')} {settings.get(k)} (checkpoint) vs {getattr(args, k)}"
        for k in SCHEDULE
        if settings.get(k) != getattr(args, k)
    ]
    recorded = state.get("shape")
    if recorded is not None and recorded != LabShape().__dict__:
        differ.append(f"model shape {recorded} (checkpoint) vs {LabShape().__dict__}")
    if differ:
        raise BadInput(
            "--resume continues the checkpoint's schedule; differs: " + "; ".join(differ)
        )
    total = args.steps + args.subset_steps + args.sparse_steps
    if not 0 < step <= total:
        raise BadInput(f"--resume: the checkpoint is at step {step}, outside 1..{total}")
    return state


def _check_parameters(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose parameters are not this model's (names and shapes)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(saved))
    extra = sorted(set(saved) - set(own))
    shapes = [
        f"{k} {tuple(saved[k].shape)} (checkpoint) vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in saved and saved[k].shape != v.shape
    ]
    if missing or extra or shapes:
        found = (
            shapes[:2] + [f"missing {k}" for k in missing[:2]] + [f"extra {k}" for k in extra[:2]]
        )
        raise BadInput(
            "--resume: the checkpoint's model is not this lab model's: " + "; ".join(found)
        )


class _StopRequest:
    """SIGINT and SIGTERM while training: the step under way finishes, a checkpoint is written and
    the run stops, so that nothing is lost; a second signal stops at once (the run then loses
    the steps since its last checkpoint).  The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            self._restore()
            raise KeyboardInterrupt
        self.signal = signum
        print(
            f"{signal.Signals(signum).name}: finishing this step, then writing {CHECKPOINT} "
            "(send it again to stop at once)",
            flush=True,
        )

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc: object) -> None:
        self._restore()


@dataclass
class _Trainer:
    """The model, the throw-away probe and the optimiser of one training run."""

    args: argparse.Namespace
    shape: LabShape
    tokenizer: Any
    model: Any
    probe: torch.nn.Linear
    opt: torch.optim.Optimizer
    sched: Any

    @classmethod
    def build(cls, args: argparse.Namespace) -> _Trainer:
        torch.set_num_threads(args.threads)
        # denormal weights and gradients late in training make CPU kernels many times slower
        torch.set_flush_denormal(True)
        torch.manual_seed(args.seed)
        shape = LabShape()
        model = build_model(shape, seed=args.seed).train().to(args.device)
        probe = torch.nn.Linear(shape.hidden, len(scenes.COLOUR_NAMES) + len(scenes.SHAPES))
        probe = probe.to(args.device)  # initialised on the CPU, like the model: same start anywhere
        params = list(model.parameters()) + list(probe.parameters())
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)

        def lr_at(step: int) -> float:
            if step < args.warmup:
                return (step + 1) / args.warmup
            frac = (step - args.warmup) / max(1, args.steps - args.warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        return cls(args, shape, build_tokenizer(), model, probe, opt, sched)

    def phase(self, step: int) -> int:
        """1: whole videos with the probe; 2: mixed token subsets (``--subset-steps``);
        3: low-budget subsets (``--sparse-steps``)."""
        args = self.args
        if step < args.steps:
            return 1
        return 2 if step < args.steps + args.subset_steps else 3

    def start_phase(self, phase: int) -> None:
        """Phases 2 and 3 each start a fresh AdamW over the model alone (the probe is not
        trained any more) at their peak rate, 20 warm-up steps, cosine to 10 % of it."""
        args = self.args
        if phase == 2:
            steps, lr = args.subset_steps, args.subset_lr
        else:
            steps, lr = args.sparse_steps, args.sparse_lr
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01
        )

        def lr_at(step: int) -> float:
            if step < 20:
                return (step + 1) / 20
            frac = (step - 20) / max(1, steps - 20)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_at)

    def subset(self, step: int, objects: list[np.ndarray]) -> torch.Tensor | None:
        """The visual tokens phases 2 and 3 show at ``step``: (B, M) ascending, or None for the
        whole videos.  objects: B x (n_objects, N), how much of each token every object covers
        (a token shows an object from 10 % on).  A function of ``step`` and the scenes only,
        never of the question or of a method's choice.

        Phase 2: a share ``1 - --subset-share`` of the steps shows the whole videos, so that the
        model does not unlearn them; the others one budget F*clamp(round(r*P), 1, P), r
        log-uniform in [1 %, 100 %], each video's tokens drawn without replacement with weights
        favouring the tokens that show an object by a factor log-uniform in [1, 1000] (1:
        uniformly random tokens; 1000: nearly every object token first).

        Phase 3: a fifth of the steps whole videos; the others r log-uniform in [1 %, 10 %], and
        per video, a third each, phase 2's draw or one of two object-balanced ones
        (``_balanced``): one token per (object, frame), the token the object covers most,
        objects and frames in random order and taken round-robin so that every object is seen in
        as many frames as the budget allows; then either uniformly random tokens or (dense) the
        other tokens that show an object, most covered first.  These are the shapes of the
        evidence a good selection keeps at ultra-low and at low retention, with nothing of the
        question in them.
        """
        if self.phase(step) == 2:
            rng = np.random.default_rng([scenes.LAB_SEED, 8, step])
            if rng.uniform() >= self.args.subset_share:
                return None
            high, balanced = 1.0, 0.0
        else:
            rng = np.random.default_rng([scenes.LAB_SEED, 9, step])
            if rng.uniform() < 0.2:
                return None
            high, balanced = 0.1, 2 / 3
        retention = float(np.exp(rng.uniform(np.log(0.01), np.log(high))))
        shape = self.shape
        m = _budget(retention, shape.frames, shape.frames * shape.tokens_per_frame)
        rows = []
        for cover in objects:
            shown = cover >= scenes.MIN_COVER
            favour = float(np.exp(rng.uniform(0.0, np.log(1000.0))))
            weight = np.where(shown.any(0), favour, 1.0)
            gumbel = np.log(weight) - np.log(-np.log(rng.uniform(size=weight.shape)))
            order = np.argsort(-gumbel, kind="stable")
            draw = rng.uniform() if balanced else 1.0  # phase 2 draws nothing here
            if draw < balanced:
                order = _balanced(rng, cover, shape.frames, order, dense=draw < balanced / 2)
            rows.append(np.sort(order[:m]))
        return torch.from_numpy(np.stack(rows))

    def step(self, step: int) -> dict[str, float]:
        """One optimiser step on the videos of ``step``; the answer and auxiliary losses.  Steps
        from ``--steps`` on show token subsets and train no probe."""
        args = self.args
        subsets = self.phase(step) > 1
        batch = _batch(step, args.batch, args.questions, self.shape, args.open_ratio)
        keep = self.subset(step, batch["objects"]) if subsets else None
        answer, probe, guide, acc = _loss(
            self.model, self.probe, self.tokenizer, batch, self.shape, keep
        )
        aux = guide if subsets else probe + guide  # phases 2 and 3 train no probe
        loss = answer + args.aux_weight * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.model.parameters())
        if not subsets:
            params += list(self.probe.parameters())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.opt.step()
        self.sched.step()
        return {"answer": float(answer.detach()), "aux": float(aux.detach()), "acc": acc}


def run_steps(args: argparse.Namespace) -> dict[str, float]:
    """Train from scratch up to ``--stop`` without evaluating or writing anything: the mean losses
    of those steps (what ``lab.json``'s first ``log`` entry holds when ``--log-every`` is --stop)."""
    trainer = _Trainer.build(args)
    stop = args.steps if args.stop is None else min(args.stop, args.steps)  # phase 1 only
    seen = [trainer.step(step) for step in range(stop)]
    return {"step": stop, **{k: sum(x[k] for x in seen) / stop for k in seen[0]}}


def train(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    resumed = _load_checkpoint(out, args) if args.resume else None
    trainer = _Trainer.build(args)
    model, probe, shape = trainer.model, trainer.probe, trainer.shape
    total = args.steps + args.subset_steps + args.sparse_steps
    first, curve, log, before, resumed_at = 0, [], [], 0.0, []
    # the losses since the last log entry: part of the checkpoint, so that a run resumed between
    # two log entries writes the same next entry as one that was not stopped
    run = {"answer": 0.0, "aux": 0.0, "acc": 0.0, "k": 0}
    if resumed is not None:
        _check_parameters(model, resumed["model"])
        model.load_state_dict(resumed["model"])
        if resumed["step"] < args.steps:  # phase 1: its probe and optimiser go on
            probe.load_state_dict(resumed["probe"])
            trainer.opt.load_state_dict(resumed["opt"])
            trainer.sched.load_state_dict(resumed["sched"])
        elif trainer.phase(resumed["step"] - 1) == trainer.phase(resumed["step"]):
            trainer.start_phase(trainer.phase(resumed["step"]))  # inside phase 2 or 3
            trainer.opt.load_state_dict(resumed["opt"])
            trainer.sched.load_state_dict(resumed["sched"])
        torch.set_rng_state(resumed["rng"])
        first, curve, before = resumed["step"], resumed["curve"], resumed["seconds"]
        log = resumed["log"]
        run = dict(resumed.get("run", run))
        resumed_at = [*resumed.get("resumed_at", []), first]
        print(f"resuming at step {first} ({before:.0f}s of training so far)", flush=True)
    val = samples("val", args.val_limit)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter() - before
    stop = total if args.stop is None else min(args.stop, total)

    def checkpoint(steps_done: int) -> None:
        """Write the state after ``steps_done`` steps: what --resume continues from."""
        state = {
            "step": steps_done,
            "seconds": time.perf_counter() - start,
            "curve": curve,
            "log": log,
            "run": dict(run),
            "resumed_at": resumed_at,
            "settings": vars(args),
            "shape": shape.__dict__,
            "model": model.state_dict(),
            "probe": probe.state_dict(),
            "opt": trainer.opt.state_dict(),
            "sched": trainer.sched.state_dict(),
            "rng": torch.get_rng_state(),
        }
        _save_checkpoint(out, state)

    with _StopRequest() as stopping:
        for step in range(first, stop):
            if step >= args.steps and trainer.phase(step) != trainer.phase(step - 1):
                trainer.start_phase(trainer.phase(step))
            losses = trainer.step(step)
            for key, value in losses.items():
                run[key] += value
            run["k"] += 1
            if (step + 1) % args.log_every == 0:
                k = run.pop("k")
                log.append({"step": step + 1, **{key: value / k for key, value in run.items()}})
                print(
                    f"step {step + 1:5d}  answer {run['answer'] / k:.3f}  "
                    f"aux {run['aux'] / k:.3f}  train acc {100 * run['acc'] / k:5.1f}  "
                    f"lr {trainer.sched.get_last_lr()[0]:.2e}  "
                    f"{time.perf_counter() - start:6.0f}s",
                    flush=True,
                )
                run = {"answer": 0.0, "aux": 0.0, "acc": 0.0, "k": 0}
            saved = (step + 1) % args.eval_every == 0 or step + 1 == stop
            if saved:
                model.eval()
                res = evaluate(None, model=model, data=val, progress=False)
                sparse = evaluate(
                    None, model=model, data=val, progress=False, selector=oracle_selector(0.02)
                )
                model.train()
                point = {
                    "step": step + 1,
                    "seconds": time.perf_counter() - start,
                    "val": res.overall,
                    "val_per_family": res.per_family,
                    "val_oracle_2pct": sparse.overall,
                }
                curve.append(point)
                print(f"  val {res.summary()}  oracle 2 % {sparse.overall:.1f}", flush=True)
                model.save_pretrained(out)
                checkpoint(step + 1)
            if stopping.signal is not None and step + 1 < stop:
                if not saved:
                    checkpoint(step + 1)
                raise SystemExit(
                    f"stopped by {signal.Signals(stopping.signal).name} after step {step + 1}; "
                    f"{out / CHECKPOINT} holds it: continue with the same command and --resume"
                )
    train_seconds = time.perf_counter() - start
    model.eval()
    model.save_pretrained(out)
    final_val = evaluate(None, model=model, data=val, progress=False)
    test = evaluate(None, model=model, split="test", limit=args.test_limit, progress=False)
    record = {
        "settings": vars(args),
        "shape": shape.__dict__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_seconds,
        "steps_run": stop,
        "videos_seen": stop * args.batch,
        "resumed_at": resumed_at,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
        "curve": curve,
        "log": log,
        "val": {"overall": final_val.overall, "per_family": final_val.per_family, "n": final_val.n},
        "test": {
            "overall": test.overall,
            "per_family": test.per_family,
            "n": test.n,
            "seconds": test.timings["total"],
        },
    }
    with open(out / "lab.json", "w") as f:
        json.dump(record, f, indent=1)
    if stop == total:  # the schedule is done: the shipped folder holds the model alone
        (out / CHECKPOINT).unlink(missing_ok=True)
    print(f"test {test.summary()}", flush=True)
    return record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ustc.lab.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", required=True, help="folder for model.safetensors, config.json, lab.json"
    )
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument(
        "--stop",
        type=int,
        default=None,
        help="stop after this many steps of the whole schedule, all phases (default: all)",
    )
    p.add_argument("--batch", type=int, default=12, help="videos per step")
    p.add_argument(
        "--questions",
        type=int,
        default=1,
        help="questions per video (1: its own family, so the families stay balanced)",
    )
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument(
        "--subset-steps",
        type=int,
        default=2000,
        help="phase 2 after --steps: steps on random token subsets (0: none)",
    )
    p.add_argument("--subset-lr", type=float, default=5e-4, help="peak learning rate of phase 2")
    p.add_argument(
        "--subset-share",
        type=float,
        default=0.7,
        help="share of phase-2 steps on token subsets (the others show whole videos)",
    )
    p.add_argument(
        "--sparse-steps",
        type=int,
        default=3000,
        help="phase 3 after phase 2: steps on low-budget (1-10 %%) token subsets (0: none)",
    )
    p.add_argument("--sparse-lr", type=float, default=5e-4, help="peak learning rate of phase 3")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument(
        "--open-ratio",
        type=float,
        default=0.0,
        help="share of training questions asked open-ended (answer word, no options)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resume",
        action="store_true",
        help=f"continue from {CHECKPOINT} in --out (written at every eval; same schedule)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (results are deterministic for a given thread count)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where to train: cpu or cuda[:N] (the shipped weights were trained on the CPU)",
    )
    p.add_argument("--val-limit", type=int, default=300)
    p.add_argument("--test-limit", type=int, default=None, help="test questions (default: all)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=250,
        help="validate, save the weights and write the --resume checkpoint every N steps",
    )
    p.add_argument("--log-every", type=int, default=50)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    for name in ("steps", "batch", "questions", "threads", "val_limit", "eval_every", "log_every"):
        if getattr(args, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("subset_steps", "sparse_steps"):
        if getattr(args, name) < 0:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.subset_share <= 1.0:
        raise BadInput(f"--subset-share must be in [0, 1], got {args.subset_share}")
    _check_device(args.device)
    train(args)


def _check_device(name: str) -> None:
    """Refuse a ``--device`` torch cannot parse or this machine does not have, before any work."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise BadInput(
            f"--device must be a torch device (cpu, cuda, cuda:1, ...), got {name!r}"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {name}: this torch sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise BadInput(f"--device must be cpu or cuda[:N], got {name!r}")


def cli(argv: list[str] | None = None) -> int:
    """``python -m ustc.lab.train``: a bad argument or checkpoint is one line on stderr, exit 2."""
    try:
        main(argv)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
