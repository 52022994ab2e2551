"""The attention masks of layers >= K under every attention implementation transformers offers.

A tensor mask (eager; sdpa with padding; the 2-D padding mask of FlashAttention 2/3 and of
kernels-hub implementations) is cut to the kept columns (``ustc.models.sequence.slice_mask``).
A mask that is no tensor (flex_attention's ``BlockMask``) cannot be cut, so it is rebuilt for the
merged sequence with transformers' own ``create_causal_mask``, which dispatches on the model's
attention implementation exactly as the language model's forward does: the layers >= K then
receive the mask the model itself would build for a prompt of the merged length.

Which implementations are accepted is decided at ``attach`` (``check_attention``), never during
``generate()``: every function registered in transformers' ``AttentionInterface`` (sdpa,
flash_attention_2/3/4, flex_attention, kernels-hub ``org/repo`` names, a user's own function)
and eager; refused are the paged implementations of continuous batching, whose
``PagedAttentionCache`` cannot hold layers of different lengths.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from ustc.models.compat import cache_argument, version_note


def attention_implementation(handle: Any) -> str:
    """The attention implementation the language model's layers run (its config's)."""
    config = getattr(handle.language_model(), "config", None)
    name = getattr(config, "_attn_implementation", None)
    return "eager" if name is None else str(name)


def check_attention(handle: Any) -> None:
    """Refuse, at ``attach``, an attention implementation the layers >= K cannot run under.

    Raises ValueError naming the implementation and the supported ones.
    """
    from transformers import AttentionInterface

    name = attention_implementation(handle)
    known = sorted(AttentionInterface._global_mapping)
    if "paged" in name:
        raise ValueError(
            f"attention implementation {name!r} is continuous batching's paged attention, whose "
            "PagedAttentionCache cannot hold layers >= K with fewer tokens than layers < K; "
            f"attach to a model loaded with eager or one of {', '.join(k for k in known if 'paged' not in k)}"
        )
    if name == "eager" or name in AttentionInterface._global_mapping or "/" in name:
        return  # "/": a kernels-hub implementation, registered when transformers loads it
    raise ValueError(
        f"attention implementation {name!r} is not registered in transformers' "
        f"AttentionInterface (registered: eager, {', '.join(known)}); register it with "
        "AttentionInterface.register(name, function) before loading the model"
    )


def is_block_mask(mask: Any) -> bool:
    """Whether ``mask`` is flex_attention's ``BlockMask`` (rebuilt, not cut, at layers >= K)."""
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:  # torch without flex_attention
        return False
    return isinstance(mask, BlockMask)


def rebuilt_layer_mask(
    handle: Any, index: int, hidden: Tensor, valid: Tensor, layer_kwargs: dict[str, Any]
) -> Any:
    """The mask decoder layer ``index`` >= K needs for the merged sequence, built by
    transformers' ``create_causal_mask`` for the model's attention implementation.

    hidden: (B, q, D) the layer's queries (prefill: the n'' merged tokens; decode: the new ones).
    valid:  (B, kv) bool, False at padding slots of the columns the layer's keys will cover
            (its cache after this step's update).
    layer_kwargs: the layer's keyword arguments (its KV cache).
    """
    from transformers.masking_utils import create_causal_mask

    config = handle.language_model().config
    cache = cache_argument(layer_kwargs)
    padding = None if bool(valid.all()) else valid
    taken = inspect.signature(create_causal_mask).parameters
    q, kv = hidden.shape[1], valid.shape[1]
    if "layer_idx" in taken:  # transformers >= 5.17: sizes from the cache of this layer
        if cache is not None and int(cache.get_seq_length(index)) + q != kv:
            raise RuntimeError(
                f"decoder layer {index} holds {int(cache.get_seq_length(index))} cached tokens "
                f"and receives {q}, but the merged sequence has {kv}{version_note()}"
            )
        # the cache keyword: ``cache`` from 5.24 on, ``past_key_values`` before
        name = "cache" if "cache" in taken else "past_key_values"
        return create_causal_mask(
            config=config,
            inputs_embeds=hidden,
            attention_mask=padding,
            layer_idx=index if cache is not None else None,
            **{name: cache},
        )
    # older releases: sizes from the 2-D mask and the positions of the queries, no cache
    cache_position = torch.arange(kv - q, kv, device=hidden.device)
    return create_causal_mask(
        config=config,
        input_embeds=hidden,
        attention_mask=valid.long(),
        cache_position=cache_position,
        past_key_values=None,
    )
