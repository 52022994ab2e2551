"""FlashVID-style baseline (ustc/baselines/flashvid.py): ADTS, the temporal trees and the whole
method against slow loop references on small inputs, the exact budget, determinism and errors.
The shared invariants and the end-to-end runs on both adapters are in tests/test_baselines.py."""

import math

import pytest
import torch

from ustc import METHODS, CompressionConfig, Compressor
from ustc.baselines import FlashVID, adts, dyseg, frame_slots, temporal_links, tree_roots
from ustc.baselines._common import proportional_quota
from ustc.recycle import dpc_knn

torch.set_num_threads(1)


def video(b=1, f=4, p=16, d=8, seed=0, static=0):
    """Random tokens (float64); the first ``static`` positions of every frame nearly repeat
    frame 0.  Returns (features (B, F, P, D), attention (B, F, P))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, f, p, d, generator=g, dtype=torch.float64)
    if static:
        x[:, :, :static] = x[:, :1, :static] + 0.05 * torch.randn(b, f, static, d, generator=g)
    return x, torch.rand(b, f, p, generator=g, dtype=torch.float64)


def unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


# --------------------------------------------------------------------------- slow references
def reference_adts(u, a, count):
    """ADTS of one frame, loops: u (P, D) unit vectors, a (P,).  Returns the chosen set."""
    p = u.shape[0]

    def dist(i, j):
        return (1.0 - float(u[i] @ u[j])) * float(a[j])

    chosen = []
    if count == 0:
        return set()
    first = [min((dist(i, j) for i in range(p) if i != j), default=math.inf) for j in range(p)]
    chosen.append(max(range(p), key=lambda j: (first[j], -j)))
    while len(chosen) < count:
        score = {j: min(dist(i, j) for i in chosen) for j in range(p) if j not in chosen}
        chosen.append(max(score, key=lambda j: (score[j], -j)))
    return set(chosen)


def reference_roots(u, free, tau, max_links):
    """Tree roots of one segment, loops: u (L, P, D) unit vectors, free (L, P) bool."""
    length, p, _ = u.shape
    links = []  # (similarity, position, parent column)
    for t in range(1, length):
        for n in range(p):
            if not free[t, n] or not free[t - 1].any():
                continue
            sims = [(float(u[t, n] @ u[t - 1, m]), -m) for m in range(p) if free[t - 1, m]]
            best, neg_m = max(sims)
            if best > tau:
                links.append((best, t * p + n, -neg_m))
    links.sort(key=lambda link: (-link[0], link[1]))
    parent = {pos: m for _, pos, m in links[:max_links]}
    roots = list(range(length * p))
    for pos in range(length * p):  # positions in frame order: a parent's root is known
        if pos in parent:
            t = pos // p
            roots[pos] = roots[(t - 1) * p + parent[pos]]
    return roots


def reference_slots(counts, slots):
    """One slot per frame with a root while slots last (frame order), the rest proportionally."""
    quota = [0] * len(counts)
    if sum(1 for c in counts if c) > slots:
        return proportional_quota(counts, slots)
    for t, c in enumerate(counts):
        quota[t] = 1 if c else 0
    rest = proportional_quota(
        [c - q for c, q in zip(counts, quota, strict=True)], slots - sum(quota)
    )
    return [q + r for q, r in zip(quota, rest, strict=True)]


def reference_flashvid(x, a, budget, method):
    """The whole method on one video (F, P, D), loops over frames, segments and tokens; DPC-KNN
    is ustc.recycle.dpc_knn called frame by frame.  Returns {kept position: expected token}."""
    f, p, d = x.shape
    q = budget // f
    q_a, q_s = method.split(q)
    u = unit(x.float())
    out = {}
    free = torch.ones(f, p, dtype=torch.bool)
    for t in range(f):
        for j in reference_adts(u[t].double(), a[t], q_a):
            out[t * p + j] = x[t, j]
            free[t, j] = False
    if q_s == 0:
        return out
    for s, e in dyseg(x.float().mean(dim=1), method.segments, method.segment_tau):
        length = e - s + 1
        roots = reference_roots(
            u[s : e + 1], free[s : e + 1], method.temporal_tau, length * (p - q)
        )
        flat = x[s : e + 1].reshape(-1, d)
        members = {}
        for pos in range(length * p):
            if free[s + pos // p, pos % p]:
                members.setdefault(roots[pos], []).append(pos)
        tree_mean = {r: flat[m].mean(dim=0) for r, m in members.items()}
        counts = [sum(1 for r in members if r // p == t) for t in range(length)]
        for t, quota in enumerate(reference_slots(counts, length * q_s)):
            if quota == 0:
                continue
            frame_roots = [r for r in sorted(members) if r // p == t]
            feats = torch.zeros(1, p, d)
            mask = torch.zeros(1, p, dtype=torch.bool)
            for r in frame_roots:
                feats[0, r % p] = tree_mean[r].float()
                mask[0, r % p] = True
            n = torch.tensor([quota])
            owner = dpc_knn(feats, mask, n, method.density_k, convention="tcformer").owner[0]
            for c in set(owner[mask[0]].tolist()):
                joined = [tree_mean[r] for r in frame_roots if int(owner[r % p]) == c]
                out[(s + t) * p + c] = torch.stack(joined).mean(dim=0)
    return out


# --------------------------------------------------------------------------- the parts
@pytest.mark.parametrize(("p", "count"), [(9, 1), (9, 4), (16, 7), (25, 25), (1, 1)])
def test_adts_matches_reference(p, count):
    x, a = video(b=1, f=3, p=p, d=6, seed=p + count)
    u = unit(x[0])
    chosen = adts(u, a[0], count)
    assert (chosen.sum(dim=1) == count).all()
    for t in range(3):
        assert set(chosen[t].nonzero().flatten().tolist()) == reference_adts(u[t], a[0, t], count)


def test_adts_prefers_attended_and_diverse_tokens_and_breaks_ties_by_index():
    # tokens 0-2 are copies of one vector, 3 is orthogonal; equal attention: one copy and 3
    u = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    chosen = adts(u, torch.ones(1, 4), 2)
    assert chosen[0].nonzero().flatten().tolist() == [0, 3]
    # no attention on token 3: its calibrated distances vanish, it is never preferred
    chosen = adts(u, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 1)
    assert chosen[0].nonzero().flatten().tolist() == [0]


@pytest.mark.parametrize(("tau", "cap"), [(0.0, 100), (0.5, 100), (-1.0, 5), (0.9, 0)])
def test_tree_roots_match_reference(tau, cap):
    x, _ = video(b=1, f=5, p=6, d=4, seed=3, static=3)
    u = unit(x[0])
    free = torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    free[2] = False  # a frame with no free token breaks every chain through it
    similarity, parent = temporal_links(u, free)
    roots = tree_roots(similarity, parent, tau, cap)
    assert roots.reshape(-1).tolist() == reference_roots(u, free, tau, cap)


def test_a_repeated_frame_hangs_below_the_earlier_one():
    x = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0))
    u = unit(torch.cat([x, x, x[:, torch.randperm(4)]]))  # (3, 4, 8): frame 2 permutes frame 0
    similarity, parent = temporal_links(u, torch.ones(3, 4, dtype=torch.bool))
    roots = tree_roots(similarity, parent, 0.99, 12)
    assert roots[0].tolist() == roots[1].tolist() == [0, 1, 2, 3]
    assert sorted(roots[2].tolist()) == [0, 1, 2, 3]  # every token finds its copy's tree
    assert tree_roots(similarity, parent, 0.99, 5).ne(torch.arange(12).view(3, 4)).sum() == 5


# --------------------------------------------------------------------------- the whole method
@pytest.mark.parametrize(
    ("f", "p", "q", "params"),
    [
        (4, 16, 4, {}),
        (6, 9, 5, {"segments": 2}),
        (8, 16, 3, {"segments": 1, "segment_tau": -1.0, "selection_ratio": 0.3}),
        (3, 25, 10, {"temporal_tau": 0.0, "density_k": 2}),
        (5, 9, 9, {"selection_ratio": 0.0}),
    ],
)
def test_flashvid_matches_reference(f, p, q, params):
    method = METHODS.build("flashvid", **params)
    x, a = video(b=2, f=f, p=p, d=8, seed=f * p + q, static=p // 2)
    out = method.compress(x, a, f * q)
    for b in range(2):
        expected = reference_flashvid(x[b], a[b], f * q, method)
        assert out.indices[b].tolist() == sorted(expected)
        for slot, pos in enumerate(out.indices[b].tolist()):
            torch.testing.assert_close(out.tokens[b, slot], expected[pos], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("f", "p", "retention"),
    [(1, 16, 0.25), (4, 196, 0.02), (8, 49, 0.1), (3, 1, 1.0), (16, 16, 0.5), (2, 9, 1.0)],
)
def test_exact_budget_on_several_shapes(f, p, retention):
    config = CompressionConfig(retention=retention, method="flashvid", merger="none")
    x, a = video(b=2, f=f, p=p, d=16, seed=f + p, static=p // 3)
    out = Compressor(config).compress(x.float(), a.float())
    budget = config.budget(f, p)
    assert budget == f * min(max(round(retention * p), 1), p)
    assert out.indices.shape == (2, budget) and out.tokens.shape == (2, budget, 16)
    assert torch.isfinite(out.tokens).all()


def test_deterministic_and_each_video_independent_of_its_batch():
    x, a = video(b=3, f=8, p=25, d=8, seed=7, static=10)
    method = METHODS.build("flashvid", segments=2)
    first, second = method.compress(x, a, 8 * 4), method.compress(x, a, 8 * 4)
    assert torch.equal(first.indices, second.indices)
    assert torch.equal(first.assignment, second.assignment)
    assert torch.equal(first.tokens, second.tokens)
    alone = method.compress(x[1:2], a[1:2], 8 * 4)
    assert torch.equal(alone.indices[0], first.indices[1])
    assert torch.equal(alone.assignment[0], first.assignment[1])


def test_merges_a_static_video_and_keeps_the_selected_tokens_as_they_are():
    x, a = video(b=1, f=6, p=16, d=8, seed=2, static=16)  # every position nearly static
    method = METHODS.build("flashvid", segments=1, segment_tau=-1.0)
    out = method.compress(x, a, 6 * 4)  # q_a = 3, q_s = 1 per frame
    assert method.split(4) == (3, 1)
    assert (out.assignment[0] >= 0).all()  # TSTM and DPC-KNN merge, they never drop
    sizes = torch.bincount(out.assignment[0], minlength=24)
    assert int(sizes.max()) > 6  # a merged token spans several frames
    flat = x[0].reshape(96, -1)
    chosen = adts(unit(x[0]), a[0], 3).reshape(-1)
    for slot, pos in enumerate(out.indices[0].tolist()):
        if chosen[pos]:
            assert sizes[slot] == 1 and torch.equal(out.tokens[0, slot], flat[pos])


def test_bad_input_gives_clear_errors():
    x, a = video(b=1, f=3, p=9)
    with pytest.raises(ValueError, match="multiple of F = 3"):
        METHODS.build("flashvid").compress(x, a, 7)
    with pytest.raises(ValueError, match="flashvid needs per-token vision attention"):
        METHODS.build("flashvid").compress(x, None, 9)
    with pytest.raises(ValueError, match=r"budget must be an integer in \[1, F\*P = 27\]"):
        METHODS.build("flashvid").compress(x, a, 28)
    with pytest.raises(ValueError, match=r"features must be a \(B, F, P, D\) tensor"):
        METHODS.build("flashvid").compress(x[0], a, 9)
    with pytest.raises(ValueError, match=r"attention must be \(B, F, P\)"):
        METHODS.build("flashvid").compress(x, a[:, :2], 9)
    for params, message in [
        ({"selection_ratio": 1.5}, r"selection_ratio must be in \[0, 1\], got 1.5"),
        ({"temporal_tau": -2}, r"temporal_tau must be in \[-1, 1\]"),
        ({"density_k": 0}, "density_k must be an integer >= 1"),
        ({"segments": True}, "segments must be an integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            Compressor(CompressionConfig(method="flashvid", params=params))
    assert isinstance(METHODS.build("flashvid"), FlashVID)


def test_frame_slots_give_every_frame_with_a_root_a_token_and_sum_exactly():
    assert frame_slots([13, 1, 0, 2], 4) == [2, 1, 0, 1]  # FlashVID's ceil would give 4+1+0+1
    assert frame_slots([5, 5, 5], 2) == [1, 1, 0]  # fewer slots than frames: proportional
    assert frame_slots([2, 1], 9) == [2, 1]  # never above a frame's roots
    for counts in ([3, 0, 7, 1], [1, 1, 1, 1], [0, 0, 4]):
        for slots in range(1, sum(counts) + 2):
            quota = frame_slots(counts, slots)
            assert sum(quota) == min(slots, sum(counts))
            assert all(0 <= q <= c for q, c in zip(quota, counts, strict=True))
            if slots >= sum(1 for c in counts if c):
                assert all(q >= 1 for q, c in zip(quota, counts, strict=True) if c)
