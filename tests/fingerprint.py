"""Fingerprints of the exact method's decisions, so that a speed change cannot change a result.

Every case computes what a user gets from the code: the kept indices and assignments of
``Compressor.compress`` (the paper's method under many configurations, and the registered
baselines that build on ``ustc.recycle``), and the centres and owners of ``recycle.dpc_knn``
(both conventions, dense and screened paths).  Each case is stored as the sha256 of those
integer tensors in ``tests/data/exact_fingerprint.json``; ``tests/test_fingerprint.py``
recomputes them.  The inputs: the random shapes the unit tests use, the clustered and
far-from-the-origin features of the reference tests, and the structured synthetic video of
``benchmarks/synthetic.py`` at sizes where screening runs (pools of 1024 tokens and more,
D >= 512), in float32 and bfloat16, one video and batches.

    PYTHONPATH=$PWD python tests/fingerprint.py --write   # store today's outputs (once)
    PYTHONPATH=$PWD python tests/fingerprint.py           # compare, print the cases that differ
    PYTHONPATH=$PWD python tests/fingerprint.py --long    # the same for 64-256 frames (minutes)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synthetic import scene_copies, structured_video  # noqa: E402

from ustc import CompressionConfig, Compressor  # noqa: E402
from ustc.recycle import dpc_knn  # noqa: E402

STORE = Path(__file__).resolve().parent / "data" / "exact_fingerprint.json"


def digest(*tensors: Tensor) -> str:
    """sha256 of the shapes and bytes of integer or bool tensors."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _clustered(n: int, dim: int, groups: int, seed: int, far: float = 0.0) -> Tensor:
    """(1, n, dim) tight groups, optionally far from the origin (the reference tests' inputs)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(groups, dim, generator=g)
    labels = torch.arange(n) % groups
    x = centres[labels] + 0.05 * torch.randn(n, dim, generator=g)
    return (x + far * torch.randn(dim, generator=g))[None]


def _scenes(frames: int, tokens: int, dim: int, objects: int, noise: float, seed: int) -> Tensor:
    """(1, F, P, D) a fixed layout of ``objects`` vectors plus per-frame noise."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.randn(objects, dim, generator=g)
    x = scene[torch.randint(0, objects, (tokens,), generator=g)].expand(frames, tokens, dim)
    return (x + noise * torch.randn(frames, tokens, dim, generator=g)).unsqueeze(0)


def _compress_cases() -> Iterator[tuple[str, Callable[[], str]]]:
    def case(name: str, x: Tensor, a: Tensor | None, **config) -> tuple[str, Callable[[], str]]:
        def run() -> str:
            result = Compressor(CompressionConfig(merger="none", **config)).compress(x, a)
            return digest(result.indices, result.assignment)

        settings = ",".join(f"{k}={v}" for k, v in sorted(config.items()))
        return f"compress/{name}/{settings}", run

    g = torch.Generator().manual_seed(0)
    small = torch.randn(2, 4, 16, 32, generator=g)
    small_attn = torch.rand(2, 4, 16, generator=g)
    for scorer in ("attn", "sim", "attn+sim", "random"):
        for recycler in ("dpc", "none"):
            for retention in (0.05, 0.25, 0.5):
                yield case(
                    "randn-2x4x16x32",
                    small,
                    small_attn,
                    scorer=scorer,
                    recycler=recycler,
                    retention=retention,
                )
    for tau in (-0.2, 0.3, 0.7, 1.0):
        for cluster_ratio in (0.0, 0.3, 1.0):
            for k in (1, 3, 5):
                yield case(
                    "randn-2x4x16x32",
                    small,
                    small_attn,
                    retention=0.25,
                    tau=tau,
                    cluster_ratio=cluster_ratio,
                    k=k,
                )
    dup = small.clone()
    dup[:, 2] = dup[:, 1]  # a repeated frame: exact duplicates, ties everywhere
    yield case("duplicates-2x4x16x32", dup, small_attn, retention=0.25)
    far = _clustered(4 * 49, 24, 6, seed=1, far=30.0).view(1, 4, 49, 24)
    yield case("far-1x4x49x24", far, torch.rand(1, 4, 49, generator=g), retention=0.1)

    # structured video, sizes where the recycle pool is screened (N - budget >= 1024, D >= 512)
    for frames, tokens, dim, seed in (
        (8, 49, 64, 0),
        (16, 196, 896, 0),
        (32, 196, 896, 1),
        (16, 196, 3584, 2),
        (32, 196, 3584, 0),
    ):
        x, a = structured_video(frames, tokens, dim, seed=seed)
        name = f"structured-{frames}x{tokens}x{dim}-s{seed}"
        yield case(name, x, a)
        if (frames, dim) == (16, 896):
            for retention in (0.01, 0.05, 0.1):
                yield case(name, x, a, retention=retention)
            yield case(name, x, a, cluster_ratio=0.6, k=3)
            yield case(name, x, a, tau=0.5, scorer="attn")
            yield case(name, x.bfloat16(), a, retention=0.02)
            for method in ("holitom", "fastvid", "visionzip"):
                yield case(name, x, a, method=method)
    x, a = scene_copies(16, 196, 896, seed=0)
    yield case("scenes-16x196x896", x, a)
    # a batch: a screened video beside one screening declines (issue 16's pair)
    x0, a0 = structured_video(8, 196, 1024, seed=3)
    noise = torch.randn(1, 8, 196, 1024, generator=torch.Generator().manual_seed(1))
    batch = torch.cat([x0, noise])
    yield case("batch-structured+randn-8x196x1024", batch, torch.cat([a0, a0]))
    yield case(
        "batch-scenes-2x8x196x1024",
        torch.cat([_scenes(8, 196, 1024, 12, 0.05, 4), _scenes(8, 196, 1024, 30, 0.3, 5)]),
        torch.rand(2, 8, 196, generator=g),
        retention=0.05,
    )


def _dpc_cases() -> Iterator[tuple[str, Callable[[], str]]]:
    def case(name: str, x: Tensor, mask: Tensor, clusters: int, k: int, convention: str):
        def run() -> str:
            n_clusters = torch.full((x.shape[0],), clusters)
            result = dpc_knn(x, mask, n_clusters, k, convention)
            return digest(result.centers, result.owner)

        return f"dpc/{name}/c={clusters},k={k},{convention}", run

    for convention in ("paper", "tcformer"):
        for n, k, clusters, seed in ((7, 2, 3, 0), (30, 3, 5, 1), (60, 5, 10, 2), (120, 4, 20, 3)):
            g = torch.Generator().manual_seed(seed)
            x = 0.3 * torch.randn(1, n, 6, generator=g)
            mask = torch.rand(1, n, generator=g) < 0.8
            yield case(f"randn-{n}x6-s{seed}", x, mask, clusters, k, convention)
            yield case(f"far-{n}x6-s{seed}", x * 0.03 + 20.0, mask, clusters, k, convention)
        for groups in (3, 17):
            x = _clustered(300, 16, groups, seed=groups, far=50.0)
            yield case(
                f"clustered-300x16-g{groups}",
                x,
                torch.ones(1, 300, dtype=torch.bool),
                25,
                5,
                convention,
            )
    for frames, dim, seed in ((8, 896, 0), (16, 896, 1), (8, 3584, 2)):
        x, _ = structured_video(frames, 196, dim, seed=seed)
        x = x.flatten(1, 2)
        mask = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(seed)) < 0.9
        for k in (3, 5):
            yield case(f"structured-{frames}x196x{dim}", x, mask, 40, k, "paper")
    x = _scenes(8, 196, 1024, 12, 0.05, 7).flatten(1, 2)
    yield case("scenes-8x196x1024", x, torch.ones(x.shape[:2], dtype=torch.bool), 30, 5, "paper")


def _long_cases() -> Iterator[tuple[str, Callable[[], str]]]:
    """The frame counts of the scaling figures (seconds each): ``test_fingerprint``'s slow test."""
    for frames, dim in ((64, 896), (128, 896), (256, 896), (64, 3584)):
        x, a = structured_video(frames, 196, dim, seed=0)

        def run(x: Tensor = x, a: Tensor = a) -> str:
            result = Compressor(CompressionConfig(merger="none")).compress(x, a)
            return digest(result.indices, result.assignment)

        yield f"long/structured-{frames}x196x{dim}-s0", run


def cases(long: bool = False) -> Iterator[tuple[str, Callable[[], str]]]:
    """(name, thunk returning the digest) of every fingerprinted case; ``long``: only the long
    ones (``_long_cases``)."""
    if long:
        yield from _long_cases()
        return
    yield from _compress_cases()
    yield from _dpc_cases()


def compute(long: bool = False) -> dict[str, str]:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return {name: run() for name, run in cases(long)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="store today's fingerprints")
    parser.add_argument("--long", action="store_true", help="the long cases (64-256 frames)")
    args = parser.parse_args()
    found = compute(args.long)
    stored = json.loads(STORE.read_text()) if STORE.exists() else {}
    if args.write:
        STORE.parent.mkdir(parents=True, exist_ok=True)
        STORE.write_text(json.dumps(stored | found, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(found)} fingerprints to {STORE}")
        return 0
    stored = {n: h for n, h in stored.items() if n.startswith("long/") == args.long}
    differ = sorted(n for n in stored.keys() | found.keys() if stored.get(n) != found.get(n))
    for name in differ:
        print("DIFFERS", name)
    print(f"{len(found) - len(differ)} / {len(found)} cases identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
