"""The shape of the package: no import cycles (deferred and TYPE_CHECKING imports included)."""

from __future__ import annotations

from pathlib import Path

from analysis import module_graph


def test_no_import_cycles_counting_deferred_and_type_checking_imports() -> None:
    found = module_graph.cycles(module_graph.graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_graph_sees_deferred_type_checking_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.a import A\n")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pkg.b import B\n"
        "class A: ...\n"
    )
    (pkg / "b.py").write_text("def f():\n    from . import c\n    return c\n")
    (pkg / "c.py").write_text("import pkg.a\nimport os\n")
    edges = module_graph.graph(tmp_path, ("pkg",))
    assert edges == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.c"},
        "pkg.c": {"pkg.a"},
    }
    assert module_graph.cycles(edges) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_cycles_finds_one_per_circle_and_none_in_a_dag() -> None:
    dag = {"a": {"b", "c"}, "b": {"c"}, "c": set()}
    assert module_graph.cycles(dag) == []
    assert module_graph.layers(dag) == [["c"], ["b"], ["a"]]
    two = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert module_graph.cycles(two) == [["a", "b", "a"], ["c", "d", "e", "c"]]


#: backbone families (and their vision towers) the shared adapter modules must not name
FAMILIES = (
    "qwen",
    "llava",
    "onevision",
    "internvl",
    "internvit",
    "gemma",
    "glm",
    "videollama",
    "video_llama",
    "siglip",
)
SHARED = ("ustc/models/base.py", "ustc/models/sequence.py", "ustc/models/attention.py")


def test_the_shared_adapter_modules_name_no_family() -> None:
    root = Path(__file__).resolve().parents[1]
    found = []
    for name in (*SHARED, "ustc/models/protocol.py"):
        for number, line in enumerate((root / name).read_text().splitlines(), 1):
            found += [f"{name}:{number}: {f}" for f in FAMILIES if f in line.lower()]
    assert not found, "family names in shared modules:\n" + "\n".join(found)


def test_adapters_override_only_the_protocols_hooks() -> None:
    from ustc.models import ADAPTERS, Handle
    from ustc.models.protocol import API, HOOKS

    public = {n for n in dir(Handle) if not n.startswith("_")}
    assert set(HOOKS) <= public, set(HOOKS) - public
    assert public == set(HOOKS) | set(API), public ^ (set(HOOKS) | set(API))
    for adapter in set(ADAPTERS.values()):
        for cls in adapter.__mro__[: adapter.__mro__.index(Handle)]:
            stray = {n for n in vars(cls) if n in public and n not in HOOKS}
            assert not stray, f"{cls.__name__} overrides {stray}, which are not hooks"


def test_the_docs_module_graph_is_what_the_command_writes() -> None:
    text = module_graph.DOC.read_text()
    start, end = text.index(module_graph.BEGIN), text.index(module_graph.END)
    assert text[start : end + len(module_graph.END)] == module_graph.block(module_graph.graph()), (
        "docs/architecture.md is stale: run python -m analysis.module_graph --write"
    )


def test_the_docs_name_every_hook_of_the_protocol() -> None:
    from ustc.models.protocol import HOOKS

    text = module_graph.DOC.read_text()
    assert [h for h in HOOKS if f"`{h}`" not in text] == []
