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


def reference_log_dpc(x, members, n_clusters, k, convention="paper"):
    """Eq. (3)-(4) in float64 with log rho, from a float64 distance matrix of the differences.

    convention "tcformer" (the peers' DPC-KNN): d / sqrt(D), the token itself among its k
    nearest (distance 0), the densest token's delta the largest distance of the whole pool.
    Ties: lower index denser, lower center nearer.  Returns log_rho, delta, centers, owner.
    """
    xs = x.double()
    diff = xs[:, None, :] - xs[None, :, :]
    d2 = diff.square().sum(-1)
    if convention == "tcformer":
        d2 = d2 / x.shape[-1]
    d2 = d2.tolist()
    log_rho, delta = {}, {}
    for i in members:
        if convention == "tcformer":
            near = sorted(d2[i][j] for j in members)[:k]  # itself included, at 0
        else:
            near = sorted(d2[i][j] for j in members if j != i)[:k]
        log_rho[i] = -sum(near) / len(near) if near else 0.0

    def denser(j, i):
        return log_rho[j] > log_rho[i] or (log_rho[j] == log_rho[i] and j < i)

    diameter = max((d2[a][b] for a in members for b in members), default=0.0)
    for i in members:
        higher = [d2[i][j] for j in members if denser(j, i)]
        others = [d2[i][j] for j in members if j != i]
        if higher:
            delta[i] = math.sqrt(min(higher))
        elif convention == "tcformer":
            delta[i] = math.sqrt(diameter)
        else:
            delta[i] = math.sqrt(max(others)) if others else 0.0

    def log_gamma(i):
        return log_rho[i] + math.log(delta[i]) if delta[i] > 0 else -math.inf

    centers = sorted(members, key=lambda i: (-log_gamma(i), i))[: min(n_clusters, len(members))]
    owner = {}
    for i in members:
        if i in centers:
            owner[i] = i
        elif centers:
            owner[i] = min(centers, key=lambda c: (d2[i][c], c))
        else:
            owner[i] = -1
    return log_rho, delta, sorted(centers), owner
