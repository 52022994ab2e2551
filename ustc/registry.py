"""Name -> strategy class registries, one per strategy kind.

One decorator registers a class under one or more names; ``build(name, **params)`` constructs it,
and an unknown name fails with the list of known names.  The CLI (``ablations/run.py``), the sweeps
and the docs all read these registries, so a strategy registered once appears in all three.

    from ustc.registry import SCORERS

    @SCORERS.register("my-scorer")
    class MyScorer:
        def __init__(self, alpha: float = 1.0) -> None: ...
        def score(self, features, attention): ...

Third-party packages can add strategies without editing ustc through the entry point group
``ustc.<kind>`` (for example ``ustc.scorer``), loaded on first lookup.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Param:
    """One constructor parameter of a strategy: what the CLI turns into a flag."""

    name: str
    annotation: Any
    default: Any  # inspect.Parameter.empty when required


class Registry(Generic[T]):
    """Maps user-facing names to strategy classes of one kind (method, scorer, pool, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}
        self._plugins_loaded = False

    def register(self, *names: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: register the class under every name in ``names``."""
        if not names:
            raise ValueError(f"{self.kind} registry: register() needs at least one name")

        def decorator(cls: type[T]) -> type[T]:
            for name in names:
                if name in self._classes and self._classes[name] is not cls:
                    raise ValueError(
                        f"{self.kind} name {name!r} is already registered to "
                        f"{self._classes[name].__qualname__}"
                    )
                self._classes[name] = cls
            cls.registered_name = names[0]  # type: ignore[attr-defined]
            return cls

        return decorator

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=f"ustc.{self.kind}"):
            cls = ep.load()
            if ep.name not in self._classes:
                self.register(ep.name)(cls)

    def names(self) -> list[str]:
        """All registered names, sorted."""
        self._load_plugins()
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; a ``ValueError`` listing the known names otherwise."""
        self._load_plugins()
        try:
            return self._classes[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}"
            ) from None

    def params(self, name: str) -> list[Param]:
        """The typed constructor parameters of the strategy ``name``."""
        signature = inspect.signature(self.get(name).__init__)
        hints = _type_hints(self.get(name).__init__)
        return [
            Param(p.name, hints.get(p.name, p.annotation), p.default)
            for p in signature.parameters.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]

    def build(self, name: str, **params: Any) -> T:
        """Construct the strategy ``name``; unknown parameters raise a ``ValueError``."""
        cls = self.get(name)
        accepted = {p.name for p in self.params(name)}
        unknown = sorted(set(params) - accepted)
        if unknown:
            raise ValueError(
                f"{self.kind} {name!r} takes no parameter {', '.join(map(repr, unknown))}; "
                f"it takes: {', '.join(sorted(accepted)) or 'nothing'}"
            )
        return cls(**params)

    def build_from(self, name: str, values: dict[str, Any]) -> T:
        """Construct ``name`` with the subset of ``values`` its constructor accepts."""
        accepted = {p.name for p in self.params(name)}
        return self.build(name, **{k: v for k, v in values.items() if k in accepted})


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolved forward references: fall back to the raw annotations
        return dict(getattr(fn, "__annotations__", {}))


METHODS: Registry[Any] = Registry("method")
SCORERS: Registry[Any] = Registry("scorer")
POOLS: Registry[Any] = Registry("pool")
RECYCLERS: Registry[Any] = Registry("recycler")
MERGERS: Registry[Any] = Registry("merger")

#: the config fields of the in-LLM stage, which a method may declare defaults for
IN_LLM_FIELDS = ("merger", "layer", "keep_ratio", "lam")


def method_in_llm(name: str) -> dict[str, Any]:
    """The in-LLM stage method ``name`` runs by its paper: the ``in_llm`` class attribute of the
    registered class (config fields among :data:`IN_LLM_FIELDS`, e.g. ``{"merger": "none"}`` for
    VisionZip), ``{}`` when it declares none (the config's own default, ustc's text-aware merger).

    The CLI (``ablations/run.py --method``) and ``ustc.presets.baseline`` apply it, so that a
    baseline runs as published unless a merger is asked for explicitly.
    """
    declared = dict(getattr(METHODS.get(name), "in_llm", {}) or {})
    unknown = sorted(set(declared) - set(IN_LLM_FIELDS))
    if unknown:
        raise ValueError(
            f"method {name!r} declares in-LLM defaults for {unknown}; "
            f"only {', '.join(IN_LLM_FIELDS)} are in-LLM fields"
        )
    return declared


REGISTRIES: dict[str, Registry[Any]] = {
    "method": METHODS,
    "scorer": SCORERS,
    "pool": POOLS,
    "recycler": RECYCLERS,
    "merger": MERGERS,
}
