"""Synthetic inputs for the speed benchmarks: features and Eq. (1)-like attention scores.

``structured_video`` is built like real video: scenes of 4-12 frames, each a static background
(a few regions of similar texture) with small objects moving across it, cut from one scene to the
next; every frame is its scene's layout plus a little per-frame noise.  ``scene_copies`` is the
older, simpler data of ``benchmarks/compressor.py`` (every frame a noisy copy of one layout of
scene vectors), kept so that earlier figures can be reproduced.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def scene_lengths(
    frames: int, generator: torch.Generator, shortest: int, longest: int
) -> list[int]:
    """Scene lengths in frames, each uniform in [shortest, longest], summing to ``frames``."""
    lengths: list[int] = []
    while sum(lengths) < frames:
        lengths.append(int(torch.randint(shortest, longest + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - frames
    return lengths


def structured_video(
    frames: int,
    tokens: int,
    dim: int,
    seed: int = 0,
    shortest: int = 4,
    longest: int = 12,
    noise: float = 0.15,
) -> tuple[Tensor, Tensor]:
    """One synthetic video: features (1, F, P, D) float32 and attention (1, F, P), on the CPU.

    Each scene (``shortest``-``longest`` frames, a hard cut between scenes) has a static
    background: 3-6 region vectors laid out as a Voronoi partition of the s x s token grid
    (s = ceil(sqrt(P)), raster order, the first P positions), each position its region's vector
    plus a fixed texture.  1-3 objects of 2-4 x 2-4 tokens, each one vector, move across it at
    up to one token per frame (bouncing at the borders).  Every token gets ``noise`` x N(0, 1)
    per component and frame (sensor noise: static tokens of adjacent frames have cosine
    similarity ~0.98).  Attention is uniform noise, higher on the objects (what moves draws
    the encoder's attention).  Deterministic for a ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    side = math.isqrt(tokens)
    side += side * side < tokens
    grid = torch.stack(
        torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), dim=-1
    ).reshape(-1, 2)[:tokens]
    features = torch.empty(frames, tokens, dim)
    saliency = torch.zeros(frames, tokens)
    start = 0
    for length in scene_lengths(frames, g, shortest, longest):
        regions = int(torch.randint(3, 7, (1,), generator=g))
        centres = torch.randint(0, side, (regions, 2), generator=g)
        region = torch.cdist(grid.float(), centres.float()).argmin(1)
        background = torch.randn(regions, dim, generator=g)[region]
        background += 0.35 * torch.randn(tokens, dim, generator=g)
        objects = int(torch.randint(1, 4, (1,), generator=g))
        look = torch.randn(objects, dim, generator=g)
        size = torch.randint(2, 5, (objects, 2), generator=g)
        where = torch.rand(objects, 2, generator=g) * (side - size)
        speed = torch.rand(objects, 2, generator=g) * 2 - 1
        for t in range(start, start + length):
            frame = background.clone()
            for o in range(objects):
                top = where[o].round().long()
                inside = ((grid >= top) & (grid < top + size[o])).all(1)
                frame[inside] = look[o]
                saliency[t, inside] = 1.0
            features[t] = frame
            where += speed
            bounce = (where < 0) | (where > side - size)
            speed = torch.where(bounce, -speed, speed)
            where = torch.minimum(torch.maximum(where, torch.zeros(())), (side - size).float())
        start += length
    features += noise * torch.randn(frames, tokens, dim, generator=g)
    attention = torch.rand(frames, tokens, generator=g) + saliency
    return features.unsqueeze(0), attention.unsqueeze(0)


def scene_copies(frames: int, tokens: int, dim: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Features (1, F, P, D) with video-like redundancy: each frame a noisy copy of one layout of
    P / 4 scene vectors; attention uniform.  The data of the figures before structured video."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.randn(tokens // 4 + 1, dim, generator=g)
    layout = torch.randint(0, scene.shape[0], (tokens,), generator=g)
    base = scene[layout]
    noise = 0.6 * torch.randn(frames, tokens, dim, generator=g)
    features = (base.unsqueeze(0) + noise).unsqueeze(0)
    attention = torch.rand(1, frames, tokens, generator=g)
    return features, attention


DATASETS = {"structured": structured_video, "scenes": scene_copies}


def make_inputs(
    frames: int,
    tokens: int,
    dim: int,
    device: str,
    dtype: torch.dtype,
    seed: int = 0,
    data: str = "structured",
) -> tuple[Tensor, Tensor]:
    """Features (1, F, P, D) in ``dtype`` and attention (1, F, P) float32 on ``device``."""
    if data not in DATASETS:
        raise ValueError(f"data must be one of {sorted(DATASETS)}, got {data!r}")
    features, attention = DATASETS[data](frames, tokens, dim, seed)
    return features.to(device=device, dtype=dtype), attention.to(device)
