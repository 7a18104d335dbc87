"""loss_kwargs: no transformers release has both `LossKwargs` and `TransformersKwargs`.

`LossKwargs` is gone from 4.54 on and `TransformersKwargs` does not exist up to 4.53, so a file
importing both fails on every release. Both are only `TypedDict`s that type `**kwargs`.

Detects: `LossKwargs` / `TransformersKwargs` imported from a `transformers` module.
Rewrites: every use of `LossKwargs` to `TransformersKwargs` (dropping a base that would then be
listed twice, e.g. `class K(FlashAttentionKwargs, LossKwargs)`), removes both names from their
imports and adds one guarded import that falls back to an empty `TypedDict` on releases
without it.
Verifies: no `LossKwargs` left, `TransformersKwargs` imported only through the guard, no class
with a duplicated base.
"""

from __future__ import annotations

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State, Unrecognised
from opensci_patch.rewrite.patches.inserts import (
    drop_imported_names,
    replace_imported_names,
    template,
)
from opensci_patch.rewrite.patches.syntax import code, full_name
from opensci_patch.rewrite.patches.tree_walk import find_all, visit_statements, walk

NAME = "loss_kwargs"
OLD, NEW = "LossKwargs", "TransformersKwargs"
NAMES = (OLD, NEW)
WHY = f"no transformers release has both {OLD} and {NEW}"

FALLBACK = f'''
try:
    from transformers.utils import {NEW}
except ImportError:  # transformers <= 4.53
    from typing import TypedDict

    class {NEW}(TypedDict, total=False):
        """Empty stand-in for releases without it: it only types `**kwargs`."""
'''


def _imported(node: cst.ImportFrom) -> list[cst.ImportAlias]:
    """The aliases of NAMES in a `from transformers... import ...` statement."""
    module = full_name(node.module) if node.module is not None else None
    if node.relative or not module or module.split(".")[0] != "transformers" or isinstance(node.names, cst.ImportStar):
        return []
    return [alias for alias in node.names if full_name(alias.name) in NAMES]


def _is_fallback(stmt: cst.CSTNode) -> bool:
    """`try: from transformers... import TransformersKwargs / except ImportError: ... class TransformersKwargs`."""
    if not (isinstance(stmt, cst.Try) and len(stmt.body.body) == 1 and stmt.handlers):
        return False
    first = stmt.body.body[0]
    if not (isinstance(first, cst.SimpleStatementLine) and len(first.body) == 1):
        return False
    imported = first.body[0]
    if not (isinstance(imported, cst.ImportFrom) and [full_name(a.name) for a in _imported(imported)] == [NEW]):
        return False
    return any(
        handler.type is not None
        and full_name(handler.type) == "ImportError"
        and any(isinstance(s, cst.ClassDef) and s.name.value == NEW for s in handler.body.body)
        for handler in stmt.handlers
    )


class _Scan(cst.CSTVisitor):
    """Where the two names occur: plain imports, the guard, other references."""

    def __init__(self, tree: cst.Module) -> None:
        self.top = {id(s) for s in tree.body}
        self.fallbacks = {id(s) for s in tree.body if _is_fallback(s)}
        self.inside_fallback = 0
        self.plain_imports: list[cst.ImportFrom] = []
        self.uses: dict[str, int] = dict.fromkeys(NAMES, 0)
        self.duplicate_bases: list[str] = []
        self.top_line: cst.CSTNode | None = None

    def visit_Try(self, node: cst.Try) -> None:
        self.inside_fallback += id(node) in self.fallbacks

    def leave_Try(self, node: cst.Try) -> None:
        self.inside_fallback -= id(node) in self.fallbacks

    def visit_SimpleStatementLine(self, node: cst.SimpleStatementLine) -> None:
        self.top_line = node if id(node) in self.top else None

    def visit_ImportFrom(self, node: cst.ImportFrom) -> bool:
        aliases = _imported(node)
        if aliases and not self.inside_fallback:
            if any(alias.asname is not None for alias in aliases):
                raise Unrecognised(f"`{code(node)}` renames the import")
            if self.top_line is None:
                raise Unrecognised(f"`{code(node)}` is not a plain top-level import")
            self.plain_imports.append(node)
        return False

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        if node.name.value == NEW and self.inside_fallback:
            return
        bases = [full_name(arg.value) for arg in node.bases]
        if bases.count(NEW) > 1:
            self.duplicate_bases.append(node.name.value)

    def visit_Name(self, node: cst.Name) -> None:
        if node.value in NAMES:
            self.uses[node.value] += 1

    def visit_Attribute(self, node: cst.Attribute) -> None:
        if node.attr.value in NAMES:
            raise Unrecognised(f"`{code(node)}` refers to {node.attr.value} through a module attribute")


def _scan(tree: cst.Module) -> _Scan:
    scan = _Scan(tree)
    walk(tree, scan)
    return scan


def inspect(tree: cst.Module) -> State:
    scan = _scan(tree)
    if not scan.plain_imports and not scan.fallbacks:
        if scan.uses[OLD]:
            raise Unrecognised(f"{OLD} is used but not imported from transformers")
        return State.ABSENT
    if scan.plain_imports or scan.uses[OLD] or scan.duplicate_bases:
        return State.NEEDED
    return State.DONE


class _Rename(cst.CSTTransformer):
    """LossKwargs -> TransformersKwargs in code; drop the now-duplicated class base."""

    def visit_Import(self, node: cst.Import) -> bool:
        return False

    def visit_ImportFrom(self, node: cst.ImportFrom) -> bool:
        return False

    def leave_Name(self, original: cst.Name, updated: cst.Name) -> cst.Name:
        return updated.with_changes(value=NEW) if updated.value == OLD else updated

    def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
        bases, seen = [], False
        for arg in updated.bases:
            if full_name(arg.value) == NEW:
                if seen:
                    continue
                seen = True
            bases.append(arg)
        if len(bases) == len(updated.bases):
            return updated
        bases[-1] = bases[-1].with_changes(comma=updated.bases[-1].comma)
        return updated.with_changes(bases=bases)


def rewrite(tree: cst.Module) -> cst.Module:
    scan = _scan(tree)
    plain = {id(node) for node in scan.plain_imports}
    body: list[cst.BaseStatement] = []
    guard_needed = not scan.fallbacks
    for stmt in tree.body:
        imports_here = isinstance(stmt, cst.SimpleStatementLine) and any(id(s) in plain for s in stmt.body)
        if not imports_here:
            body.append(stmt)
            continue
        if guard_needed:
            body.extend(replace_imported_names(stmt, NAMES, template(FALLBACK), NAME, WHY))
            guard_needed = False
        elif (kept := drop_imported_names(stmt, NAMES)) is not None:
            body.append(kept)
    tree = tree.with_changes(body=body)
    return visit_statements(tree, _Rename(), lambda stmt: find_all(stmt, cst.Name, lambda n: n.value in NAMES))


PATCH = Patch(
    name=NAME,
    order=10,
    description="replace LossKwargs by TransformersKwargs, with a fallback for releases that lack it",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
