"""Baselines (ustc/baselines/): the defining behaviour of each on small hand-made inputs, slow
references for each rule, the exact-budget invariant, and end-to-end runs on both adapters."""

import itertools
import math

import pytest
import torch
from models_helpers import (
    llava_video_inputs,
    qwen_video_inputs,
    reference_logits,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
)

from ustc import MERGERS, METHODS, SCORERS, CompressionConfig, Compressor
from ustc.baselines import dyseg, evenly_spaced, quadtree, segment_frames
from ustc.baselines._common import proportional_quota
from ustc.baselines.holitom import window_gains
from ustc.baselines.sttm import (
    ancestor_max,
    group_means_at,
    is_token,
    node_scores,
    spatial_owner,
    temporal_edges,
)
from ustc.compressor import REJECTED, RETAINED, UNVISITED
from ustc.models import attach

torch.set_num_threads(1)

#: every baseline as the config that selects it (merger none: the external stage alone)
BASELINES = {
    "random": dict(scorer="random", recycler="none"),
    "uniform": dict(method="uniform"),
    "visionzip": dict(method="visionzip"),
    "holitom": dict(method="holitom"),
    "fastvid": dict(method="fastvid"),
    "flashvid": dict(method="flashvid"),
    "sttm": dict(method="sttm"),
}


def config_of(name, retention, **changes):
    return CompressionConfig(retention=retention, merger="none", **BASELINES[name], **changes)


def video(b=2, f=4, p=16, d=12, seed=0, static=0):
    """Random tokens; the first ``static`` positions of every frame nearly repeat frame 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, f, p, d, generator=g, dtype=torch.float64)
    if static:
        x[:, :, :static] = x[:, :1, :static] + 0.01 * torch.randn(b, f, static, d, generator=g)
    return x, torch.rand(b, f, p, generator=g, dtype=torch.float64)


def slow_group_means(x, assignment, m):
    out = torch.zeros(m, x.shape[-1], dtype=x.dtype)
    for s in range(m):
        out[s] = x[assignment == s].mean(dim=0)
    return out


# --------------------------------------------------------------------------- registry, invariants
def test_registered_with_published_defaults():
    assert {"uniform", "visionzip", "holitom", "fastvid", "flashvid", "sttm"} <= set(
        METHODS.names()
    )
    assert "random" in SCORERS.names() and "fastv" in MERGERS.names()
    defaults = {n: {p.name: p.default for p in METHODS.params(n)} for n in METHODS.names()}
    assert defaults["visionzip"] == {"contextual_ratio": 10 / 64}
    assert defaults["holitom"] == {"temporal_tau": 0.8, "max_window": 1024, "density_k": 7}
    assert defaults["fastvid"] == {
        "segments": 8,
        "segment_tau": 0.9,
        "salient_ratio": 0.4,
        "anchor_stride": 4,
        "anchor_alpha": 0.6,
        "density_k": 4,
    }
    assert defaults["flashvid"] == {
        "segments": 8,
        "segment_tau": 0.9,
        "selection_ratio": 0.7,
        "temporal_tau": 0.8,
        "density_k": 7,
    }
    assert defaults["sttm"] == {"spatial_tau": 0.8}
    assert [(p.name, p.default) for p in SCORERS.params("random")] == [("seed", 0)]
    assert Compressor(config_of("visionzip", 0.1)).needs_attention
    assert not Compressor(config_of("sttm", 0.1)).needs_attention
    assert not Compressor(config_of("uniform", 0.1)).needs_attention


@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize(
    ("f", "p", "retention"),
    [(4, 16, 0.25), (3, 25, 0.04), (5, 9, 0.5), (2, 49, 0.1), (6, 16, 0.9)],
)
def test_exact_budget_and_consistent_result(name, f, p, retention):
    config = config_of(name, retention)
    x, a = video(f=f, p=p, seed=f * p, static=p // 3)
    out = Compressor(config).compress(x, a)
    m = config.budget(f, p)
    n = f * p
    assert out.tokens.shape == (2, m, 12) and out.tokens.dtype == x.dtype
    assert out.indices.shape == (2, m) and (out.indices.diff(dim=1) > 0).all()
    assert out.assignment.shape == (2, n) and out.status.shape == (2, n)
    assert ((out.assignment >= -1) & (out.assignment < m)).all()
    for b in range(2):
        own = out.assignment[b, out.indices[b]]
        assert own.tolist() == list(range(m))  # every output token owns its own position
        status = out.status[b]
        kept = torch.zeros(n, dtype=torch.bool)
        kept[out.indices[b]] = True
        assert (status[kept] == RETAINED).all()
        assert (status[~kept & (out.assignment[b] >= 0)] == REJECTED).all()
        assert (status[out.assignment[b] < 0] == UNVISITED).all()
        sizes = torch.bincount(out.assignment[b][out.assignment[b] >= 0], minlength=m)
        assert torch.equal(out.merged[b], sizes > 1)
        # FastVID weights its anchors (tested below), FlashVID its trees (tests/test_flashvid.py)
        if name not in ("fastvid", "flashvid"):
            flat = x[b].reshape(n, -1)
            torch.testing.assert_close(out.tokens[b], slow_group_means(flat, out.assignment[b], m))


def test_proportional_quota():
    assert proportional_quota([1, 3, 3, 3, 3], 12) == [1, 3, 3, 3, 2]
    assert proportional_quota([10, 0, 10], 5) == [3, 0, 2]
    assert proportional_quota([1, 100], 50) == [0, 50]
    assert proportional_quota([2, 2], 9) == [2, 2]  # never above a group's size
    for sizes in itertools.product(range(4), repeat=3):
        for total in range(sum(sizes) + 1):
            quota = proportional_quota(list(sizes), total)
            assert sum(quota) == total and all(
                0 <= q <= s for q, s in zip(quota, sizes, strict=True)
            )
            exact = [total * s / sum(sizes) for s in sizes] if sum(sizes) else [0] * 3
            assert all(abs(q - e) < 1 + 1e-9 for q, e in zip(quota, exact, strict=True))


def test_per_frame_methods_refuse_a_budget_that_is_not_per_frame():
    x, a = video(f=3, p=9)
    for name in ("uniform", "visionzip", "fastvid", "flashvid"):
        with pytest.raises(ValueError, match="multiple of F = 3"):
            METHODS.build(name).compress(x, a, 7)
    with pytest.raises(ValueError, match=r"needs per-token vision attention"):
        METHODS.build("visionzip").compress(x, None, 9)
    with pytest.raises(ValueError, match=r"budget must be an integer in \[1, F\*P = 27\]"):
        METHODS.build("sttm").compress(x, None, 0)
    with pytest.raises(ValueError, match="density_k must be an integer >= 1"):
        Compressor(CompressionConfig(method="holitom", params={"density_k": 0}))
    with pytest.raises(ValueError, match="contextual_ratio must be in"):
        Compressor(CompressionConfig(method="visionzip", params={"contextual_ratio": 1.5}))
    with pytest.raises(ValueError, match="seed must be an integer"):
        Compressor(CompressionConfig(scorer="random", params={"seed": -1}))


# --------------------------------------------------------------------------- random and uniform
def test_random_is_seeded_reproducible_and_uniform_selection():
    x, a = video(f=4, p=25, seed=3)
    config = config_of("random", 0.2, params={"seed": 11})
    first = Compressor(config).compress(x, a)
    again = Compressor(config).compress(x * 2, None)  # content and attention play no part
    assert torch.equal(first.indices, again.indices)
    other = Compressor(config.replace(params={"seed": 12})).compress(x, a)
    assert not torch.equal(first.indices, other.indices)
    # slow reference: the same generator, the budget highest draws
    draws = torch.rand(2, 100, generator=torch.Generator().manual_seed(11))
    for b in range(2):
        expected = sorted(sorted(range(100), key=lambda i: -float(draws[b, i]))[:20])
        assert first.indices[b].tolist() == expected
    assert not first.merged.any() and (first.assignment[~first.status.eq(RETAINED)] == -1).all()


def test_uniform_picks_evenly_spaced_positions_in_every_frame():
    assert evenly_spaced(10, 2).tolist() == [2, 7]
    assert evenly_spaced(16, 4).tolist() == [2, 6, 10, 14]
    assert evenly_spaced(5, 5).tolist() == [0, 1, 2, 3, 4]
    for p in range(1, 30):
        for q in range(1, p + 1):
            cols = evenly_spaced(p, q).tolist()
            # the j-th pick is the token under the centre (j + 1/2) P / q of the j-th of q runs
            assert all(c <= (j + 0.5) * p / q < c + 1 for j, c in enumerate(cols))
            gaps = {b - a for a, b in zip(cols[:-1], cols[1:], strict=True)}
            assert gaps <= {p // q, -(-p // q)}  # evenly spaced: gaps differ by at most one
    x, a = video(f=3, p=16)
    out = Compressor(config_of("uniform", 0.25)).compress(x, a)
    assert out.indices[0].tolist() == [t * 16 + c for t in range(3) for c in (2, 6, 10, 14)]
    assert torch.equal(out.tokens[0], x[0].reshape(48, -1)[out.indices[0]])


# --------------------------------------------------------------------------- FastV
def test_fastv_keeps_top_last_token_attention_and_drops_the_rest():
    visual = torch.randn(2, 6, 4)
    text = torch.randn(2, 3, 4)
    attn = torch.rand(2, 3, 6)
    attn[:, -1] = torch.tensor([[0.1, 0.5, 0.2, 0.5, 0.0, 0.3], [0.9, 0.1, 0.1, 0.1, 0.8, 0.2]])
    attn[:, 0] = torch.tensor([9.0, 0, 0, 0, 0, 0])  # earlier text rows play no part
    config = CompressionConfig(retention=1.0, merger="fastv", layer=2, keep_ratio=0.5)
    compressor = Compressor(config)
    assert compressor.merger_needs_attention
    out = compressor.merge(visual, text, attn)
    assert out.indices.tolist() == [[1, 3, 5], [0, 4, 5]]  # ties at 0.5 and 0.1: lower index
    assert out.assignment.tolist() == [[-1, 0, -1, 1, -1, 2], [0, -1, -1, -1, 1, 2]]
    assert torch.equal(out.tokens, torch.stack([visual[0, [1, 3, 5]], visual[1, [0, 4, 5]]]))
    with pytest.raises(ValueError, match="'fastv' needs the text-to-visual attention"):
        compressor.merge(visual, text, None)


# --------------------------------------------------------------------------- VisionZip
def reference_visionzip(frame, attention, dominant, contextual):
    """VisionZip on one frame, token by token (ties: lower index)."""
    p = frame.shape[0]
    order = sorted(range(p), key=lambda i: (-float(attention[i]), i))
    dom = sorted(order[:dominant])
    rest = [i for i in range(p) if i not in dom]
    owner = {i: i for i in dom}
    if contextual:
        step = max(1, len(rest) // contextual)
        targets = rest[::step][:contextual]
        for i in rest:
            sims = [float(torch.cosine_similarity(frame[i], frame[t], dim=0)) for t in targets]
            owner[i] = targets[max(range(len(targets)), key=lambda j: (sims[j], -j))]
    return owner


@pytest.mark.parametrize(("p", "q", "ratio"), [(16, 4, 10 / 64), (25, 8, 0.5), (9, 3, 0.0)])
def test_visionzip_matches_reference(p, q, ratio):
    f = 3
    x, a = video(b=1, f=f, p=p, seed=p + q)
    method = METHODS.build("visionzip", contextual_ratio=ratio)
    out = method.compress(x, a, f * q)
    dominant, contextual = method.split(q)
    assert dominant + contextual == q and contextual == math.floor(ratio * q + 0.5)
    for t in range(f):
        owner = reference_visionzip(x[0, t], a[0, t], dominant, contextual)
        for i in range(p):
            slot = int(out.assignment[0, t * p + i])
            got = int(out.indices[0, slot]) - t * p if slot >= 0 else None
            assert got == owner.get(i), (t, i)


def test_visionzip_dominant_tokens_are_the_most_attended():
    x, a = video(b=1, f=1, p=16, seed=5)
    a[0, 0] = torch.arange(16.0).flip(0)  # token 0 most attended
    out = METHODS.build("visionzip", contextual_ratio=0.25).compress(x, a, 8)  # 6 + 2
    kept = out.indices[0].tolist()
    assert set(range(6)) <= set(kept)
    assert torch.equal(out.tokens[0, :6], x[0, 0, :6])  # dominant tokens unchanged


# --------------------------------------------------------------------------- HoliTom
def brute_force_segments(static, max_window):
    """The best value of sum g(a, e) over every partition of the frames, by enumeration."""
    f = static.shape[0] + 1
    gains = {}
    for a in range(f):
        for e in range(a, f):
            count = int(static[a:e].all(dim=0).sum()) if e > a else 0
            gains[a, e] = count * (e - a)
    best = 0
    for cuts in itertools.product([False, True], repeat=f - 1):
        bounds = [-1] + [i for i, c in enumerate(cuts) if c] + [f - 1]
        segs = [(bounds[i] + 1, bounds[i + 1]) for i in range(len(bounds) - 1)]
        if all(e - a + 1 <= max_window for a, e in segs):
            best = max(best, sum(gains[s] for s in segs))
    return best, gains


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_window", [2, 3, 1024])
def test_holitom_segmentation_is_optimal(seed, max_window):
    static = torch.rand(6, 5, generator=torch.Generator().manual_seed(seed)) < 0.7
    best, gains = brute_force_segments(static, max_window)
    assert window_gains(static) == [[gains.get((a, e), 0) for e in range(7)] for a in range(7)]
    segs = segment_frames(static, max_window)
    assert segs[0][0] == 0 and segs[-1][1] == 6
    assert all(s[1] + 1 == t[0] for s, t in zip(segs[:-1], segs[1:], strict=True))
    assert all(e - a + 1 <= max_window for a, e in segs)
    assert sum(gains[s] for s in segs) == best


def test_holitom_merges_a_static_token_across_its_segment():
    f, p = 4, 4
    x, a = video(b=1, f=f, p=p, d=32, seed=9)
    x[0, :, 0] = x[0, 0, 0]  # position 0 never changes; the others are unrelated noise
    method = METHODS.build("holitom")
    segments, _ = method.segments(x[0])
    assert segments == [(0, 3)]
    out = method.compress(x, a, 12)  # 13 candidates after the temporal merge
    slot = int(out.assignment[0, 0])
    assert int(out.indices[0, slot]) == 0
    assert out.assignment[0, [0, 4, 8, 12]].tolist() == [slot] * 4
    assert out.merged[0, slot] and torch.equal(out.tokens[0, slot], x[0, 0, 0])


def test_holitom_without_static_tokens_is_per_frame_attention_pruning():
    x, a = video(b=1, f=4, p=16, d=32, seed=8)  # unrelated frames: no static token, 4 segments
    out = METHODS.build("holitom").compress(x, a, 12)
    expected = [t * 16 + int(i) for t in range(4) for i in a[0, t].topk(3).indices]
    assert out.indices[0].tolist() == sorted(expected)
    assert not out.merged.any() and int((out.assignment[0] >= 0).sum()) == 12


def test_holitom_skips_the_temporal_merge_when_it_leaves_too_few_tokens():
    x, a = video(b=1, f=4, p=9)
    x[:] = x[:, :1]  # a still video: the temporal merge alone leaves 9 tokens
    out = METHODS.build("holitom").compress(x, a, 18)
    assert out.tokens.shape[1] == 18


# --------------------------------------------------------------------------- FastVID
def reference_dyseg(g, c, tau):
    f = g.shape[0]
    sims = [float(torch.cosine_similarity(g[t], g[t + 1], dim=0)) for t in range(f - 1)]
    lowest = sorted(range(f - 1), key=lambda t: (sims[t], t))[: c - 1]
    cuts = sorted(set(lowest) | {t for t in range(f - 1) if sims[t] < tau})
    bounds = [-1, *cuts, f - 1]
    return [(bounds[i] + 1, bounds[i + 1]) for i in range(len(bounds) - 1)]


def test_fastvid_dyseg():
    g = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.2], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    assert dyseg(g, segments=2, tau=0.0) == [(0, 2), (3, 5)]  # the scene change
    assert dyseg(g, segments=1, tau=0.0) == [(0, 5)]
    assert dyseg(g, segments=1, tau=1.1) == [(t, t) for t in range(6)]
    for seed in range(5):
        h = torch.randn(7, 3, generator=torch.Generator().manual_seed(seed))
        for c, tau in [(1, 0.0), (3, 0.0), (3, 0.5), (8, -1.0)]:
            assert dyseg(h, c, tau) == reference_dyseg(h, c, tau)


def test_fastvid_salient_tokens_anchors_and_weighting():
    f, p, q = 8, 16, 5  # 2 salient + 3 contextual per frame
    x, a = video(b=1, f=f, p=p, d=8, seed=4)
    method = METHODS.build("fastvid", segments=1, segment_tau=-1.0, anchor_stride=4)
    assert method.split(q) == (2, 3)
    out = method.compress(x, a, f * q)
    kept = set(out.indices[0].tolist())
    salient = {t * p + int(i) for t in range(f) for i in a[0, t].topk(2).indices}
    assert salient <= kept
    anchors = kept - salient
    assert {i // p for i in anchors} <= {0, 4}  # anchor frames of the one segment: 0 and 4
    assert len(anchors) == f * 3
    assert (out.assignment[0] >= 0).all()  # DTM merges, it never drops
    flat = x[0].reshape(f * p, -1)
    for slot, pos in enumerate(out.indices[0].tolist()):
        members = flat[out.assignment[0] == slot]
        if pos in salient:
            assert len(members) == 1 and torch.equal(out.tokens[0, slot], flat[pos])
        else:
            n = len(members)
            alpha = max(1 / (n + 1), 0.6) if n > 1 else 1.0
            expected = alpha * flat[pos] + (1 - alpha) * members.mean(dim=0)
            torch.testing.assert_close(out.tokens[0, slot], expected)
            # every member chose this anchor as its most similar one
            anchor_rows = flat[sorted(anchors)]
            unit = torch.nn.functional.normalize(anchor_rows, dim=-1)
            best = (torch.nn.functional.normalize(members, dim=-1) @ unit.T).argmax(dim=1)
            assert {sorted(anchors)[int(j)] for j in best} == {pos}


# --------------------------------------------------------------------------- STTM
def quadrant_members(side):
    """Members of every quadtree node, in the order quadtree() numbers them (breadth first)."""
    nodes, frontier = [], [(0, side, 0, side)]
    while frontier:
        nxt = []
        for r0, r1, c0, c1 in frontier:
            nodes.append([r * side + c for r in range(r0, r1) for c in range(c0, c1)])
            if r1 - r0 > 1 or c1 - c0 > 1:
                rows = [(r0, r1)] if r1 - r0 == 1 else [(r0, r0 + (r1 - r0 + 1) // 2)]
                rows += [] if r1 - r0 == 1 else [(r0 + (r1 - r0 + 1) // 2, r1)]
                cols = [(c0, c1)] if c1 - c0 == 1 else [(c0, c0 + (c1 - c0 + 1) // 2)]
                cols += [] if c1 - c0 == 1 else [(c0 + (c1 - c0 + 1) // 2, c1)]
                nxt += [(*r, *c) for r in rows for c in cols]
        frontier = nxt
    return nodes


@pytest.mark.parametrize("side", [2, 4, 5, 7])
def test_sttm_node_scores_match_reference(side):
    tree = quadtree(side)
    members = quadrant_members(side)
    assert len(members) == tree.parent.shape[0]
    assert tree.rep.tolist() == [min(m) for m in members]
    frames = torch.randn(2, side * side, 6, generator=torch.Generator().manual_seed(side))
    scores = node_scores(frames, tree)
    for t in range(2):
        for n, mem in enumerate(members):
            mean = frames[t, mem].mean(dim=0)
            ref = min(float(torch.cosine_similarity(frames[t, i], mean, dim=0)) for i in mem)
            assert math.isclose(float(scores[t, n]), ref, abs_tol=1e-5)


def test_sttm_temporal_edges_match_reference():
    f, p = 3, 16
    x, _ = video(b=1, f=f, p=p, d=6, seed=6, static=8)
    tree = quadtree(4)
    scores = node_scores(x[0], tree)
    owner = spatial_owner(is_token(scores, ancestor_max(scores, tree), tree.leaf, 0.3), tree)
    means = group_means_at(x[0], owner)
    sim, target = temporal_edges(means, owner)
    for t in range(1, f):
        for u in owner[t].unique().tolist():
            members = [q for q in range(p) if int(owner[t, q]) == u]
            sims = [
                float(torch.cosine_similarity(means[t, u], means[t - 1, q], dim=0)) for q in members
            ]
            best = max(sims)
            first = members[sims.index(best)]
            assert math.isclose(float(sim[t, u]), best, abs_tol=1e-5)
            assert int(target[t, u]) == int(owner[t - 1, first])
    assert torch.isinf(sim[0]).all()


def test_sttm_merges_a_uniform_quadrant_into_one_token():
    frame = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    frame[0, [0, 1, 4, 5]] = frame[0, 0].clone()  # the top-left 2 x 2 quadrant is one colour
    tree = quadtree(4)
    scores = node_scores(frame, tree)
    above = torch.full_like(scores, float("-inf"))
    for n in range(1, scores.shape[1]):
        chain, up = [], int(tree.parent[n])
        while up >= 0:
            chain.append(float(scores[0, up]))
            up = int(tree.parent[up])
        above[0, n] = max(chain)
    owner = spatial_owner(is_token(scores, above, tree.leaf, 0.8), tree)
    assert owner[0].tolist() == [0, 0, 2, 3, 0, 0, 6, 7] + list(range(8, 16))
    out = METHODS.build("sttm").compress(frame.view(1, 1, 16, 64), None, 13)
    assert out.indices[0].tolist() == [0, 2, 3] + list(range(6, 16))
    assert out.sizes[0, 0] == 4 and torch.equal(out.tokens[0, 0], frame[0, 0])


def test_sttm_merges_a_repeated_frame_into_the_earlier_one():
    x = torch.randn(1, 1, 16, 64, generator=torch.Generator().manual_seed(1))
    x = torch.cat([x, x + 1e-3 * torch.randn(1, 1, 16, 64)], dim=1)  # frame 1 repeats frame 0
    out = METHODS.build("sttm").compress(x, None, 16)
    assert out.indices[0].tolist() == list(range(16))  # everything sits in the earlier frame
    assert out.assignment[0, 16:].tolist() == list(range(16))  # directed: later into earlier


def test_sttm_lowers_tau_when_frame_zero_alone_exceeds_the_budget():
    x, _ = video(b=1, f=3, p=16, d=64, seed=2)  # unrelated tokens: nothing merges at 0.8
    out = METHODS.build("sttm").compress(x, None, 3)
    assert out.tokens.shape[1] == 3 and (out.assignment >= 0).all()


def test_sttm_needs_a_square_grid():
    with pytest.raises(ValueError, match="square grid .* got P = 12"):
        METHODS.build("sttm").compress(torch.randn(1, 2, 12, 4), None, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(BASELINES))
def test_cuda_matches_cpu(name):
    config = config_of(name, 0.1)
    x, a = video(f=8, p=49, d=32, static=20)
    x, a = x.float(), a.float()
    cpu = Compressor(config).compress(x, a)
    gpu = Compressor(config).compress(x.cuda(), a.cuda())
    assert torch.equal(gpu.indices.cpu(), cpu.indices)
    assert torch.equal(gpu.assignment.cpu(), cpu.assignment)
    torch.testing.assert_close(gpu.tokens.cpu(), cpu.tokens)


# --------------------------------------------------------------------------- on the adapters
ADAPTER_CONFIGS = {
    **{name: config_of(name, 0.25) for name in BASELINES},
    "holitom+last-token": CompressionConfig(
        retention=0.25, method="holitom", merger="last-token", layer=1, keep_ratio=0.5
    ),
    "fastv": CompressionConfig(retention=1.0, merger="fastv", layer=1, keep_ratio=0.25),
}


@pytest.fixture(scope="module")
def models():
    llava = tiny_llava_onevision(layers=2)
    qwen = tiny_qwen2_5_vl(layers=2)
    return {
        "llava_onevision": (llava, llava_video_inputs(llava, frames=4)),
        "qwen2_5_vl": (qwen, qwen_video_inputs(qwen, frames=4)),
    }


@pytest.mark.parametrize("adapter", ["llava_onevision", "qwen2_5_vl"])
@pytest.mark.parametrize("name", list(ADAPTER_CONFIGS))
def test_runs_end_to_end_on_every_adapter(models, adapter, name):
    model, inputs = models[adapter]
    config = ADAPTER_CONFIGS[name]
    f, p = inputs.frames, inputs.tokens_per_frame
    with attach(model, config) as handle, torch.no_grad():
        out = model.generate(
            **inputs.kwargs, max_new_tokens=3, return_dict_in_generate=True, output_logits=True
        )
        assert handle.stats.visual_tokens == f * p
        assert handle.stats.tokens_in == config.budget(f, p)
        assert handle.stats.tokens_after_merge == config.kept_after_merge(config.budget(f, p))
        last = handle.last
    # every decode step equals a recompute without cache and without hooks
    expected = reference_logits(model, inputs, out.sequences, last, config)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("frames", [1, 2])
def test_sttm_hits_every_budget(frames):
    """Budgets that no spatial threshold reaches exactly (a quadrant collapses several tokens at
    once) are met by the frame-0 fallback edges."""
    x, _ = video(b=1, f=frames, p=16, d=8, seed=frames, static=6)
    method = METHODS.build("sttm")
    for budget in range(1, frames * 16 + 1):
        out = method.compress(x, None, budget)
        assert out.tokens.shape[1] == budget and (out.assignment >= 0).all()


# --------------------------------------------------------------------------- the comparison table
def test_compare_table_layout_flops_and_measured_tokens(capsys):
    from ablations import compare

    argv = ["--random-init", "--limit", "2", "--retentions", "0.02", "--quiet", "--threads", "1"]
    rows = compare.main([*argv, "--methods", "fastv,holitom,ours-wo-m"])
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("| Method | FLOPs (T) | FLOPs Ratio | Retention Ratio")
    by_label = {r.label: r for r in rows}
    # Table 1 of the paper prints these FLOPs for the same token schedules (LLaVA-OV-7B)
    printed = {"Vanilla": (41.4, 100.0), "FastV": (5.5, 13.3), "HoliTom": (1.1, 2.6)}
    printed["Ours (w/o M)"] = (1.2, 2.9)
    for label, (tera, ratio) in printed.items():
        row = by_label[label]
        assert (round(row.tflops, 1), round(100 * row.flops_ratio, 1)) == (tera, ratio), label
    assert [by_label[k].retention for k in ("FastV", "HoliTom")] == ["100%/2%", "2%/1%"]
    n = by_label["Vanilla"].tokens["llm_visual"]
    frames = 8  # the lab's frames; the per-frame budget is at least one token
    budget = CompressionConfig(retention=0.02).budget(frames, int(n) // frames)
    assert by_label["FastV"].tokens["llm_visual"] == n  # FastV: everything enters the LLM
    assert by_label["FastV"].tokens["after_merge"] == math.ceil(0.02 * n)
    assert by_label["HoliTom"].tokens["llm_visual"] == budget
    assert by_label["Ours (w/o M)"].tokens["llm_visual"] == budget
    with pytest.raises(SystemExit):
        compare.main([*argv, "--methods", "fastv,nonsense"])
