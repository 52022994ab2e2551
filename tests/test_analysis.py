"""The analysis commands: their statistics against slow references, and the figures they draw.

The lab-model tests use a randomly initialised lab model (``--untrained``): the figures' content
is checked (boxes per role, histogram counts, panels), not the trained model's behaviour.
"""

from __future__ import annotations

import json
import math

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from ablations.store import ResultStore, run_key
from analysis import attention_similarity, efficiency, params, token_indices, token_maps
from analysis.architecture import main as architecture_main
from analysis.common import (
    lab_grid,
    lab_samples,
    load_lab_model,
    method_config,
    parse_methods,
    run_attached,
    save_figure,
    video_tokens,
)
from ustc import CompressionConfig, Compressor
from ustc.compressor import REJECTED, RETAINED
from ustc.lab.model import default_config

torch.set_num_threads(1)


def _written(paths, suffixes=(".png", ".pdf")):
    by_suffix = {p.suffix: p for p in paths}
    for suffix in suffixes:
        assert suffix in by_suffix, f"no {suffix} among {paths}"
        assert by_suffix[suffix].stat().st_size > 1000
    assert by_suffix[".pdf"].read_bytes()[:5] == b"%PDF-"
    return mpimg.imread(by_suffix[".png"])


def _configs():
    return {
        "ours": CompressionConfig(retention=0.25, merger="none"),
        "attn": CompressionConfig(retention=0.25, scorer="attn", recycler="none", merger="none"),
        "sim-none": CompressionConfig(
            retention=0.25, scorer="sim", recycler="none", merger="none", tau=0.2
        ),
        "cluster": CompressionConfig(retention=0.25, cluster_ratio=1.0, merger="none"),
        "low-tau": CompressionConfig(retention=0.25, tau=0.1, merger="none"),
    }


@pytest.fixture(scope="module")
def lab():
    """A random lab model and the tokens of two lab videos, through the model's own code."""
    model = load_lab_model(untrained=True)
    samples = lab_samples("test", 0, 2)
    return model, samples, video_tokens(model, samples)


# ----------------------------------------------------------------------------- token maps


def _roles_by_loop(result):
    """Per token, in plain Python: which role the module docstring gives it."""
    out = []
    for b in range(result.assignment.shape[0]):
        positions = set(result.indices[b].tolist())
        roles = []
        for i, slot in enumerate(result.assignment[b].tolist()):
            status = int(result.status[b, i])
            at_position = i in positions
            role = {
                "retained": status == RETAINED,
                "recycled": at_position and status != RETAINED,
                "absorbed": not at_position and slot >= 0,
                "rejected": status == REJECTED and not at_position,
                "dropped": slot < 0,
            }
            roles.append(role)
        out.append(roles)
    return out


@pytest.mark.parametrize("name", list(_configs()))
def test_token_roles_match_a_loop_reference(name):
    torch.manual_seed(1)
    features = torch.randn(2, 3, 9, 6)
    features[:, 1] = features[:, 0] + 0.05 * torch.randn(2, 9, 6)  # temporal near-duplicates
    result = Compressor(_configs()[name]).compress(features, torch.rand(2, 3, 9))
    roles = token_maps.token_roles(result)
    reference = _roles_by_loop(result)
    for role in ("retained", "recycled", "absorbed", "rejected", "dropped"):
        expected = torch.tensor([[r[role] for r in row] for row in reference])
        assert torch.equal(getattr(roles, role), expected), role
    partition = roles.retained.int() + roles.recycled.int() + roles.absorbed.int()
    assert torch.equal(partition + roles.dropped.int(), torch.ones_like(partition))
    # green + purple boxes are exactly the tokens entering the LLM
    assert torch.equal((roles.retained | roles.recycled).sum(1), torch.full((2,), 2 * 3))


def test_token_map_draws_one_box_per_role_and_frame(tmp_path):
    torch.manual_seed(0)
    f, p = 4, 16
    features = torch.randn(1, f, p, 8)
    features[:, 2:] = features[:, :2] + 0.01  # frames 2, 3 repeat frames 0, 1
    attention = torch.rand(1, f, p)
    attention[:, 2:] = attention[:, :2] - 1e-3  # each copy is offered right after its original
    rows = {
        name: Compressor(c.replace(retention=0.2)).compress(features, attention)
        for name, c in _configs().items()
        if name in ("ours", "attn")
    }
    pixels = np.random.default_rng(0).integers(0, 255, (f, 64, 64, 3), dtype=np.uint8)
    fig = token_maps.plot_token_maps(pixels, rows, "test")
    axes = np.array(fig.axes[: len(rows) * f]).reshape(len(rows), f)
    for r, result in enumerate(rows.values()):
        roles = token_maps.token_roles(result)
        for t in range(f):
            drawn = [patch.get_gid() for patch in axes[r, t].patches]
            for role in ("retained", "recycled", "rejected", "absorbed", "dropped"):
                expected = int(getattr(roles, role)[0, t * p : (t + 1) * p].sum())
                assert drawn.count(role) == expected, (r, t, role)
    assert int(token_maps.token_roles(rows["ours"]).rejected.sum()) > 0
    image = _written(save_figure(fig, tmp_path, "maps"))
    green = np.array([0x1F, 0xBF, 0x3F]) / 255
    assert (np.abs(image[..., :3] - green).max(axis=-1) < 0.05).sum() > 20  # boxes are rendered


def test_draw_frame_rejects_a_non_square_grid():
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    with pytest.raises(ValueError, match="square grid, got P=6"):
        token_maps.draw_frame(
            ax,
            np.zeros((8, 8, 3), np.uint8),
            {
                "retained": np.ones(6, bool),
                **{k: np.zeros(6, bool) for k in ("recycled", "rejected", "absorbed", "dropped")},
            },
        )


def test_lab_tokens_are_what_the_attached_model_compresses(lab):
    model, samples, tokens = lab
    f, p = lab_grid(model)
    assert tokens.features.shape == (2, f, p, model.config.text_config.hidden_size)
    assert tokens.scores.shape == (2, f, p)
    assert tokens.pixels.shape == (2, *samples[0].frames.shape)
    config = default_config(retention=0.1, merger="none")
    last = run_attached(model, config, samples[1])
    ours = Compressor(config).compress(tokens.features[1:], tokens.scores[1:])
    assert torch.equal(ours.indices, last.compression.indices)
    assert torch.equal(ours.assignment, last.compression.assignment)
    assert torch.allclose(tokens.scores[1:], last.vision_scores)


def test_token_maps_command(tmp_path):
    paths = token_maps.main(
        [
            "--untrained",
            "--index",
            "1",
            "--retention",
            "0.1",
            "--methods",
            "ours,attn,sim",
            "--out",
            str(tmp_path),
        ]
    )
    image = _written(paths)
    assert image.shape[1] > image.shape[0]  # 8 frames side by side


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'bogus'; known: ours, attn"):
        parse_methods("ours,bogus", 0.02)
    with pytest.raises(ValueError, match="twice"):
        parse_methods("ours,ours", 0.02)
    assert method_config("ours", 0.05) == CompressionConfig(retention=0.05, merger="none")


# ----------------------------------------------------------------------------- Fig. 4


def test_attention_percentile_and_similarity_match_references():
    torch.manual_seed(2)
    scores = torch.rand(2, 12)
    scores[0, 3] = scores[0, 5]  # a tie: both count the same tokens below them
    indices = torch.tensor([[0, 3, 5, 11], [1, 2, 7, 8]])
    tokens = torch.randn(2, 4, 5)
    pct = attention_similarity.attention_percentile(scores, indices)
    sim = attention_similarity.max_similarity_to_others(tokens)
    for b in range(2):
        for m in range(4):
            s = scores[b, indices[b, m]].item()
            below = sum(1 for x in scores[b].tolist() if x < s)
            assert pct[b, m].item() == pytest.approx(below / 11)
            cos = [
                torch.nn.functional.cosine_similarity(tokens[b, m], tokens[b, k], dim=0).item()
                for k in range(4)
                if k != m
            ]
            assert sim[b, m].item() == pytest.approx(max(cos), abs=1e-6)
    assert pct[0, 1] == pct[0, 2]
    assert math.isnan(attention_similarity.max_similarity_to_others(torch.randn(1, 1, 3))[0, 0])


def test_attention_similarity_figure_counts_every_kept_token(lab, tmp_path):
    model, _, tokens = lab
    f, p = lab_grid(model)
    stats = {}
    for name in ("ours", "attn"):
        config = method_config(name, 0.1)
        result = Compressor(config).compress(tokens.features, tokens.scores)
        stats[name] = attention_similarity.kept_token_stats(tokens.scores, result)
        assert stats[name][0].shape == (2 * config.budget(f, p),)
    # attention-only keeps the top of Eq. (1): no selection can have a higher mean percentile
    assert stats["attn"][0].mean() >= stats["ours"][0].mean()
    fig = attention_similarity.plot_distributions(stats, "test")
    for ax in fig.axes[:2]:
        assert len(ax.patches) == 2  # one outline per method
    _written(save_figure(fig, tmp_path, "fig4"))


def test_attention_similarity_command(tmp_path, capsys):
    paths = attention_similarity.main(
        [
            "--untrained",
            "--limit",
            "2",
            "--retention",
            "0.1",
            "--methods",
            "ours,attn",
            "--out",
            str(tmp_path),
        ]
    )
    _written(paths)
    assert "Attention only" in capsys.readouterr().out


# ----------------------------------------------------------------------------- Fig. 6


def test_selection_probability_matches_a_loop():
    indices = torch.tensor([[0, 2, 5], [2, 3, 5], [1, 2, 4]])
    prob = token_indices.selection_probability(indices, 6)
    expected = [sum(i in row for row in indices.tolist()) / 3 for i in range(6)]
    assert prob.tolist() == pytest.approx(expected)
    edges, means = token_indices.binned(prob, 3)
    assert edges.tolist() == [0, 2, 4, 6]
    assert means.tolist() == pytest.approx([np.mean(expected[a : a + 2]) for a in (0, 2, 4)])
    with pytest.raises(ValueError, match=r"kept indices must lie in \[0, 4\)"):
        token_indices.selection_probability(indices, 4)


def test_kept_indices_come_from_the_attached_merger(lab, tmp_path):
    model, samples, _ = lab
    f, p = lab_grid(model)
    kept = math.ceil(0.5 * f * p)
    probs = {}
    for merger in ("text-aware", "last-token"):
        config = default_config(retention=1.0, merger=merger, keep_ratio=0.5)
        indices = token_indices.kept_indices(model, config, samples)
        assert indices.shape == (2, kept)
        assert all(len(set(row)) == kept for row in indices.tolist())
        probs[merger] = token_indices.selection_probability(indices, f * p)
        assert probs[merger].sum().item() == pytest.approx(kept)
    assert not torch.equal(probs["text-aware"], probs["last-token"])
    with pytest.raises(ValueError, match="did not run"):
        layers = model.config.text_config.num_hidden_layers
        token_indices.kept_indices(model, default_config(retention=1.0, layer=layers), samples[:1])
    fig = token_indices.plot_indices(probs, 0.5, frames=f, bins=2 * f)
    _written(save_figure(fig, tmp_path, "fig6"))


def test_token_indices_command(tmp_path):
    _written(token_indices.main(["--untrained", "--limit", "1", "--out", str(tmp_path)]))


# ----------------------------------------------------------------------------- Fig. 5 / S1


BENCH = [{"name": "lab", "split": "test", "limit": 60, "model": None}]


def _store(path, with_baseline=True):
    store = ResultStore(path)

    def add(config, avg):
        d = config.to_dict()
        store.append(
            {
                "key": run_key(d, BENCH),
                "config": d,
                "benchmarks": BENCH,
                "avg": avg,
                "scores": {"all": avg},
            }
        )

    if with_baseline:
        add(CompressionConfig(retention=1.0, merger="none"), 80.0)
    base = default_config(retention=0.02)
    for tau, avg in ((0.5, 60.0), (0.7, 70.0), (0.9, 64.0)):
        add(base.replace(tau=tau, merger="none"), avg)
    for layer in (0, 1, 3):
        for keep in (0.25, 0.5):
            add(base.replace(layer=layer, keep_ratio=keep), 50 + 5 * layer + 10 * keep)
    # varying K without a merger changes nothing: not a sweep
    add(base.replace(layer=1, merger="none"), 70.0)
    add(base.replace(layer=3, merger="none"), 70.0)
    return store.path


def test_find_series_groups_runs_that_differ_in_one_parameter(tmp_path):
    records = params.load_records(_store(tmp_path / "s.jsonl"))
    (tau,) = params.find_series(records, "tau")
    assert tau.x == (0.5, 0.7, 0.9)
    assert tau.y == pytest.approx((75.0, 87.5, 80.0)) and tau.metric == "pct"
    (avg,) = params.find_series(records, "tau", metric="avg")
    assert avg.y == (60.0, 70.0, 64.0)
    layers = params.find_series(records, "layer")
    assert [s.fixed["keep_ratio"] for s in layers] == [0.25, 0.5]
    assert all(s.fixed["merger"] == "text-aware" and s.x == (0.0, 1.0, 3.0) for s in layers)
    keep = params.find_series(records, "keep_ratio")
    assert sorted(s.fixed["layer"] for s in keep) == [0, 1, 3]
    assert params.series_labels(keep[:2]) == ["K = 0", "K = 1"]
    assert params.find_series(records, "lam") == []
    records_without = params.load_records(_store(tmp_path / "n.jsonl", with_baseline=False))
    assert params.find_series(records_without, "tau", metric="pct") == []
    assert params.find_series(records_without, "tau")[0].metric == "avg"


def test_params_figure_has_a_panel_per_parameter(tmp_path, capsys):
    path = _store(tmp_path / "s.jsonl")
    fig, drawn = params.plot_parameters(params.load_records(path))
    assert drawn == {"tau": 1, "cluster_ratio": 0, "lam": 0, "layer": 2, "keep_ratio": 3}
    lines = [
        line for ax in fig.axes for line in ax.lines if (line.get_gid() or "").startswith("series-")
    ]
    assert len(lines) == 6
    empty = [t for ax in fig.axes for t in ax.texts if t.get_gid() == "empty"]
    assert len(empty) == 2
    _written(params.main(["--store", str(path), "--out", str(tmp_path)]))
    assert "tau          1 sweep(s)" in capsys.readouterr().out


def test_params_command_fails_clearly_without_a_store(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        params.main(["--store", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no results store at" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit):
        params.main(["--store", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path)])
    assert "holds no complete run record" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Table 6


def test_efficiency_table_reproduces_table6_formatting(tmp_path):
    paper = efficiency.PAPER_TABLE6
    cells = efficiency.table_cells(paper, efficiency.columns(paper))
    assert [c[2] for c in cells] == [
        "701.2 (1×)",
        "42.1 (17×)",
        "43.1 (16×)",
        "40.5 (17×)",
        "31.3 (22×)",
    ]
    assert cells[0][1] == "-"
    data = {
        "model": "m",
        "rows": [
            {"method": "A", "prefill_ms": 10.0, "ttft_ms": 20.0},
            {"method": "B", "prefill_ms": 4.0, "reference": True},
        ],
    }
    assert efficiency.speedups(data["rows"]) == [0.4, 1.0]
    path = tmp_path / "perf.json"
    path.write_text(json.dumps(data))
    paths = efficiency.main([str(path), "--out", str(tmp_path)])
    _written(paths)
    md = (tmp_path / "efficiency.md").read_text()
    assert "| A | - | 10.0 (0.4×) | 20.0 | - |" in md and "| Ours | 74.0 | 31.3 (22×) |" in md
    assert (tmp_path / "efficiency.csv").read_text().splitlines()[1].startswith("A,,10.0,20.0")


def test_efficiency_reads_the_performance_benchmark_output(tmp_path):
    # the shape `python benchmarks/efficiency.py --output` writes (extra fields and keys)
    data = {
        "machine": "cpu",
        "size": "small",
        "frames": 8,
        "paper": {"vanilla": {"prefill_ms": 701.2}},
        "rows": [
            {
                "method": "vanilla",
                "vision_ms": 600.0,
                "process_ms": 0.0,
                "prefill_ms": 1385.0,
                "ttft_ms": 2040.0,
                "throughput": 9.1,
                "peak_gib": None,
                "tokens_in": None,
                "tokens_after_merge": None,
                "prefill_speedup": 1.0,
            },
            {
                "method": "ours 2%/1%",
                "vision_ms": 700.0,
                "process_ms": 666.6,
                "prefill_ms": 522.0,
                "ttft_ms": 1716.0,
                "throughput": 20.8,
                "peak_gib": None,
                "tokens_in": 32,
                "tokens_after_merge": 16,
                "prefill_speedup": 2.65,
            },
        ],
    }
    rows = efficiency.validate(data)
    assert efficiency.columns(rows) == [
        "vision_ms",
        "process_ms",
        "prefill_ms",
        "ttft_ms",
        "throughput",
        "tokens_in",
    ]
    cells = efficiency.table_cells(rows, efficiency.columns(rows))
    assert cells[1] == [
        "ours 2%/1%",
        "700.0",
        "666.6",
        "522.0 (2.7×)",
        "1716.0",
        "20.8",
        "32 -> 16",
    ]
    assert cells[0][-1] == "-"
    path = tmp_path / "perf.json"
    path.write_text(json.dumps(data))
    _written(efficiency.main([str(path), "--out", str(tmp_path)]))
    assert "(small, cpu, 8 frames)" in (tmp_path / "efficiency.md").read_text()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rows": []}, "non-empty list 'rows'"),
        ({"rows": [{"prefill_ms": 1.0}]}, r"rows\[0\] needs a 'method'"),
        ({"rows": [{"method": "A", "ttft_ms": "fast"}]}, r"rows\[0\].ttft_ms must be a number"),
        ({"rows": [{"method": "A", "score": -1}]}, "must be a number >= 0"),
    ],
)
def test_efficiency_rejects_bad_input(data, message):
    with pytest.raises(ValueError, match=message):
        efficiency.validate(data)


def test_efficiency_command_fails_clearly_without_its_input(tmp_path, capsys):
    with pytest.raises(SystemExit):
        efficiency.main([str(tmp_path / "perf.json"), "--out", str(tmp_path)])
    assert "no performance results at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        efficiency.main(["--out", str(tmp_path)])
    assert "either a performance JSON file or --measure-lab" in capsys.readouterr().err


def test_efficiency_measures_the_lab_model(lab):
    model, samples, _ = lab
    configs = efficiency.lab_configs("ours", 0.1)
    rows = efficiency.measure_lab(model, configs, samples[:1], new_tokens=2, repeats=1)
    assert [r["method"] for r in rows] == ["Vanilla", "Ours"]
    assert rows[0]["process_ms"] is None and rows[0]["reference"]
    assert rows[1]["process_ms"] > 0
    f, p = lab_grid(model)
    budget = configs["Ours"].budget(f, p)
    assert (rows[1]["tokens_in"], rows[1]["tokens_after_merge"]) == (budget, math.ceil(budget / 2))
    for row in rows:
        assert row["prefill_ms"] > 0 and row["ttft_ms"] >= row["prefill_ms"]
        assert row["throughput"] > 0 and row["score"] in (0.0, 100.0)
    efficiency.validate({"rows": rows})


# ----------------------------------------------------------------------------- architecture


def test_architecture_picture(tmp_path):
    paths = architecture_main(["--out", str(tmp_path)])
    _written(paths)
    assert (tmp_path / "architecture.svg").read_text().lstrip().startswith("<?xml")
