"""DPC-KNN (Eq. 3-4) for the GPU: blocked distance work, no host synchronisation, bf16 products.

The dense path of ``ustc.recycle`` keeps the N x N distance matrix (N <= 8192) or streams row
blocks over all N columns; the CPU path screens most pairs away (``ustc.screening``), with host
syncs everywhere.  A GPU wants neither: the distance work is a few matrix products that its
tensor cores finish in a millisecond, and what costs is memory (N x N at 256 frames x 196 tokens
is 10 GB in float32) and every ``.item()`` that stalls the queue.  Here:

- distances come in (row block x column block) tiles and never as N x N: the k nearest by a
  running top-k over column blocks, delta by a running masked min (and max, for the densest
  token) over column blocks;
- the loops run over Python integers only (N and the block size), so nothing waits for the
  device until the caller reads the result;
- with bfloat16 (or float16) features on CUDA the products take the tensor cores with float32
  accumulation and a float32 result (``torch.bmm(..., out_dtype=torch.float32)``).  The product
  of two bfloat16 values is exact in float32, so the only change from the float32 path is the
  order of the float32 additions: the distances differ by float32 rounding, as between any two
  float32 matrix-product kernels.  A bfloat16 *result* (what a plain bf16 ``bmm`` returns) would
  not do: ||a||^2 + ||b||^2 - 2 a.b cancels, and 8 bits of a.b leave nothing of a small distance.

Every function returns what the dense functions of ``ustc.recycle`` return for the same inputs
up to the rounding of Gram products (``tests/test_blocked.py`` compares them with tiny blocks).
Not yet: the dense path measures the distances that decide (k nearest, nearest denser, nearest
centre) from differences and certifies them against float32 rounding (issue 16); this path does
not, so where rounding decides (exact duplicates, near ties) its selection can differ.  Until it
certifies its choices the same way, ``recycle.dpc_knn`` does not dispatch to it; the benchmarks
time it as a variant.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ustc.ops import denser_than, descending_order, first_n_mask, squared_norms

#: distance tiles of at most this many entries per video (float32: 256 MiB at B = 1)
BLOCK_ENTRIES = 1 << 26
#: side of a square tile when the whole N x N does not fit ``BLOCK_ENTRIES``
BLOCK = 4096
#: log gamma of tokens with delta = 0 (a duplicate of a denser token): below every real value
_LOG_ZERO = torch.finfo(torch.float32).min / 2
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def block_size(n: int) -> int:
    """Side of the distance tiles for N tokens: N itself while N x N fits ``BLOCK_ENTRIES``."""
    return n if n * n <= BLOCK_ENTRIES else BLOCK


@functools.cache
def _out_dtype_supported(device: str) -> bool:
    """Whether ``torch.bmm(bf16, bf16, out_dtype=torch.float32)`` runs on ``device`` (CUDA in
    recent PyTorch; not on the CPU).  Probed once per device on a tiny product."""
    a = torch.ones(1, 2, 2, dtype=torch.bfloat16, device=device)
    try:
        out = torch.bmm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return out.dtype == torch.float32


def uses_low_precision_products(features: Tensor) -> bool:
    """True when the products take bfloat16/float16 operands with a float32 result: the features
    are of that dtype and the device multiplies them with float32 output (CUDA)."""
    if features.dtype not in _LOW_PRECISION or features.device.type != "cuda":
        return False
    return _out_dtype_supported(str(features.device))


def _operands(features: Tensor, products: str) -> tuple[Tensor, bool]:
    """(the tensor the products read, whether it stays in bf16/fp16 with float32 output)."""
    if products not in ("auto", "float32"):
        raise ValueError(f"products must be 'auto' or 'float32', got {products!r}")
    low = products == "auto" and uses_low_precision_products(features)
    return (features if low else features.float()), low


def _gram(a: Tensor, b: Tensor, low: bool) -> Tensor:
    """a b^T for a (B, r, D), b (B, c, D): (B, r, c) float32."""
    if low:
        return torch.bmm(a, b.transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(a, b.transpose(1, 2))


def tile_squared_distances(
    x: Tensor, sq: Tensor, rows: slice, cols: slice, low: bool = False
) -> Tensor:
    """||x_i - x_j||^2 = ||x_i||^2 + ||x_j||^2 - 2 x_i . x_j, clamped at 0, for i in ``rows`` and
    j in ``cols``: (B, r, c) float32.  x: (B, N, D) (float32, or bf16/fp16 when ``low``); sq: (B, N)
    float32 squared norms.  The same expression, in the same order, as ``ops``' dense matrix."""
    block = sq[:, rows, None] + sq[:, None, cols] - 2.0 * _gram(x[:, rows], x[:, cols], low)
    return block.clamp_(min=0.0)


def _self_pairs(tile: Tensor, rows: slice, cols: slice) -> Tensor:
    """The entries (i, i) of a (B, r, c) tile of rows ``rows`` x columns ``cols``, as a view
    (empty when the tile misses the diagonal): no index tensor, nothing to synchronise."""
    return torch.diagonal(tile, offset=rows.start - cols.start, dim1=1, dim2=2)


def _spans(n: int, step: int) -> list[slice]:
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def knn_log_density(
    features: Tensor,
    mask: Tensor,
    k: int,
    block: int | None = None,
    products: str = "auto",
) -> Tensor:
    """log rho_i = -(1/k) sum_{v_j in kNN(v_i)} d(v_i, v_j)^2   -- Eq. (3), blocked

    kNN(v_i): the k nearest other members of the recycle pool, found by a running top-k over
    column blocks: each (row block x column block) tile's k smallest join the k best so far.  As
    ``ustc.recycle.knn_log_density``: with fewer than k other members all of them, a lone member
    has log rho = 0.

    features: (B, N, D); mask: (B, N) bool; block: tile side (default ``block_size(N)``);
    products: "auto" (bf16/fp16 operands with float32 output where the device has it) or
    "float32".  Returns (B, N) float32, -inf outside the pool.  Memory O(B block^2).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    b, n, _ = features.shape
    x, low = _operands(features, products)
    sq = squared_norms(features)
    step = block or block_size(n)
    k_eff = max(1, min(k, n - 1))
    inf = float("inf")
    out = torch.empty(b, n, device=features.device)
    not_member = ~mask
    for rows in _spans(n, step):
        best = None  # (B, r, <= k_eff): the smallest squared distances so far, ascending
        for cols in _spans(n, step):
            tile = tile_squared_distances(x, sq, rows, cols, low)
            # a token is not its own neighbour (a view of the tile's part of the diagonal)
            _self_pairs(tile, rows, cols).fill_(inf)
            tile.masked_fill_(not_member[:, None, cols], inf)
            if best is not None:
                tile = torch.cat([best, tile], dim=-1)
            best = tile.topk(min(k_eff, tile.shape[-1]), dim=-1, largest=False).values
        assert best is not None
        finite = torch.isfinite(best)
        count = finite.sum(-1)
        out[:, rows] = -torch.where(finite, best, 0.0).sum(-1) / count.clamp(min=1)
    return out.masked_fill_(not_member, float("-inf"))


def peak_distance(
    features: Tensor,
    mask: Tensor,
    log_rho: Tensor,
    block: int | None = None,
    products: str = "auto",
) -> Tensor:
    """delta_i = min_{j: rho_j > rho_i} d(v_i, v_j), or max_{j member} d(v_i, v_j) for the
    densest   -- Eq. (4), blocked

    A running masked min (and max) of the squared distances over column blocks; the square root
    is taken once at the end (sqrt is monotone and correctly rounded, so this is the dense path's
    min of square roots bit for bit).  Equal densities: lower index is denser (``ops.denser_than``).
    A token's distance to itself is exactly 0, so a lone member has delta = 0 (the dense path
    leaves the rounding of ||x||^2 + ||x||^2 - 2 x.x there, which can be ~1e-3 at D = 3584).

    features: (B, N, D); mask, log_rho: (B, N).  Returns (B, N) float32, 0 outside the pool.
    """
    b, n, _ = features.shape
    x, low = _operands(features, products)
    sq = squared_norms(features)
    step = block or block_size(n)
    device = features.device
    idx = torch.arange(n, device=device)
    out = torch.empty(b, n, device=device)
    for rows in _spans(n, step):
        r = rows.stop - rows.start
        to_denser = torch.full((b, r), float("inf"), device=device)
        farthest = torch.zeros(b, r, device=device)
        has_denser = torch.zeros(b, r, dtype=torch.bool, device=device)
        rho_i, idx_i = log_rho[:, rows, None], idx[rows, None]
        for cols in _spans(n, step):
            tile = tile_squared_distances(x, sq, rows, cols, low)
            # d(i, i) = 0 exactly, not the rounding of ||x||^2 + ||x||^2 - 2 x.x
            _self_pairs(tile, rows, cols).fill_(0.0)
            member = mask[:, None, cols]
            denser = denser_than(rho_i, idx_i, log_rho[:, None, cols], idx[cols]) & member
            to_denser = torch.minimum(to_denser, tile.masked_fill(~denser, float("inf")).amin(-1))
            farthest = torch.maximum(farthest, tile.masked_fill_(~member, 0.0).amax(-1))
            has_denser |= denser.any(-1)
        out[:, rows] = torch.where(has_denser, to_denser, farthest).sqrt_()
    return out.masked_fill_(~mask, 0.0)


def density_and_peak(
    features: Tensor, mask: Tensor, k: int, block: int | None = None, products: str = "auto"
) -> tuple[Tensor, Tensor]:
    """(log rho, delta) of Eq. (3)-(4), both (B, N) float32: the pair ``ustc.screening.screen``
    returns, so that ``recycle.dpc_knn`` can take either."""
    log_rho = knn_log_density(features, mask, k, block, products)
    return log_rho, peak_distance(features, mask, log_rho, block, products)


def nearest_center(
    features: Tensor, mask: Tensor, centers: Tensor, max_centers: int, products: str = "auto"
) -> Tensor:
    """owner_i = argmin_{c in centers} d(v_i, v_c) for members of ``mask``, -1 elsewhere.

    As ``ustc.recycle.nearest_center`` (centers own themselves, ties to the lower center index),
    without its host sync: ``max_centers`` (a Python int, at least the most centers of any video)
    sizes the (B, C, N) distances.  features: (B, N, D); mask, centers: (B, N) bool.
    """
    b, n, d = features.shape
    c = max(1, min(int(max_centers), n))
    x, low = _operands(features, products)
    sq = squared_norms(features)
    center_idx = descending_order(centers.to(torch.uint8))[:, :c]  # centers by ascending index
    center_ok = centers.gather(1, center_idx)  # padding columns of videos with fewer centers
    center_x = x.gather(1, center_idx.unsqueeze(-1).expand(b, c, d))
    center_sq = sq.gather(1, center_idx)
    owner = torch.empty(b, n, dtype=torch.long, device=features.device)
    step = max(1, BLOCK_ENTRIES // c)
    for cols in _spans(n, step):
        # (B, C, r): the centers as the rows of the product, as the dense path
        d2 = center_sq[:, :, None] + sq[:, None, cols] - 2.0 * _gram(center_x, x[:, cols], low)
        d2 = d2.clamp_(min=0.0).masked_fill_(~center_ok.unsqueeze(-1), float("inf"))
        owner[:, cols] = center_idx.gather(1, d2.argmin(1))
    own = torch.arange(n, device=features.device).expand(b, n)
    owner = torch.where(centers, own, owner)
    return owner.masked_fill_(~mask, -1)


@dataclass(frozen=True)
class BlockedDPC:
    """DPC-KNN (Eq. 3-4) on the recycle pool, the blocked way: the ``dpc`` recycler's result
    (``ustc.recycle.Recycled``) with one host sync, the largest cluster count, to size the
    nearest-centre step.  Not registered: ``recycle.dpc_knn`` dispatches to
    ``density_and_peak`` on CUDA once the lead adds the hook; benchmarks swap it in meanwhile.

    k: neighbours of the density; block: tile side (default ``block_size(N)``); products: "auto"
    or "float32" (see ``knn_log_density``).
    """

    k: int = 5
    block: int | None = None
    products: str = "auto"

    def recycle(self, features: Tensor, mask: Tensor, n_slots: Tensor, priority: Tensor | None):
        from ustc.recycle import Recycled  # at call time: ustc.recycle may import this module

        log_rho, delta = density_and_peak(features, mask, self.k, self.block, self.products)
        log_gamma = torch.where(delta > 0, log_rho + delta.clamp(min=1e-30).log(), _LOG_ZERO)
        log_gamma = log_gamma.masked_fill(~mask, float("-inf"))
        counts = torch.minimum(n_slots, mask.sum(-1))
        centers = first_n_mask(descending_order(log_gamma), counts) & mask
        most = int(counts.max())  # the one host sync: the size of the centre table
        owner = nearest_center(features, mask, centers, most, self.products)
        return Recycled(centers=centers, owner=owner)
