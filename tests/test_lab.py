"""Tests of the laboratory benchmark: generator, tokenizer/model builder, evaluator, training.

The generator is checked against what the rendered pixels show (objects found by colour), not
against its own bookkeeping; the evaluator against a one-question-at-a-time reference.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import ustc.lab as lab
from ustc.lab import scenes
from ustc.lab.evaluate import evaluate, evidence_order, oracle_selector, random_selector, samples
from ustc.lab.model import (
    LAB_LAYER,
    VIDEO_TOKEN_ID,
    LabShape,
    build_model,
    build_tokenizer,
    encode_prompts,
    letter_ids,
    load_model,
    pixel_values,
    weights_path,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(seed=0)


@pytest.fixture(scope="module")
def test_samples():
    return samples("test", 60)


# ----------------------------------------------------------------------------- generator


def _find(frames: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Slow reference: for each colour, pixel count and centroid per frame, from pixels only."""
    found = {}
    px = frames.astype(np.float32)
    for name, rgb in scenes.COLOURS.items():
        hit = np.linalg.norm(px - np.asarray(rgb, np.float32), axis=-1) < 30
        count = hit.sum(axis=(1, 2))
        if not count.any():
            continue
        cent = np.full((frames.shape[0], 2), np.nan)
        for t in range(frames.shape[0]):
            if count[t] >= 6:
                ys, xs = np.nonzero(hit[t])
                cent[t] = xs.mean(), ys.mean()
        found[name] = {"count": count, "centroid": cent, "present": count >= 6}
    return found


def _moved(c: np.ndarray) -> float:
    c = c[~np.isnan(c[:, 0])]
    return float(np.abs(c - c[0]).max()) if len(c) else 0.0


def test_samples_are_deterministic_and_splits_disjoint():
    a = scenes.make_sample("test", 7)
    b = scenes.make_sample("test", 7)
    assert np.array_equal(a.frames, b.frames) and a.question == b.question
    other = [scenes.make_sample(s, 7).frames for s in ("train", "val")]
    assert not any(np.array_equal(a.frames, o) for o in other)
    assert a.frames.shape == (scenes.FRAMES, scenes.SIZE, scenes.SIZE, 3)
    assert a.frames.dtype == np.uint8


def test_families_are_balanced_and_answers_uniform(test_samples):
    fams = [s.family for s in test_samples]
    assert all(fams.count(f) == len(fams) // len(scenes.FAMILIES) for f in scenes.FAMILIES)
    letters = [s.question.answer for s in samples("test", 240)]
    assert all(letters.count(k) > 30 for k in range(4))  # 60 expected per letter


@pytest.mark.parametrize("index", range(40))
def test_answers_agree_with_the_pixels(index):
    s = scenes.make_sample("test", index)
    q, found = s.question, _find(s.frames)
    answer = q.options[q.answer]
    assert len(set(q.options)) == 4
    if s.family == "count":
        assert int(answer) == len(found)
        return
    assert answer in found, f"{s.family}: answer {answer} not visible"
    present = {c: f["present"] for c, f in found.items()}
    if s.family == "stationary":
        assert present[answer].all() and _moved(found[answer]["centroid"]) < 1.0
        assert all(_moved(f["centroid"]) > 3 for c, f in found.items() if c != answer)
    elif s.family == "hit":
        c = found[answer]["centroid"]
        steps = np.linalg.norm(np.diff(c, axis=0), axis=1)
        assert steps[0] < 1.0 and steps[-1] > 2.0  # still at first, moving at the end
        assert any(
            np.linalg.norm(np.diff(f["centroid"], axis=0), axis=1)[0] > 2.0
            for col, f in found.items()
            if col != answer
        )  # something moved into it
    elif s.family == "order":
        first = {c: int(np.flatnonzero(p)[0]) for c, p in present.items()}
        target = min(first.values()) if "first" in q.text else max(first.values())
        assert first[answer] == target
        assert sum(v == target for v in first.values()) == 1
    elif s.family == "rare":
        assert present[answer].sum() <= 2
        assert all(p.sum() >= 4 for c, p in present.items() if c != answer)


def test_token_labels_match_a_pixel_loop():
    s = scenes.make_sample("val", 4, keep_scene=True)
    colours, shapes = scenes.token_labels(s.scene)
    masks = scenes.object_masks(s.scene)
    cells = scenes.SIZE // scenes.TOKEN_PX
    for t in range(scenes.FRAMES):
        for row in range(cells):
            for col in range(cells):
                want = np.zeros(len(scenes.COLOUR_NAMES))
                for obj, m in zip(s.scene.objects, masks, strict=True):
                    px = scenes.TOKEN_PX
                    cell = m[t, row * px : row * px + px, col * px : col * px + px]
                    if cell.mean() >= 0.1:
                        want[scenes.COLOUR_NAMES.index(obj.colour)] = 1
                np.testing.assert_array_equal(colours[t, row * cells + col], want)
    assert shapes.shape == (scenes.FRAMES, cells * cells, len(scenes.SHAPES))


def test_crowded_scenes_are_placed():
    """Training sample 4682 (four objects, some moving) needed more than the first version's 200
    placement tries and stopped the training run at step 391."""
    s = scenes.make_sample("train", 4682)
    assert s.family == "count" and s.question.options[s.question.answer] == "4"


def test_bad_generator_arguments_raise():
    with pytest.raises(ValueError, match="split must be one of"):
        scenes.make_sample("dev", 0)
    with pytest.raises(ValueError, match="index must be >= 0"):
        scenes.make_sample("test", -1)
    with pytest.raises(ValueError, match="limit"):
        samples("train")


# ----------------------------------------------------------------------------- model builder


def test_tokenizer_and_prompt_format(test_samples):
    tok = build_tokenizer()
    shape = LabShape()
    ids = encode_prompts(tok, [s.question for s in test_samples], shape.video_tokens)
    for x in ids:
        assert x.count(VIDEO_TOKEN_ID) == shape.frames * shape.tokens_per_frame + 1
        assert tok.unk_token_id not in x
    text = tok.decode(ids[0], skip_special_tokens=False)
    assert text.startswith("<|im_start|> user <video>")
    assert text.endswith("<|im_start|> assistant \n")
    assert len(set(letter_ids(tok))) == 4
    bad = scenes.Question("count", "How many zebras ?", ["2", "3", "4", "5"], 0)
    with pytest.raises(ValueError, match="outside the lab vocabulary"):
        encode_prompts(tok, [bad], shape.video_tokens)


def test_model_is_a_real_llava_onevision(tiny_model, test_samples):
    from transformers import LlavaOnevisionForConditionalGeneration

    assert isinstance(tiny_model, LlavaOnevisionForConditionalGeneration)
    assert tiny_model.config.text_config.num_hidden_layers > LAB_LAYER
    assert lab.default_config().layer == LAB_LAYER
    shape = LabShape()
    px = pixel_values(np.stack([test_samples[0].frames]))
    assert px.shape == (1, shape.frames, 3, shape.size, shape.size)
    assert -1.0 <= float(px.min()) and float(px.max()) <= 1.0
    feats = tiny_model.model.get_video_features(
        px, vision_feature_layer=-1, vision_feature_select_strategy="full"
    ).pooler_output
    assert feats.shape == (1, shape.video_tokens, shape.hidden)


def test_load_model_missing_weights_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m ustc.lab.train"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="lab weights missing"):
        lab.check(path=tmp_path)
    with pytest.raises(ValueError, match="lab split must be one of"):
        lab.check(split="dev")


# ----------------------------------------------------------------------------- evaluator


def test_evaluator_matches_one_question_at_a_time(tiny_model, test_samples):
    data = test_samples[:18]
    res = evaluate(None, model=tiny_model, data=data, progress=False, batch_size=4)
    tok = build_tokenizer()
    letters = letter_ids(tok)
    shape = LabShape()
    right = 0
    with torch.no_grad():
        for s in data:
            ids = torch.tensor(encode_prompts(tok, [s.question], shape.video_tokens))
            logits = tiny_model(input_ids=ids, pixel_values_videos=pixel_values(s.frames[None]))
            right += int(int(logits.logits[0, -1, letters].argmax()) == s.question.answer)
    assert res.n == 18
    assert res.overall == pytest.approx(100 * right / 18)
    assert set(res.per_family) == set(scenes.FAMILIES)
    n = shape.frames * shape.tokens_per_frame
    assert res.tokens["llm_visual"] == n and res.tokens["visual_in"] == n


def test_the_lab_is_in_the_papers_regime():
    """At least 100 tokens per frame and 8 frames, so the budgets at 10/5/2/1 % all differ."""
    shape = LabShape()
    assert shape.tokens_per_frame >= 100 and shape.frames >= 8
    budgets = [
        lab.default_config(retention=r).budget(shape.frames, shape.tokens_per_frame)
        for r in (0.10, 0.05, 0.02, 0.01)
    ]
    assert budgets == sorted(set(budgets), reverse=True)
    assert scenes.SIZE // scenes.TOKEN_PX == math.isqrt(shape.tokens_per_frame)


def test_objects_cover_several_tokens_and_the_background_repeats():
    covered, repeated = [], []
    for s in samples("val", 20):
        shown = scenes.token_cover(s.scene) >= scenes.MIN_COVER  # (objects, F, P)
        per_frame = shown.sum(-1)
        covered += per_frame[per_frame > 0].tolist()
        background = ~shown.any(0)  # (F, P)
        tokens = (
            s.frames.reshape(scenes.FRAMES, 10, 8, 10, 8, 3)
            .mean((2, 4))
            .reshape(scenes.FRAMES, -1, 3)
        )
        still = np.abs(tokens[1:] - tokens[:1]).max(-1) < 2.0  # same token as in frame 0
        both = background[1:] & background[:1]
        repeated.append(still[both].mean())
    assert np.median(covered) >= 4
    assert np.mean(repeated) > 0.95


def test_random_selector_budget_and_determinism():
    feats = torch.randn(3, 800, 16)
    a = random_selector(0.02, seed=1)(feats, 8, [])
    b = random_selector(0.02, seed=1)(feats, 8, [])
    assert a.shape == (3, 8 * 2)
    assert torch.equal(a, b)
    assert (a.diff(dim=1) > 0).all() and int(a.max()) < 800


def test_evidence_order_shows_every_object_in_every_prefix(test_samples):
    """The oracle's order: a permutation of the tokens; a token per (object, frame) first, the
    question's named object first, every object in the first n_objects tokens; then the other
    object tokens; the uniform fill last."""
    shape = LabShape()
    n = shape.frames * shape.tokens_per_frame
    for s in test_samples[:20]:
        order = evidence_order(s, n)
        assert sorted(order.tolist()) == list(range(n))
        cover = scenes.token_cover(s.scene).reshape(len(s.scene.objects), -1)
        shows = cover >= scenes.MIN_COVER
        k = len(s.scene.objects)
        assert all(shows[:, order[:k]].any(1))  # every object in the first k tokens
        q = s.question
        if q.family in ("stationary", "hit", "rare"):
            named = [o.colour for o in s.scene.objects].index(q.options[q.answer])
            assert shows[named, order[0]]
        pairs = int((cover.reshape(k, shape.frames, -1).max(-1) >= scenes.MIN_COVER).sum())
        assert shows[:, order[:pairs]].any(0).all()  # the (object, frame) tokens come first
        object_tokens = int(shows.any(0).sum())
        assert not shows[:, order[object_tokens:]].any()  # then the fill


def test_oracle_selector_keeps_the_budget_and_needs_scenes(test_samples):
    shape = LabShape()
    n = shape.frames * shape.tokens_per_frame
    feats = torch.randn(2, n, 4)
    kept = oracle_selector(0.02)(feats, shape.frames, test_samples[:2])
    assert kept.shape == (2, shape.frames * 2)
    assert (kept.diff(dim=1) > 0).all()
    for row, s in zip(kept, test_samples[:2], strict=True):
        assert set(row.tolist()) == set(evidence_order(s, n)[: shape.frames * 2].tolist())
    bare = [scenes.make_sample("test", 0)]
    with pytest.raises(ValueError, match="samples with their scenes"):
        oracle_selector(0.02)(feats[:1], shape.frames, bare)


def test_evaluator_counts_tokens_under_compression(tiny_model, test_samples):
    data = test_samples[:6]
    shape = LabShape()
    rnd = evaluate(
        None, model=tiny_model, data=data, progress=False, selector=random_selector(0.02)
    )
    assert rnd.tokens["llm_visual"] == shape.frames * 2
    orc = evaluate(
        None, model=tiny_model, data=data, progress=False, selector=oracle_selector(0.01)
    )
    assert orc.tokens["llm_visual"] == shape.frames
    config = lab.default_config(retention=0.1)
    res = evaluate(config, model=tiny_model, data=data, progress=False)
    budget = config.budget(shape.frames, shape.tokens_per_frame)
    assert res.tokens["llm_visual"] == budget
    assert res.tokens["after_merge"] == config.kept_after_merge(budget)
    with pytest.raises(ValueError, match="either a compressing config or a selector"):
        evaluate(config, model=tiny_model, data=data, selector=random_selector(0.02))


# ----------------------------------------------------------------------------- training


def test_shared_prefix_training_loss_equals_full_prompts():
    from ustc.lab import train

    shape = LabShape()
    model = build_model(seed=1)
    probe = torch.nn.Linear(shape.hidden, len(scenes.COLOUR_NAMES) + len(scenes.SHAPES))
    tok = build_tokenizer()
    batch = train._batch(0, 2, 3, shape)
    with torch.no_grad():
        answer, aux, _, _ = train._loss(model, probe, tok, batch, shape)
        flat = [q for qs in batch["questions"] for q in qs]
        ids = encode_prompts(tok, flat, shape.video_tokens)
        px = pixel_values(batch["frames"]).repeat_interleave(3, 0)
        losses = []
        for i, x in enumerate(ids):
            logits = model(input_ids=torch.tensor([x]), pixel_values_videos=px[i : i + 1]).logits
            target = tok.convert_tokens_to_ids(flat[i].letter)
            losses.append(torch.nn.functional.cross_entropy(logits[0, -1:], torch.tensor([target])))
    assert float(answer) == pytest.approx(float(torch.stack(losses).mean()), abs=1e-5)
    assert float(aux) > 0


def test_a_subset_of_every_token_is_the_whole_video_and_positions_stay():
    """Phase 2's token subsets keep their original positions: keeping every token gives the
    whole video's losses, and a subset's answer loss equals a full forward of the prompt with
    only those tokens at their original positions."""
    from ustc.lab import train

    shape = LabShape()
    model = build_model(seed=3)
    probe = torch.nn.Linear(shape.hidden, len(scenes.COLOUR_NAMES) + len(scenes.SHAPES))
    tok = build_tokenizer()
    batch = train._batch(5, 2, 1, shape)
    n = shape.frames * shape.tokens_per_frame
    with torch.no_grad():
        whole = train._loss(model, probe, tok, batch, shape)
        every = train._loss(model, probe, tok, batch, shape, torch.arange(n).expand(2, -1))
        keep = (
            torch.stack(
                [
                    torch.randperm(n, generator=torch.Generator().manual_seed(i))[:16]
                    for i in range(2)
                ]
            )
            .sort(1)
            .values
        )
        sparse = train._loss(model, probe, tok, batch, shape, keep)
        ids = encode_prompts(tok, [qs[0] for qs in batch["questions"]], shape.video_tokens)
        px = pixel_values(batch["frames"])
        feats = model.model.get_video_features(
            pixel_values_videos=px, vision_feature_layer=-1, vision_feature_select_strategy="full"
        ).pooler_output
        losses = []
        for i, x in enumerate(ids):
            first = x.index(VIDEO_TOKEN_ID)
            kept = torch.cat([keep[i], torch.tensor([n])])
            embed = model.model.get_input_embeddings()
            embeds = torch.cat(
                [
                    embed(torch.tensor(x[:first])),
                    feats[i, kept],
                    embed(torch.tensor(x[first + n + 1 :])),
                ]
            )[None]
            positions = torch.cat(
                [torch.arange(first), first + kept, torch.arange(first + n + 1, len(x))]
            )[None]
            logits = model(inputs_embeds=embeds, position_ids=positions).logits[0, -1:]
            target = tok.convert_tokens_to_ids(batch["questions"][i][0].letter)
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor([target])))
    for a, b in zip(whole[:3], every[:3], strict=True):
        assert float(a) == pytest.approx(float(b), abs=1e-5)
    assert float(sparse[0]) == pytest.approx(float(torch.stack(losses).mean()), abs=1e-5)


def test_phase_three_subsets_are_low_budget_and_object_balanced():
    """Phase 3 shows 1-10 % budgets (or, on a fifth of its steps, whole videos); its
    object-balanced draws visit every object once before any object twice, and the dense one then
    shows the other object tokens, most covered first."""
    from ustc.lab import train

    shape = LabShape()
    args = train.parser().parse_args(["--out", "x", "--steps", "10", "--subset-steps", "10"])
    trainer = train._Trainer.build(args)
    assert [trainer.phase(s) for s in (9, 10, 19, 20, 10**6)] == [1, 2, 2, 3, 3]
    n = shape.frames * shape.tokens_per_frame
    sizes, whole = [], 0
    for step in range(20, 60):
        objects = train._batch(step, 2, 1, shape)["objects"]
        keep = trainer.subset(step, objects)
        if keep is None:
            whole += 1
            continue
        assert keep.shape[0] == 2 and (keep.diff(dim=1) > 0).all() and int(keep.max()) < n
        sizes.append(keep.shape[1])
    assert 0 < whole < 20 and min(sizes) >= shape.frames and max(sizes) <= 10 * shape.frames

    rng = np.random.default_rng(0)
    for index in range(12):
        sample = scenes.make_sample("train", index, keep_scene=True)
        cover = scenes.token_cover(sample.scene)
        cover = cover.reshape(len(cover), -1)
        shown = cover >= scenes.MIN_COVER
        order = train._round_robin(rng, cover, shape.frames)
        assert len(set(order.tolist())) == len(order) and shown.any(0)[order].all()
        owners = [set(np.flatnonzero(shown[:, t]).tolist()) for t in order]
        frames_shown = shown.reshape(len(shown), shape.frames, -1).any(-1).sum(1)
        for i in range(len(shown)):  # each object in every frame it shows in
            assert sum(i in o for o in owners) >= frames_shown[i]
        for i, obj in enumerate(sample.scene.objects):  # a still object: its centre token
            if not obj.moves():
                cells = {int(t) % shape.tokens_per_frame for t in order if cover[i, t] >= 0.5}
                assert len(cells) == 1
        first = set().union(*owners[: len(shown)])
        assert first == set(range(len(shown)))  # the first round shows every object

        every = rng.permutation(cover.shape[1])
        for dense in (False, True):
            head = train._round_robin(np.random.default_rng(index), cover, shape.frames)
            got = train._balanced(np.random.default_rng(index), cover, shape.frames, every, dense)
            assert sorted(got.tolist()) == list(range(cover.shape[1]))
            assert got[: len(head)].tolist() == head.tolist()
            tail = cover.max(0)[got[len(head) :]]
            objects_next = tail[: int((tail >= scenes.MIN_COVER).sum())]
            assert dense == bool(
                (objects_next >= scenes.MIN_COVER).all() and (np.diff(objects_next) <= 0).all()
            )


def test_attention_supervision_matches_eager_attention():
    """The "learn to look" loss is -log of head 0's attention mass on the evidence tokens, from the
    answer position of the last layer, renormalised over the visual tokens: compare it with the
    attention probabilities an eager forward returns."""
    from ustc.lab import train

    shape = LabShape()
    model = build_model(seed=2)
    model.config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    tok = build_tokenizer()
    batch = train._batch(3, 2, 2, shape)
    seen_losses = {}
    original = train._pointer_loss

    def spy(attn, seen, keys, last, evidence):
        out = original(attn, seen, keys[:1], last[:1], evidence[:1])
        seen_losses["first"] = float(out)
        return original(attn, seen, keys, last, evidence)

    train._pointer_loss = spy
    try:
        with torch.no_grad():
            train._loss(
                model,
                torch.nn.Linear(shape.hidden, len(scenes.COLOUR_NAMES) + len(scenes.SHAPES)),
                tok,
                batch,
                shape,
            )
    finally:
        train._pointer_loss = original
    q = batch["questions"][0][0]
    ids = torch.tensor(encode_prompts(tok, [q], shape.video_tokens))
    with torch.no_grad():
        out = model(
            input_ids=ids,
            pixel_values_videos=pixel_values(batch["frames"][:1]),
            output_attentions=True,
        )
    first = int((ids[0] == VIDEO_TOKEN_ID).nonzero()[0])
    att = out.attentions[-1][0, 0, -1, first : first + shape.frames * shape.tokens_per_frame]
    want = -torch.log(att[batch["evidence"][0]].sum() / att.sum())
    assert batch["evidence"][0].any()
    assert seen_losses["first"] == pytest.approx(float(want), rel=1e-4)


def _train_argv(out: Path, *extra: str) -> list[str]:
    small = ["--batch", "2", "--questions", "2", "--val-limit", "6", "--test-limit", "6"]
    small += ["--subset-steps", "0", "--sparse-steps", "0"]  # a test names the phases it runs
    return ["--out", str(out), *small, "--threads", "1", "--log-every", "1", *extra]


def test_training_smoke_writes_loadable_weights(tmp_path):
    from ustc.lab import train

    train.main(_train_argv(tmp_path, "--steps", "2"))
    record = json.loads((tmp_path / "lab.json").read_text())
    assert record["test"]["n"] == 6 and record["videos_seen"] == 4
    assert [p["step"] for p in record["log"]] == [1, 2]
    assert not (tmp_path / train.CHECKPOINT).exists()  # a finished schedule ships the model alone
    model = load_model(tmp_path)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    """--stop then --resume gives the same weights, log and curve as one run of the schedule,
    stopped inside phase 1, inside phase 2 and at the start of phase 3."""
    from safetensors.torch import load_file

    from ustc.lab import train

    schedule = ["--steps", "2", "--eval-every", "1"]
    schedule += ["--subset-steps", "3", "--sparse-steps", "2"]  # after _train_argv's zeros
    train.main(_train_argv(tmp_path / "straight", *schedule))
    train.main(_train_argv(tmp_path / "split", *schedule, "--stop", "1"))
    assert (tmp_path / "split" / train.CHECKPOINT).is_file()
    for stop in ("3", "5"):
        train.main(_train_argv(tmp_path / "split", *schedule, "--stop", stop, "--resume"))
    train.main(_train_argv(tmp_path / "split", *schedule, "--resume"))
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight, split = (
        json.loads((tmp_path / d / "lab.json").read_text()) for d in ("straight", "split")
    )
    assert split["log"] == straight["log"] and split["resumed_at"] == [1, 3, 5]
    assert [p["val"] for p in split["curve"]] == [p["val"] for p in straight["curve"]]
    assert split["test"] == {**straight["test"], "seconds": split["test"]["seconds"]}


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--steps", "0", "--steps must be >= 1"),
        ("--subset-steps", "-1", "--subset-steps must be >= 0"),
        ("--sparse-steps", "-5", "--sparse-steps must be >= 0"),
        ("--subset-share", "1.5", r"--subset-share must be in \[0, 1\]"),
        ("--device", "tpu", r"--device must be a torch device"),
        ("--device", "meta", r"--device must be cpu or cuda\[:N\], got 'meta'"),
        pytest.param(
            "--device",
            "cuda",
            "sees no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_bad_training_arguments_raise_before_any_work(tmp_path, flag, value, message):
    from ustc.lab import train

    with pytest.raises(ValueError, match=message):
        train.main(_train_argv(tmp_path, flag, value))
    assert not any(tmp_path.iterdir())


def test_resume_refuses_another_schedule_or_a_missing_checkpoint(tmp_path):
    from ustc.lab import train

    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        train.main(_train_argv(tmp_path, "--steps", "4", "--resume"))
    train.main(_train_argv(tmp_path, "--steps", "4", "--eval-every", "1", "--stop", "1"))
    with pytest.raises(ValueError, match="--lr 0.0015 .checkpoint. vs 0.001"):
        train.main(_train_argv(tmp_path, "--steps", "4", "--lr", "1e-3", "--resume"))


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of ``folder`` with its bytes and modification time (ns)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_bad_resume_is_one_line_and_leaves_the_checkpoint_untouched(
    tmp_path, capsys, monkeypatch
):
    """--resume of a missing, unreadable or mismatched checkpoint (another schedule, another model
    shape, recorded or found in the parameters) is one line on stderr, exit status 2, and every
    file of --out keeps its bytes and modification time."""
    from ustc.lab import train

    schedule = ["--steps", "4", "--eval-every", "1"]
    empty = tmp_path / "empty"
    assert train.cli(_train_argv(empty, *schedule, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: no checkpoint.pt") and err.count("\n") == 1
    assert not empty.exists()

    out = tmp_path / "run"
    train.main(_train_argv(out, *schedule, "--stop", "1"))
    state = torch.load(out / train.CHECKPOINT, weights_only=False)
    old = tmp_path / "old"  # a checkpoint without a recorded shape, of another model
    old.mkdir()
    del state["shape"]
    state["model"] = build_model(LabShape(vision_hidden=16)).state_dict()
    torch.save(state, old / train.CHECKPOINT)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / train.CHECKPOINT).write_bytes((out / train.CHECKPOINT).read_bytes()[:1000])
    capsys.readouterr()

    def narrow() -> LabShape:
        return LabShape(vision_hidden=16)

    cases = [
        (out, ["--lr", "1e-3"], r"--lr 0.0015 \(checkpoint\) vs 0.001", None),
        (out, ["--steps", "5"], r"--steps 4 \(checkpoint\) vs 5", None),
        (
            out,
            [],
            r"model shape .*'vision_hidden': 32.* \(checkpoint\) vs .*'vision_hidden': 16",
            narrow,
        ),
        (old, [], r"not this lab model's: model\.vision_tower.* \(checkpoint\) vs", None),
        (broken, [], r"checkpoint.pt cannot be read as a checkpoint", None),
    ]
    for folder, changes, message, shape in cases:
        before = _files(folder)
        with monkeypatch.context() as patch:
            if shape is not None:
                patch.setattr(train, "LabShape", shape)
            argv = _train_argv(folder, *schedule, *changes, "--resume")
            assert train.cli(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert re.search(message, err), err
        assert _files(folder) == before
    assert train.cli(_train_argv(out, *schedule, "--resume")) == 0  # the right one goes on
    capsys.readouterr()
    before = _files(out)
    assert train.cli(_train_argv(out, *schedule, "--resume")) == 2  # finished: none left
    err = capsys.readouterr().err
    assert "lab.json records a finished run of 4 steps" in err and err.count("\n") == 1
    assert _files(out) == before


#: a schedule whose log entries (every 3 steps) straddle its checkpoints (every 2 steps)
STOPPED = ["--steps", "3", "--subset-steps", "2", "--eval-every", "2", "--log-every", "3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from ustc.lab import train

    out = tmp_path_factory.mktemp("uninterrupted")
    train.main(_train_argv(out, *STOPPED))
    return out


def _same_run(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = (json.loads((d / "lab.json").read_text()) for d in (a, b))
    assert ra["log"] == rb["log"]
    assert [p["val"] for p in ra["curve"]] == [p["val"] for p in rb["curve"]]
    assert ra["test"] == {**rb["test"], "seconds": ra["test"]["seconds"]}


def _steps_done(monkeypatch, train, at: int, action) -> list[int]:
    """Patch the trainer's step: ``action()`` runs at the start of step ``at``; returns the list
    the completed steps are appended to."""
    done: list[int] = []
    original = train._Trainer.step

    def step(self, index: int) -> dict[str, float]:
        if index == at:
            action()
        out = original(self, index)
        done.append(index)
        return out

    monkeypatch.setattr(train._Trainer, "step", step)
    return done


def test_a_crashed_run_loses_at_most_the_steps_since_its_checkpoint(
    tmp_path, monkeypatch, uninterrupted
):
    """An exception at step 3 (checkpoint after step 2): the resumed run repeats only step 2
    and ends as the uninterrupted one, log entries included (the losses since the last entry
    are part of the checkpoint)."""
    from ustc.lab import train

    def crash() -> None:
        raise RuntimeError("injected failure")

    with monkeypatch.context() as patch:
        done = _steps_done(patch, train, 3, crash)
        with pytest.raises(RuntimeError, match="injected failure"):
            train.main(_train_argv(tmp_path, *STOPPED))
    saved = torch.load(tmp_path / train.CHECKPOINT, weights_only=False)["step"]
    assert done == [0, 1, 2] and saved == 2
    assert len(done) - saved <= 2  # at most --eval-every steps lost
    train.main(_train_argv(tmp_path, *STOPPED, "--resume"))
    _same_run(tmp_path, uninterrupted)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_run_checkpoints_its_last_step_and_resumes(
    tmp_path, monkeypatch, capsys, uninterrupted, signum
):
    """SIGTERM or SIGINT during step 2 (no checkpoint due after it): the step finishes, the
    checkpoint is written after it, the run stops; nothing is lost, the signal handlers are
    restored, and the resumed run ends as the uninterrupted one."""
    from ustc.lab import train

    previous = signal.getsignal(signum)
    with monkeypatch.context() as patch:
        done = _steps_done(patch, train, 2, lambda: os.kill(os.getpid(), signum))
        with pytest.raises(
            SystemExit, match=f"stopped by {signal.Signals(signum).name} after step 3"
        ):
            train.main(_train_argv(tmp_path, *STOPPED))
    assert signal.getsignal(signum) is previous
    saved = torch.load(tmp_path / train.CHECKPOINT, weights_only=False)["step"]
    assert done == [0, 1, 2] and saved == 3  # no step lost
    assert not (tmp_path / "lab.json").exists()
    train.main(_train_argv(tmp_path, *STOPPED, "--resume"))
    _same_run(tmp_path, uninterrupted)


# ----------------------------------------------------------------------------- shipped weights

SHIPPED = (weights_path() / "model.safetensors").is_file()


@pytest.mark.skipif(not SHIPPED, reason="no shipped lab weights")
def test_shipped_weights_meet_the_labs_acceptance():
    """On a reduced set (the first 100 test questions): the shipped model answers, the oracle at
    2 % keeps nearly all of it, random 2 % loses much of it.  lab.json holds the full split."""
    record = lab.training_record()
    assert record["test"]["overall"] >= 90.0
    size = (weights_path() / "model.safetensors").stat().st_size
    assert size < 20 * 2**20
    model = load_model()
    data = samples("test", 100)
    res = evaluate(None, model=model, data=data, progress=False)
    assert res.overall >= 85.0
    picks = {
        name: evaluate(None, model=model, data=data, progress=False, selector=select)
        for name, select in (("random", random_selector(0.02)), ("oracle", oracle_selector(0.02)))
    }
    assert picks["random"].overall <= res.overall - 20.0
    assert picks["oracle"].overall >= 0.9 * res.overall


@pytest.mark.skipif(not SHIPPED, reason="no shipped lab weights")
def test_the_trainers_defaults_are_the_shipped_schedule():
    """``python -m ustc.lab.train --out ustc/lab/weights`` runs the recorded schedule."""
    from ustc.lab import train

    defaults = train.parser().parse_args(["--out", "x"])
    recorded = lab.training_record()["settings"]
    assert {k: getattr(defaults, k) for k in train.SCHEDULE} == {
        k: recorded[k] for k in train.SCHEDULE
    }


@pytest.mark.skipif(not SHIPPED, reason="no shipped lab weights")
def test_training_from_scratch_follows_the_shipped_run():
    """The reduced retraining check: the first logged stretch of the recorded schedule, retrained
    from scratch, has the shipped run's losses (training is deterministic for a thread count)."""
    from ustc.lab import train

    record = lab.training_record()
    settings, first = record["settings"], record["log"][0]
    argv = ["--out", "unused", "--stop", str(first["step"]), "--log-every", str(first["step"])]
    for key in (*train.SCHEDULE, "threads"):
        argv += [f"--{key.replace('_', '-')}", str(settings[key])]
    args = train.parser().parse_args(argv)
    got = train.run_steps(args)
    assert got["step"] == first["step"]
    for key in ("answer", "aux"):
        assert got[key] == pytest.approx(first[key], abs=2e-3)


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED, reason="no shipped lab weights")
def test_retraining_reproduces_the_shipped_accuracy(tmp_path: Path, request):
    """Retrain from scratch with the recorded settings (over an hour of CPU time)."""
    from ustc.lab import train

    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("retraining takes over an hour: select it with -m slow")

    settings = lab.training_record()["settings"]
    argv = ["--out", str(tmp_path)]
    for key in (*train.SCHEDULE, "threads"):
        argv += [f"--{key.replace('_', '-')}", str(settings[key])]
    record = train.train(train.parser().parse_args(argv))
    shipped = lab.training_record()["test"]["overall"]
    assert abs(record["test"]["overall"] - shipped) <= 2.0
