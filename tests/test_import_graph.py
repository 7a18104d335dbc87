"""The package's import graph (every import, also those inside functions) has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "opensci_patch"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package modules it imports}, read with `ast` (nothing is imported)."""
    files = {_module_name(p, root): p for p in root.rglob("*.py") if "data" not in p.relative_to(root).parts}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                for alias in node.names:  # `from . import x` imports the module x when there is one
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in files else target)
        edges &= set(files)
        edges.discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_reader_sees_a_cycle(tmp_path: Path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "opensci_patch.matrix.runner" in graph["opensci_patch.cli"]  # the reader sees lazy imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# The layers, bottom first: a module may import its own package and any layer below, never one above or beside.
LAYERS = (
    ("opensci_patch", "opensci_patch._util"),
    ("opensci_patch.rewrite", "opensci_patch.measure"),
    ("opensci_patch.fixtures",),
    ("opensci_patch.matrix",),
    ("opensci_patch.results",),
    ("opensci_patch.diagnose",),
    ("opensci_patch.demo",),
    ("opensci_patch.cli",),
)


def _layer(module: str) -> tuple[int, str]:
    """(rank, the layer package) of a module: its longest matching prefix in LAYERS."""
    found = [(rank, p) for rank, pkgs in enumerate(LAYERS) for p in pkgs if module == p or module.startswith(f"{p}.")]
    return max(found, key=lambda f: len(f[1]))


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs up a layer or sideways into another package of the same layer."""
    bad = []
    for module, targets in graph.items():
        rank, pkg = _layer(module)
        for target in targets:
            t_rank, t_pkg = _layer(target)
            if t_pkg != pkg and t_rank >= rank and t_pkg != "opensci_patch":
                bad.append(f"{module} -> {target}")
    return sorted(bad)


def test_every_module_is_in_a_layer():
    assert all(_layer(m) for m in import_graph())


def test_the_layer_rule_sees_an_upward_import():
    graph = {"opensci_patch.measure.capture": {"opensci_patch.matrix.envs", "opensci_patch._util.errors"},
             "opensci_patch.rewrite.hotfix": {"opensci_patch.measure.capture"}}  # fmt: skip
    assert upward_edges(graph) == ["opensci_patch.measure.capture -> opensci_patch.matrix.envs",
                                   "opensci_patch.rewrite.hotfix -> opensci_patch.measure.capture"]  # fmt: skip


def test_no_import_runs_up_a_layer():
    assert upward_edges(import_graph()) == []


def test_each_layer_package_says_what_it_is_and_exports_its_modules():
    for pkg in [p for layer in LAYERS[1:] for p in layer if (PACKAGE.parent / p.replace(".", "/")).is_dir()]:
        init = PACKAGE.parent / pkg.replace(".", "/") / "__init__.py"
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init}: no docstring"
        names = [n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__all__"]
        assert names, f"{init}: no __all__"
