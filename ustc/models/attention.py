"""Attention recomputed from a layer's own projections: Eq. (1) in the vision tower and the
text-to-visual attention of Eq. (5) at layer K, under any attention implementation (sdpa and
flash return no weights), in bounded memory."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ustc.scoring import mean_received_attention

#: attention probabilities (frames x heads x queries x keys floats) computed at once by the
#: vision-score reduction (16 MiB).  Small on purpose: glibc serves a block of up to 32 MiB from
#: its heap once one has been freed, a larger one with a fresh mmap whose pages the kernel zeroes
#: on first touch: at 8 frames x 784 patches (`python benchmarks/efficiency.py --size small`)
#: those page faults were half of Eq. (1)'s time (docs/performance.md, "Time to first token")
VISION_BLOCK = 1 << 22


def text_to_visual_attention(
    attention: nn.Module,
    normed: Tensor,
    cos: Tensor,
    sin: Tensor,
    text_start: int,
    visual_columns: Tensor,
    key_mask: Tensor | None = None,
    queries: Callable[[nn.Module, Tensor], Tensor] | None = None,
) -> Tensor:
    """A_qv = mean_h softmax(Q_h K_h^T / sqrt(d))[text rows, visual columns]   -- Eq. (1), (5)

    Recomputed from the decoder layer's own q/k projections and RoPE for the text rows only, so
    it works under sdpa/flash attention (which return no weights) in O(N_q * n) memory.  The
    softmax runs over the whole causal key set of each text row (every earlier token that is not
    padding), then the visual columns are taken, as in the attention matrix A of Eq. (5).

    attention:      the layer's self-attention (``q_proj``, ``k_proj``, ``head_dim``, ``scaling``;
                    ``q_norm``, ``k_norm`` where the model has them).
    normed:         (B, n, D) the layer input after its input norm.
    cos, sin:       (B or 1, n, d) the layer's rotary embeddings.
    text_start:     first text row (rows of a padded batch may start later: mask them after).
    visual_columns: (B, N_v) the column of each visual token in each row.
    key_mask:       (B, n) bool, False for padding columns (no query attends to them).
    queries:        (attention, x (B, q, D)) -> (B, q, H, d) the heads' queries before their norm
                    and RoPE; default ``plain_queries`` (an adapter's ``attention_queries``).
    Returns (B, N_q, N_v) float32 with N_q = n - text_start.
    """
    rope = _rotary_function(attention)
    b, n, _ = normed.shape
    head_dim = attention.head_dim
    q = (queries or plain_queries)(attention, normed[:, text_start:])
    k = attention.k_proj(normed).view(b, n, -1, head_dim)
    # some LLMs normalise each head's q and k before RoPE (per-head q_norm / k_norm)
    q = _head_norm(attention, "q_norm", q).transpose(1, 2)
    k = _head_norm(attention, "k_norm", k).transpose(1, 2)
    q = rope(q, q, cos[:, text_start:], sin[:, text_start:])[0]
    k = rope(k, k, cos, sin)[1]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query heads
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attention.scaling
    rows = torch.arange(text_start, n, device=normed.device)
    allowed = (torch.arange(n, device=normed.device)[None, :] <= rows[:, None])[None]  # (1, N_q, n)
    if key_mask is not None:
        allowed = allowed & key_mask.to(normed.device)[:, None, :]
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1).mean(dim=1)
    index = visual_columns.to(normed.device)[:, None, :].expand(b, n - text_start, -1)
    return probs.gather(2, index)


def plain_queries(attention: nn.Module, x: Tensor) -> Tensor:
    """(B, q, H, d): ``q_proj(x)`` split into heads of ``head_dim``."""
    return attention.q_proj(x).view(*x.shape[:2], -1, attention.head_dim)


def _head_norm(attention: nn.Module, name: str, x: Tensor) -> Tensor:
    norm = getattr(attention, name, None)
    return x if norm is None else norm(x)


def _rotary_function(attention: nn.Module) -> Callable[..., tuple[Tensor, Tensor]]:
    """The ``apply_rotary_pos_emb`` the attention module's own forward uses."""
    fn = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise ValueError(
            f"{type(attention).__name__} has no apply_rotary_pos_emb in its module; text-aware "
            "attention cannot be recomputed for this language model"
        )
    return fn


def vit_queries_keys(attention: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """(N, H, L, d) queries and keys of a ViT attention module (``q_proj``, ``k_proj``,
    ``head_dim``; ``q_norm``/``k_norm`` over the projections where it has them) for ``hidden``
    (N, L, D): N images or frames of L patches."""
    n, length, _ = hidden.shape
    shape = (n, length, -1, attention.head_dim)
    q = _head_norm(attention, "q_norm", attention.q_proj(hidden))
    k = _head_norm(attention, "k_norm", attention.k_proj(hidden))
    return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2)


def vision_received_attention(q: Tensor, k: Tensor) -> Tensor:
    """Eq. (1) for encoders without CLS, over groups of frames so that memory stays bounded.

    q, k: (G, H, L, d) for G independent attention groups (frames or windows).  Returns (G, L).
    """
    g, h, length, _ = q.shape
    step = max(1, VISION_BLOCK // max(1, h * length * length))
    # a frame larger than the block (a 7B tower: 16 heads x 729^2) is reduced over query chunks
    chunk = max(1, VISION_BLOCK // max(1, h * length))
    return torch.cat(
        [
            mean_received_attention(q[i : i + step], k[i : i + step], chunk=chunk)
            for i in range(0, g, step)
        ]
    )
