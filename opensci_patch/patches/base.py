"""The contract every source patch follows, plus the libcst helpers they share.

A patch is data (`name`, `description`, `default`) and two functions over a libcst tree:
`inspect` says whether the construct is absent, already fixed or still needs fixing, and
`rewrite` fixes it. `Patch.apply` runs inspect -> rewrite -> inspect again on the re-parsed
output, so the post-condition is checked by the same code that detects the problem: a rewrite
that does not verify is an error, never a silent no-op. Both functions raise `Unrecognised`
when the construct is there in a shape they do not know; `apply` turns that into a
`PatchError` naming the patch and the file, because guessing on a user's model is worse than
stopping.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import libcst as cst

from ..errors import PatchError

Status = Literal["applied", "already-applied", "not-applicable"]
MARKER = "# opensci-patch:"
N = TypeVar("N", bound=cst.CSTNode)


class State(enum.Enum):
    """What `inspect` found in a file."""

    ABSENT = "absent"  # the construct is not in this file (e.g. a configuration file)
    DONE = "done"  # the post-condition holds: nothing to change
    NEEDED = "needed"  # the construct is there, in a shape the rewrite handles


class Unrecognised(Exception):
    """The construct is present but not in a shape the patch can rewrite safely."""


@dataclass(frozen=True)
class Outcome:
    """Result of applying one patch to one file's source text."""

    status: Status
    source: str

    @property
    def changed(self) -> bool:
        return self.status == "applied"


@dataclass(frozen=True)
class Patch:
    """One structure-aware source rewrite; see the module docstring for the contract."""

    name: str
    order: int  # place in the registry: patches apply in this order (later ones may rely on earlier ones)
    description: str
    default: bool
    inspect: Callable[[cst.Module], State]
    rewrite: Callable[[cst.Module], cst.Module]

    def apply(self, source: str, filename: str = "<source>") -> Outcome:
        """Rewrite `source` (one Python file); verify the result; idempotent on its own output."""
        tree = self._parse(source, filename, "cannot parse")
        try:
            state = self.inspect(tree)
            if state is State.ABSENT:
                return Outcome("not-applicable", source)
            if state is State.DONE:
                return Outcome("already-applied", source)
            new_source = self.rewrite(tree).code
            after = self.inspect(self._parse(new_source, filename, "produced unparsable code for"))
        except Unrecognised as exc:
            raise PatchError(
                f"patch {self.name!r} cannot rewrite {filename}: {exc}; "
                "the file differs from what the patch knows, fix it by hand or report it"
            ) from exc
        if after is not State.DONE:
            raise PatchError(
                f"patch {self.name!r} did not verify on {filename}: after rewriting, inspection says "
                f"{after.value!r} instead of 'done'; please report this"
            )
        return Outcome("applied", new_source)

    def _parse(self, source: str, filename: str, what: str) -> cst.Module:
        try:
            return cst.parse_module(source)
        except cst.ParserSyntaxError as exc:
            where, message = f"line {exc.raw_line}, column {exc.raw_column + 1}", exc.message
            try:  # Python's own position where it has one (libcst puts an unterminated \"\"\" at line 1)
                compile(source, filename, "exec", dont_inherit=True)
            except SyntaxError as py:
                if py.lineno:
                    where, message = f"line {py.lineno}, column {py.offset or 1}", py.msg
            except (ValueError, OverflowError):
                pass
            raise PatchError(f"patch {self.name!r} {what} {filename}: syntax error at {where}: {message}") from exc


# --- helpers shared by the patches -------------------------------------------------------------


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
    return list(cst.parse_module(text).body)


def top_level_def(stmts: Sequence[cst.BaseStatement], blank_lines: int, name: str, why: str) -> list[cst.BaseStatement]:
    """Give the first templated statement `blank_lines` blank lines and the marker above it."""
    first = stmts[0].with_changes(leading_lines=[cst.EmptyLine(indent=False)] * blank_lines + [marker(name, why)])
    return [first, *stmts[1:]]


def top_functions(tree: cst.Module) -> set[str]:
    return {s.name.value for s in tree.body if isinstance(s, cst.FunctionDef)}


def method(cls: cst.ClassDef, name: str) -> cst.FunctionDef | None:
    """The method `name` defined directly in `cls` (not inherited)."""
    for stmt in cls.body.body:
        if isinstance(stmt, cst.FunctionDef) and stmt.name.value == name:
            return stmt
    return None


def find_all(node: cst.CSTNode, kind: type[N], where: Callable[[N], bool] = lambda _: True) -> list[N]:
    """Every node of type `kind` under `node` (in source order) for which `where` holds."""
    found: list[N] = []

    class Finder(cst.CSTVisitor):
        def on_visit(self, visited: cst.CSTNode) -> bool:
            if isinstance(visited, kind) and where(visited):
                found.append(visited)
            return True

    node.visit(Finder())
    return found


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


def docstring_offset(body: Sequence[cst.BaseStatement]) -> int:
    """Index of the first statement after a leading docstring."""
    if body and isinstance(body[0], cst.SimpleStatementLine) and len(body[0].body) == 1:
        first = body[0].body[0]
        if isinstance(first, cst.Expr) and isinstance(first.value, (cst.SimpleString, cst.ConcatenatedString)):
            return 1
    return 0


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


def is_string(node: cst.BaseExpression, value: str | None = None) -> bool:
    """A plain string literal (optionally with the given value)."""
    if not isinstance(node, cst.SimpleString) or node.prefix.lower() not in ("", "u"):
        return False
    return value is None or node.evaluated_value == value


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
