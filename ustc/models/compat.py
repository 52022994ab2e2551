"""What differs between transformers releases, read from the arguments themselves (never from
version numbers), and the errors that name the installed release when a form is unknown."""

from __future__ import annotations

from typing import Any


def describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else f"a {type(value).__name__}"


#: the transformers releases the adapters are tested with (README, CI)
TESTED_TRANSFORMERS = ("5.17.0", "5.25.0")


def version_note() -> str:
    import transformers

    low, high = TESTED_TRANSFORMERS
    return (
        f" (transformers {transformers.__version__}; ustc's adapters are tested with "
        f"{low} to {high}: a form this release passes that ustc does not know, please report it)"
    )


#: the keyword a transformers release passes the KV cache by: ``cache`` from 5.24 on,
#: ``past_key_values`` before (and still accepted, deprecated, by 5.24)
CACHE_NAMES = ("cache", "past_key_values")


def cache_argument(kwargs: dict[str, Any]) -> Any:
    """The KV cache among a forward's keyword arguments, whichever name the caller used."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_keyword(module: Any) -> str:
    """The keyword ``module.forward`` takes the KV cache by (the first of :data:`CACHE_NAMES` in
    its signature): what a caller that passes a cache in should use."""
    import inspect

    taken = inspect.signature(module.forward).parameters
    for name in CACHE_NAMES:
        if name in taken:
            return name
    raise ValueError(f"{type(module).__name__}.forward takes no KV cache argument{version_note()}")


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned, whichever field name the release uses."""
    for name in CACHE_NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    raise ValueError(f"the output has no KV cache{version_note()}")


def cache_length(cache: Any, layer: int) -> int:
    try:
        return int(cache.get_seq_length(layer))
    except TypeError:
        return int(cache.get_seq_length())


def check_cache(cache: Any) -> None:
    from transformers import DynamicCache

    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"only DynamicCache is supported with token compression, got {type(cache).__name__}: "
            "layers >= K hold fewer entries than layers < K, which static/offloaded caches "
            "cannot represent"
        )
