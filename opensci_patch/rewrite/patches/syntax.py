"""Reading a libcst tree: names, strings, docstrings, methods and the classes the patches look for.

Read-only helpers shared by the patches; the ones that build code to insert are in `inserts`, the
walks (`find_all`, `walk`) in `tree_walk`.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence

import libcst as cst

from opensci_patch.rewrite.patches.base import Unrecognised
from opensci_patch.rewrite.patches.tree_walk import find_all


def code(node: cst.CSTNode) -> str:
    """Source text of a node, for error messages."""
    return cst.Module(body=[]).code_for_node(node).strip()


def full_name(node: cst.CSTNode) -> str | None:
    """`a.b.c` for a chain of names and attributes, else None (not for calls or subscripts)."""
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        inner = full_name(node.value)
        return f"{inner}.{node.attr.value}" if inner else None
    return None


def is_string(node: cst.BaseExpression, value: str | None = None) -> bool:
    """A plain string literal (optionally with the given value)."""
    if not isinstance(node, cst.SimpleString) or node.prefix.lower() not in ("", "u"):
        return False
    return value is None or node.evaluated_value == value


def docstring_offset(body: Sequence[cst.BaseStatement]) -> int:
    """Index of the first statement after a leading docstring."""
    if body and isinstance(body[0], cst.SimpleStatementLine) and len(body[0].body) == 1:
        first = body[0].body[0]
        if isinstance(first, cst.Expr) and isinstance(first.value, (cst.SimpleString, cst.ConcatenatedString)):
            return 1
    return 0


def top_functions(tree: cst.Module) -> set[str]:
    return {s.name.value for s in tree.body if isinstance(s, cst.FunctionDef)}


def method(cls: cst.ClassDef, name: str) -> cst.FunctionDef | None:
    """The method `name` defined directly in `cls` (not inherited)."""
    for stmt in cls.body.body:
        if isinstance(stmt, cst.FunctionDef) and stmt.name.value == name:
            return stmt
    return None


def method_shape(func: cst.FunctionDef) -> str:
    """A method's syntax tree without its docstring and leading comments: layout and wording do not count,
    so an inserted method is recognised as ours however the file was reformatted since."""
    body = func.body.body[docstring_offset(func.body.body) :]
    return ast.dump(ast.parse(code(func.with_changes(leading_lines=[], body=func.body.with_changes(body=body)))))


def self_assignments(func: cst.FunctionDef) -> dict[str, cst.BaseExpression]:
    """`{"x": value}` for every `self.x = value` anywhere in `func` (the last one wins)."""
    found: dict[str, cst.BaseExpression] = {}
    for node in find_all(func, cst.BaseSmallStatement, lambda n: isinstance(n, (cst.Assign, cst.AnnAssign))):
        targets = [t.target for t in node.targets] if isinstance(node, cst.Assign) else [node.target]
        for target in targets:
            name = full_name(target)
            if node.value is not None and name and name.startswith("self.") and name.count(".") == 1:
                found[name[5:]] = node.value
    return found


def pretrained_roots(tree: cst.Module) -> list[cst.ClassDef]:
    """Top-level classes that subclass `PreTrainedModel` directly (every model class of a file inherits one)."""
    return [
        s
        for s in tree.body
        if isinstance(s, cst.ClassDef)
        and any((full_name(b.value) or "").split(".")[-1] == "PreTrainedModel" for b in s.bases)
    ]


def _imports_torch(tree: cst.Module) -> bool:
    """Whether the module binds the name `torch` at top level (the inserted code uses it)."""
    for stmt in tree.body:
        if isinstance(stmt, cst.SimpleStatementLine):
            for small in stmt.body:
                if isinstance(small, cst.Import) and any(
                    alias.asname is None and full_name(alias.name).split(".")[0] == "torch" for alias in small.names
                ):
                    return True
    return False


def require_torch(tree: cst.Module) -> None:
    if not _imports_torch(tree):
        raise Unrecognised("the file has no top-level `import torch`, which the inserted code needs")
