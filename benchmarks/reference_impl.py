"""A straightforward implementation of the external compression (Eq. 1-4), for speed comparisons.

This is how the method reads in the paper, written the obvious way: every candidate is checked
against the pool one at a time, DPC-KNN builds its full N x N distance matrix with ``torch.cdist``
and assigns members to centers one by one.  It produces exactly what ``ustc.Compressor`` produces
(same ties, same rounding: ``benchmarks/compressor.py`` checks it) and is only here to be timed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ustc import CompressionConfig
from ustc.config import round_half_up


def reference_compress(config: CompressionConfig, features: Tensor, attention: Tensor) -> Tensor:
    """Indices (B, M) of the tokens kept by ``config`` (scorer attn/attn+sim, recycler none/dpc)."""
    b, f, p, d = features.shape
    n = f * p
    budget = config.budget(f, p)
    clusters = 0 if config.recycler == "none" else round_half_up(config.cluster_ratio * budget)
    out = []
    for v in range(b):
        x = features[v].reshape(n, d).float()
        prio = attention[v].reshape(n).float()
        order = sorted(range(n), key=lambda i: (-float(prio[i]), i))
        pool: list[int] = []
        for i in order:
            if len(pool) == budget - clusters:
                break
            if config.scorer == "attn" or not pool:
                pool.append(i)
                continue
            sims = torch.nn.functional.cosine_similarity(x[i].unsqueeze(0), x[pool], dim=-1)
            if float(sims.max()) < config.tau:
                pool.append(i)
        rest = [i for i in range(n) if i not in set(pool)]
        slots = budget - len(pool)
        if config.recycler == "none":
            extra = sorted(rest, key=lambda i: (-float(prio[i]), i))[:slots]
        else:
            extra = _dpc_centers(x[rest], slots, config.k)
            extra = [rest[c] for c in extra]
        out.append(sorted(pool + extra))
    return torch.tensor(out)


def _dpc_centers(x: Tensor, n_clusters: int, k: int) -> list[int]:
    n = x.shape[0]
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    kk = max(1, min(k, n - 1))
    log_rho = -(dist.topk(kk, largest=False).values ** 2).mean(-1) if n > 1 else torch.zeros(1)
    dist.fill_diagonal_(0.0)
    delta = torch.zeros(n)
    index = torch.arange(n)
    for i in range(n):
        denser = (log_rho > log_rho[i]) | ((log_rho == log_rho[i]) & (index < i))
        delta[i] = dist[i][denser].min() if bool(denser.any()) else dist[i].max()
    gamma = [
        float(log_rho[i] + math.log(float(delta[i]))) if delta[i] > 0 else -math.inf
        for i in range(n)
    ]
    return sorted(range(n), key=lambda i: (-gamma[i], i))[: min(n_clusters, n)]
