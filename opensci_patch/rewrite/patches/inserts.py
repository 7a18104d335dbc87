"""Writing into a libcst tree: the code templates the patches insert, their marker comments, and the
edits several patches make (an import line without some names, a method appended to classes).

The inserted code is written as plain Python (a template) and parsed once per process; each use gets
nodes no other use got (the parsed ones the first time, copies after), as a parse gives, so no node
stands twice in a tree.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TypeVar

import libcst as cst

from opensci_patch.rewrite.patches.syntax import full_name, method_shape

MARKER = "# opensci-patch:"
B = TypeVar("B", cst.ClassDef, cst.FunctionDef)


def marker(name: str, why: str) -> cst.EmptyLine:
    """The comment line that tells a human reader which code a patch inserted or changed."""
    return cst.EmptyLine(comment=cst.Comment(f"{MARKER} {name} ({why})"))


def with_marker(stmt: cst.BaseStatement, name: str, why: str) -> cst.BaseStatement:
    """Prefix `stmt` with the marker comment (once)."""
    if any(line.comment and line.comment.value.startswith(f"{MARKER} {name}") for line in stmt.leading_lines):
        return stmt
    return stmt.with_changes(leading_lines=[*stmt.leading_lines, marker(name, why)])


def template(text: str) -> list[cst.BaseStatement]:
    """Statements parsed from a code template (the inserted code is written as plain Python)."""
    return _fresh(text, parsed(text))


def template_members(text: str) -> list[cst.BaseStatement]:
    """The body of the template's first statement (the methods of `class _Template: ...`)."""
    return _fresh(text, parsed(text)[0].body.body)


_given: set[str] = set()  # the templates whose parsed nodes a caller already has


def _fresh(text: str, stmts: Sequence[cst.BaseStatement]) -> list[cst.BaseStatement]:
    """`stmts` (of the template `text`) the first time, copies after: nodes no earlier call handed out."""
    if text in _given:
        return [stmt.deep_clone() for stmt in stmts]
    _given.add(text)
    return list(stmts)


@functools.cache
def parsed(text: str) -> Sequence[cst.BaseStatement]:
    """The template's statements as parsed once, to compare with (`template` gives the ones to insert)."""
    return cst.parse_module(text).body


@functools.cache
def template_shape(text: str) -> str:
    """`method_shape` of the template's first method (`class _Template: def ...`)."""
    return method_shape(parsed(text)[0].body.body[0])


def with_block(node: B, stmts: Sequence[cst.BaseStatement]) -> B:
    """The class or function with `stmts` as its body."""
    return node.with_changes(body=node.body.with_changes(body=stmts))


def top_level_def(stmts: Sequence[cst.BaseStatement], blank_lines: int, name: str, why: str) -> list[cst.BaseStatement]:
    """Give the first templated statement `blank_lines` blank lines and the marker above it."""
    first = stmts[0].with_changes(leading_lines=[cst.EmptyLine(indent=False)] * blank_lines + [marker(name, why)])
    return [first, *stmts[1:]]


def drop_imported_names(line: cst.SimpleStatementLine, names: Sequence[str]) -> cst.SimpleStatementLine | None:
    """The import line without `names` in its `from ... import` statements; None when nothing is left."""
    body = []
    for small in line.body:
        if isinstance(small, cst.ImportFrom) and not isinstance(small.names, cst.ImportStar):
            kept = [alias for alias in small.names if full_name(alias.name) not in names]
            if not kept:
                continue
            if len(kept) < len(small.names):
                kept[-1] = kept[-1].with_changes(comma=small.names[-1].comma)
                small = small.with_changes(names=kept)
        body.append(small)
    if not body:
        return None
    body[-1] = body[-1].with_changes(semicolon=cst.MaybeSentinel.DEFAULT)
    return line.with_changes(body=body)


def replace_imported_names(
    line: cst.SimpleStatementLine, names: Sequence[str], added: Sequence[cst.BaseStatement], name: str, why: str
) -> list[cst.BaseStatement]:
    """`line` without `names`, then `added` under the marker; `added` takes the line's place (and its
    leading comments) when nothing is left of it, else follows it after a blank line."""
    kept = drop_imported_names(line, names)
    leading = line.leading_lines if kept is None else [cst.EmptyLine(indent=False)]
    first = added[0].with_changes(leading_lines=[*leading, marker(name, why)])
    return [*([] if kept is None else [kept]), first, *added[1:]]


def append_method(
    tree: cst.Module, classes: Sequence[cst.ClassDef], func: cst.FunctionDef, name: str, why: str
) -> cst.Module:
    """`func` appended, under the marker, to each of the top-level `classes` (nodes of `tree`)."""
    chosen = {id(c) for c in classes}
    body = []
    for stmt in tree.body:
        if id(stmt) in chosen:
            stmt = with_block(stmt, [*stmt.body.body, *top_level_def([func], 1, name, why)])
        body.append(stmt)
    return tree.with_changes(body=body)
