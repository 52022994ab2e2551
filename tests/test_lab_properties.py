"""Tests of ``python -m ustc.lab.properties``: each measure on a case whose answer is known, the
report's structure on a few videos, bad input, and the published figures' reduced-set record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ustc.lab import properties as props
from ustc.lab import scenes
from ustc.lab.evaluate import INTERIOR_COVER, evidence_order, oracle_selector, samples
from ustc.lab.model import LabShape, build_model, weights_path
from ustc.pool import REJECTED, RETAINED, UNVISITED

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
#: ``python -m ustc.lab.properties --limit 10 --threads 1 --json`` on the shipped weights
REDUCED = ROOT / "tests" / "data" / "lab_properties.reduced.json"
SHIPPED = (weights_path() / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def few():
    return samples("test", 10)


# ----------------------------------------------------------------------------- measures


def _slow_auc(scores: list[float], positive: list[bool]) -> float:
    pairs = [
        1.0 if a > b else 0.5 if a == b else 0.0
        for a, pa in zip(scores, positive, strict=True)
        for b, pb in zip(scores, positive, strict=True)
        if pa and not pb
    ]
    return sum(pairs) / len(pairs)


def test_auc_is_one_for_a_perfect_scorer_zero_reversed_and_a_pair_count():
    positive = torch.tensor([True, False, True, False, False, True])
    assert props.auc(positive.float(), positive) == 1.0
    assert props.auc(-positive.float(), positive) == 0.0
    assert props.auc(torch.ones(6), positive) == 0.5
    assert math.isnan(props.auc(torch.ones(3), torch.ones(3, dtype=torch.bool)))
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=gen).float()  # many ties
    labels = torch.rand(40, generator=gen) < 0.3
    want = _slow_auc(scores.tolist(), labels.tolist())
    assert props.auc(scores, labels) == pytest.approx(want)


def test_evidence_recall_counts_a_video_with_one_kept_evidence_token():
    evidence = torch.zeros(3, 10, dtype=torch.bool)
    evidence[0, 4] = evidence[1, 9] = True  # video 2 has evidence nowhere
    kept = torch.tensor([[1, 4], [2, 3], [0, 9]])
    assert props.evidence_recall(kept, evidence).tolist() == [True, False, False]


def test_the_oracle_recalls_every_question_and_its_evidence_is_the_answers_object(few):
    n = LabShape().frames * LabShape().tokens_per_frame
    evidence = torch.from_numpy(
        np.stack([scenes.evidence_tokens(s.scene, s.question) for s in few])
    )
    kept = oracle_selector(props.RETENTION)(torch.zeros(len(few), n, 4), LabShape().frames, few)
    assert props.evidence_recall(kept, evidence).all()
    for s, row in zip(few, evidence, strict=True):
        cover = scenes.token_cover(s.scene).reshape(len(s.scene.objects), -1)
        shown = cover >= scenes.MIN_COVER
        if s.family == "count":
            assert torch.equal(row, torch.from_numpy(shown.any(0)))
        else:
            answer = s.question.options[s.question.answer]
            owner = [o.colour for o in s.scene.objects].index(answer)
            assert torch.equal(row, torch.from_numpy(shown[owner]))


def test_colour_spread():
    assert props.colour_spread([2e-3, 2e-3, 2e-3, 2e-3]) == 0.0
    assert props.colour_spread([1.0, 2.0, 1.5, math.nan]) == pytest.approx(1.0)
    assert math.isnan(props.colour_spread([1.0, math.nan]))


def test_pool_fill_is_full_on_orthogonal_features_and_one_slot_on_copies():
    """Ours' pool (tau 0.7) admits every candidate of orthogonal features and one of identical
    ones; the measure reads the compressor's own status."""
    from ustc.compressor import Compressor

    config = props.METHODS["ours"].replace(retention=0.2)
    frames, p = 4, 25
    capacity = props.pool_capacity(config, frames, p)
    assert capacity == 20 - 6  # budget 4 x 5, round(0.3 * 20) cluster slots
    orthogonal = torch.eye(frames * p).reshape(1, frames, p, frames * p)
    attention = torch.rand(1, frames, p, generator=torch.Generator().manual_seed(0))
    result = Compressor(config).compress(orthogonal, attention)
    assert props.pool_fill(result.status, capacity).tolist() == [1.0]
    copies = torch.ones(1, frames, p, 8)
    result = Compressor(config).compress(copies, attention)
    assert props.pool_fill(result.status, capacity).tolist() == [pytest.approx(1 / capacity)]
    status = torch.tensor([[RETAINED, REJECTED, RETAINED, UNVISITED]], dtype=torch.int8)
    assert props.pool_fill(status, 4).tolist() == [0.5]


def test_object_and_background_cosines():
    """Two objects with orthogonal features: every cross pair has cosine 0, pairs within an
    object are not counted; a background that repeats has cosine 1, one that turns does not."""
    features = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 1.0], [1.0, 1.0]])
    owner = torch.tensor([0, 0, 1, 1, -1])
    cos = props.object_pair_cosines(features, owner)
    assert cos.tolist() == [0.0] * 4  # 2 x 2 cross pairs, none within an object or with -1
    grid = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [1.0, 0.0]]])  # (F=2, P=2, D)
    background = torch.tensor([[True, True], [True, False]])
    assert props.background_cosines(grid, background).tolist() == [pytest.approx(1.0)]
    background[1, 1] = True
    assert props.background_cosines(grid, background).tolist() == [pytest.approx(1.0), 0.0]


def test_inside_owner():
    cover = np.array([[1.0, 0.6, 0.3, 0.6, 0.0], [0.0, 0.0, 0.0, 0.2, 0.9]])
    assert props.inside_owner(cover).tolist() == [0, 0, -1, -1, 1]


def test_checks_pass_by_their_operator_and_nan_never_passes():
    assert props.Check("a", 0.9, ">=", 0.9).passed
    assert not props.Check("a", 0.89, ">=", 0.9).passed
    assert props.Check("b", 0.25, "<=", 0.25).passed
    assert not props.Check("b", math.inf, "<=", 0.25).passed
    assert not props.Check("c", math.nan, ">=", 0.0).passed


def test_interior_oracle_keeps_random_interior_tokens(few):
    """``oracle_selector(r, interior_seed)``: the same order of objects and frames as the oracle,
    each (object, frame) token drawn from the object's interior (per video, by seed), so it is
    not always the centre."""
    n = LabShape().frames * LabShape().tokens_per_frame
    differ = 0
    for s in few:
        cover = scenes.token_cover(s.scene).reshape(len(s.scene.objects), -1)
        pick = np.random.default_rng([0, s.index])
        order = evidence_order(s, n, interior=pick)
        centre = evidence_order(s, n)
        assert sorted(order.tolist()) == list(range(n))
        k = len(s.scene.objects)
        assert (cover[:, order[:k]] >= scenes.MIN_COVER).any(1).all()  # each object first round
        by_frame = cover.reshape(k, LabShape().frames, -1).max(-1)  # (objects, F)
        pairs = int((by_frame >= scenes.MIN_COVER).sum())  # step 1: one token per pair
        lacking = int(((by_frame >= scenes.MIN_COVER) & (by_frame < INTERIOR_COVER)).sum())
        head = order[:pairs]
        assert (cover[:, head] < INTERIOR_COVER).all(0).sum() <= lacking
        differ += int(not np.array_equal(np.sort(head), np.sort(centre[:pairs])))
        again = evidence_order(s, n, interior=np.random.default_rng([0, s.index]))
        assert np.array_equal(order, again)
    assert differ >= len(few) // 2
    feats = torch.zeros(len(few), n, 4)
    a = oracle_selector(0.02, interior_seed=3)(feats, LabShape().frames, few)
    b = oracle_selector(0.02, interior_seed=3)(feats[:2], LabShape().frames, few[:2])
    assert torch.equal(a[:2], b)  # a video's choice does not depend on its batch


# ----------------------------------------------------------------------------- the command


def _structure(record: dict, n: int, accuracy: bool) -> None:
    assert record["n"] == n and record["split"] == "test" and record["retention"] == 0.02
    numbers = [p["number"] for p in record["properties"]]
    assert numbers == [1, 2, 3, 4]
    first, second, third, fourth = record["properties"]
    recall = first["measures"]["evidence recall at 2 %"]
    assert list(recall) == list(props.SELECTIONS)
    assert all(0.0 <= v <= 1.0 for v in recall.values())
    assert recall["oracle"] == 1.0
    assert [c["op"] for c in first["checks"]] == [">=", "<="]
    assert first["checks"][0]["threshold"] == pytest.approx(recall["random"] + 0.15)
    assert [c["threshold"] for c in second["checks"]] == [0.9, 0.5, 0.9]
    assert 0.0 <= second["checks"][0]["value"] <= 1.0
    assert third["checks"][0]["threshold"] == 0.7 and 0.0 <= third["checks"][0]["value"] <= 1.0
    if accuracy:
        acc = fourth["measures"]["accuracy at 2 % (%)"]
        assert fourth["checks"][0]["threshold"] == pytest.approx(acc["oracle"] - 5.0)
        assert fourth["skipped"] is None
    else:
        assert fourth["checks"] == [] and fourth["skipped"] and fourth["passed"] is False
    for prop in record["properties"]:
        assert prop["passed"] == (
            prop["skipped"] is None and all(c["passed"] for c in prop["checks"])
        )
    assert record["passed"] == all(p["passed"] for p in record["properties"])


def test_measure_on_a_random_model_reports_every_property():
    """The report's structure and bookkeeping, without the shipped weights."""
    data = samples("test", 5)
    report = props.measure(build_model(seed=0), data=data, batch_size=3)
    _structure(report.to_dict(), 5, accuracy=True)
    text = report.format()
    assert text.count("[PASS]") + text.count("[FAIL]") == 7
    skipped = props.measure(build_model(seed=0), data=data, accuracy=False)
    _structure(skipped.to_dict(), 5, accuracy=False)
    assert "skipped (--no-accuracy)" in skipped.format()


@pytest.mark.parametrize(
    ("argv", "error", "message"),
    [
        (["--limit", "0"], ValueError, "--limit must be >= 1, got 0"),
        (["--split", "train"], ValueError, "--split must be test or val, got 'train'"),
        (["--batch-size", "-2"], ValueError, "--batch-size must be >= 1"),
        (["--weights", "/nonexistent/lab"], FileNotFoundError, "lab weights missing"),
    ],
)
def test_bad_arguments_fail_before_any_model_loads(monkeypatch, argv, error, message):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(props, "load_model", refuse)
    with pytest.raises(error, match=message):
        props.main(argv)


def test_check_exits_1_unless_every_property_is_measured_and_holds(tmp_path, capsys):
    build_model(seed=0).save_pretrained(tmp_path)
    argv = ["--weights", str(tmp_path), "--limit", "3", "--threads", "1", "--no-accuracy"]
    report = props.main(argv)
    assert not report.passed
    assert capsys.readouterr().out.rstrip().endswith("every property holds: no (not measured: 4)")
    with pytest.raises(SystemExit) as stopped:
        props.main([*argv, "--check"])
    assert stopped.value.code == 1


@pytest.mark.skipif(not SHIPPED, reason="no shipped lab weights")
def test_the_command_on_the_shipped_weights_matches_its_reduced_record(capsys):
    """``--limit 10 --json`` prints the report's structure, and its figures are the ones recorded
    in tests/data/lab_properties.reduced.json beside docs/lab.md's full-split output (a change of
    the weights or of a measure shows up here: rerun the command in that file's name)."""
    props.main(["--limit", "10", "--threads", "1", "--json"])
    got = json.loads(capsys.readouterr().out)
    _structure(got, 10, accuracy=True)
    want = json.loads(REDUCED.read_text())
    got.pop("seconds"), want.pop("seconds")
    assert _flat(got) == pytest.approx(_flat(want), abs=1e-4)


def _flat(record: object, prefix: str = "") -> dict[str, object]:
    if isinstance(record, dict):
        out: dict[str, object] = {}
        for key, value in record.items():
            out.update(_flat(value, f"{prefix}/{key}"))
        return out
    if isinstance(record, list):
        return _flat(dict(enumerate(record)), prefix)
    return {prefix: record}
