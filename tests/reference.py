"""Slow, obviously-correct references for the equations, one token at a time."""

import math

import torch

from ustc.pool import REJECTED, RETAINED, UNVISITED


def reference_pool(x, priority, capacity, tau):
    """Offer candidates one by one in priority order (ties: lower index); admit if max cos < tau."""
    n = x.shape[0]
    order = sorted(range(n), key=lambda i: (-float(priority[i]), i))
    pool, status = [], [UNVISITED] * n
    for i in order:
        if len(pool) == capacity:
            break
        sims = [float(torch.cosine_similarity(x[i], x[p], dim=0)) for p in pool]
        if tau is None or not sims or max(sims) < tau:
            pool.append(i)
            status[i] = RETAINED
        else:
            status[i] = REJECTED
    return sorted(pool), status


def dist(a, b):
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b, strict=True)))


def reference_dpc(x, members, n_clusters, k):
    """Eq. (3)-(4) as printed, with rho itself (features scaled so exp does not underflow)."""
    rho, delta = {}, {}
    for i in members:
        nn = sorted(dist(x[i], x[j]) for j in members if j != i)[:k]
        rho[i] = math.exp(-sum(v * v for v in nn) / len(nn)) if nn else 1.0

    def denser(j, i):  # ties in density: lower index is denser
        return rho[j] > rho[i] or (rho[j] == rho[i] and j < i)

    for i in members:
        higher = [dist(x[i], x[j]) for j in members if denser(j, i)]
        others = [dist(x[i], x[j]) for j in members if j != i]
        delta[i] = min(higher) if higher else (max(others) if others else 0.0)
    gamma = {i: rho[i] * delta[i] for i in members}
    centers = sorted(members, key=lambda i: (-gamma[i], i))[: min(n_clusters, len(members))]
    owner = {}
    for i in members:
        owner[i] = i if i in centers else min(centers, key=lambda c: (dist(x[i], x[c]), c))
    return rho, delta, sorted(centers), owner
