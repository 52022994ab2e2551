"""Two plain implementations of the external compression (Eq. 1-4), for speed comparisons.

``dense_compress`` is the honest baseline: the method written vectorised the way anyone would
write it first.  The greedy pool (Eq. 2) takes one candidate per step, the next one in priority
order whose best similarity to the pool is below tau (one vector op), and updates every token's
best similarity with one (N x D) product; DPC-KNN (Eq. 3-4) builds one N x N distance matrix,
takes the k nearest with ``topk``, delta with one masked min over a denser-than matrix, and the
nearest centre with one ``argmin``.  Its speed-ups are the ones ``benchmarks/compressor.py``
reports.

``reference_compress`` is the same method with Python loops over tokens (``torch.cdist``, delta
one token at a time).  It is far slower than either and only checks identity: the kept tokens of
``ustc.Compressor``, ``dense_compress`` and this one must be the same.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ustc import CompressionConfig
from ustc.config import round_half_up

#: log gamma of tokens with delta = 0 (a duplicate of a denser token): below every real value
_LOG_ZERO = torch.finfo(torch.float32).min / 2


def dense_compress(
    config: CompressionConfig, features: Tensor, attention: Tensor
) -> tuple[Tensor, Tensor]:
    """(indices (B, M), assignment (B, N)) as ``ustc.Compressor.compress`` returns them, for
    scorer attn / attn+sim and recycler none / dpc, vectorised and dense, on the inputs' device.

    features: (B, F, P, D); attention: (B, F, P).
    """
    b, f, p, d = features.shape
    n = f * p
    budget = config.budget(f, p)
    clusters = 0 if config.recycler == "none" else round_half_up(config.cluster_ratio * budget)
    tau = config.tau if config.scorer == "attn+sim" else None
    device = features.device
    indices, assignment = [], []
    for v in range(b):
        x = features[v].reshape(n, d).float()
        prio = attention[v].reshape(n).float()
        order = torch.sort(prio, descending=True, stable=True).indices
        admitted = _dense_pool(x, order, budget - clusters, tau)
        rest = ~admitted
        slots = budget - int(admitted.sum())
        owner = torch.where(admitted, torch.arange(n, device=device), -1)
        if config.recycler == "none":
            key = prio.masked_fill(admitted, float("-inf"))
            extra = torch.sort(key, descending=True, stable=True).indices[:slots]
            owner[extra] = extra
        else:
            members = rest.nonzero().squeeze(1)
            centers, nearest = _dense_dpc(x[members], slots, config.k)
            owner[members] = members[centers][nearest]
        keep = owner == torch.arange(n, device=device)
        kept = keep.nonzero().squeeze(1)
        slot = torch.full((n,), -1, dtype=torch.long, device=device)
        slot[kept] = torch.arange(kept.numel(), device=device)
        indices.append(kept)
        assignment.append(torch.where(owner >= 0, slot[owner.clamp(min=0)], -1))
    return torch.stack(indices), torch.stack(assignment)


def _dense_pool(x: Tensor, order: Tensor, capacity: int, tau: float | None) -> Tensor:
    """(N,) bool: Eq. (2), one admitted candidate per step, candidates in ``order``."""
    n = x.shape[0]
    admitted = torch.zeros(n, dtype=torch.bool, device=x.device)
    if tau is None:
        admitted[order[:capacity]] = True
        return admitted
    unit = torch.nn.functional.normalize(x, dim=-1)
    best = torch.full((n,), float("-inf"), device=x.device)  # max similarity to the pool
    position = 0
    for _ in range(capacity):
        free = best[order[position:]] < tau
        if not bool(free.any()):
            break
        position += int(free.to(torch.uint8).argmax())
        chosen = order[position]
        admitted[chosen] = True
        best = torch.maximum(best, unit @ unit[chosen])
        position += 1
    return admitted


def _dense_dpc(x: Tensor, n_clusters: int, k: int) -> tuple[Tensor, Tensor]:
    """DPC-KNN (Eq. 3-4) on x (n, D) with one distance matrix: (centers (C,) in ascending index,
    nearest (n,) the position in ``centers`` of each token's nearest centre)."""
    n = x.shape[0]
    sq = x.square().sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_(min=0.0)
    index = torch.arange(n, device=x.device)
    d2[index, index] = float("inf")
    log_rho = -d2.topk(max(1, min(k, n - 1)), largest=False).values.mean(-1)
    if n == 1:
        log_rho = torch.zeros(1, device=x.device)
    d2[index, index] = 0.0
    dist = d2.sqrt()
    denser = (log_rho[None, :] > log_rho[:, None]) | (
        (log_rho[None, :] == log_rho[:, None]) & (index[None, :] < index[:, None])
    )
    to_denser = dist.masked_fill(~denser, float("inf")).amin(-1)
    delta = torch.where(denser.any(-1), to_denser, dist.amax(-1))
    log_gamma = torch.where(delta > 0, log_rho + delta.clamp(min=1e-30).log(), _LOG_ZERO)
    centers = torch.sort(log_gamma, descending=True, stable=True).indices[: min(n_clusters, n)]
    centers = centers.sort().values
    nearest = d2[:, centers].argmin(-1)
    is_center = torch.zeros(n, dtype=torch.bool, device=x.device)
    is_center[centers] = True
    own = torch.searchsorted(centers, index)  # a centre's own position in ``centers``
    return centers, torch.where(is_center, own, nearest)


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
