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
