"""The contract every source patch follows, plus the libcst helpers they share.

A patch is data (`name`, `description`, `default`) and two functions over a libcst tree:
`inspect` says whether the construct is absent, already fixed or still needs fixing, and
`rewrite` fixes it. `Patch.apply` runs inspect -> rewrite -> inspect again on the re-parsed
output, so the post-condition is checked by the same code that detects the problem: a rewrite
that does not verify is an error, never a silent no-op. Both functions raise `Unrecognised`
when the construct is there in a shape they do not know; `apply` turns that into a
`PatchError` naming the patch and the file, because guessing on a user's model is worse than
stopping.

`apply_all` (what `hotfix` runs per file) gives the result of `Patch.apply` one patch after another
from one parse of the file and one re-parse of its output; `find_all` and `walk` walk a tree once
however many patches ask (see `indexed`); `benchmarks/hotfix_wall.py` measures it.
"""

from __future__ import annotations

import ast
import enum
import functools
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar

import libcst as cst

from opensci_patch._util.errors import PatchError

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


def apply_all(patches: Sequence[Patch], source: str, filename: str = "<source>") -> tuple[str, dict[str, Status]]:
    """Apply `patches` in order to one file's source; returns the new source and each patch's status.

    The result `Patch.apply` gives one patch after another (each parsing its predecessor's output and
    re-parsing its own), in one parse: every patch inspects and rewrites the tree the one before it
    left, and one re-parse of the final source verifies it (each patch's `inspect` says done or absent).
    Whenever that path fails or does not verify, the patches run again one by one, so errors and
    statuses are exactly theirs (a `PatchError` naming the patch and the file).
    """
    if not patches:
        return source, {}
    with indexed():
        try:
            result = _on_one_tree(patches, source)
        except Exception:  # an unparsable file, an Unrecognised construct...: the one-by-one path says which
            result = None
        if result is not None:
            return result
        statuses: dict[str, Status] = {}
        for patch in patches:
            outcome = patch.apply(source, filename)
            statuses[patch.name] = outcome.status
            source = outcome.source
        return source, statuses


def _on_one_tree(patches: Sequence[Patch], source: str) -> tuple[str, dict[str, Status]] | None:
    tree = cst.parse_module(source)
    statuses: dict[str, Status] = {}
    for patch in patches:
        state = patch.inspect(tree)
        if state is State.NEEDED:
            tree = patch.rewrite(tree)
        statuses[patch.name] = {State.ABSENT: "not-applicable", State.DONE: "already-applied"}.get(state, "applied")
    if "applied" not in statuses.values():
        return source, statuses
    new_source = tree.code
    final = cst.parse_module(new_source)
    if any(patch.inspect(final) not in (State.DONE, State.ABSENT) for patch in patches):
        return None
    return new_source, statuses


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
    return [stmt.deep_clone() for stmt in _parsed_template(text)]  # fresh nodes each time, as a parse gives


@functools.cache
def _parsed_template(text: str) -> Sequence[cst.BaseStatement]:
    return cst.parse_module(text).body


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
    return [n for n in _preorder(node) if isinstance(n, kind) and where(n)]


def walk(node: cst.CSTNode, visitor: cst.CSTVisitor) -> None:
    """`node.visit(visitor)` for a read-only visitor, without libcst rebuilding every node it passes.

    The same calls in the same order (`visit_<Node>`, whose False skips the children, then
    `leave_<Node>`), from the children lists `indexed()` keeps; outside it, or for a visitor that
    overrides `on_visit`/`on_leave` or has attribute callbacks (`visit_<Node>_<field>`), it is `node.visit`.
    """
    index = _local.index
    callbacks = _callbacks(type(visitor)) if index is not None else None
    if callbacks is None:
        node.visit(visitor)
        return
    _entry(node)  # every node under `node` is in the index now
    visits, leaves = callbacks

    def visit(node: cst.CSTNode) -> None:
        name = type(node).__name__
        on_visit = visits.get(name)
        if on_visit is None or on_visit(visitor, node) is not False:
            for child in index[id(node)][4]:
                visit(child)
        on_leave = leaves.get(name)
        if on_leave is not None:
            on_leave(visitor, node)

    visit(node)


def _callbacks(kind: type) -> tuple[dict[str, Callable], dict[str, Callable]] | None:
    """The `visit_<Node>` and `leave_<Node>` functions `kind` defines (libcst's own are no-ops), by node
    class name; None where `walk` must leave the visiting to libcst."""
    if not issubclass(kind, cst.CSTVisitor) or kind.on_visit is not cst.CSTVisitor.on_visit:
        return None
    if kind.on_leave is not cst.CSTVisitor.on_leave:
        return None
    found: dict[str, dict[str, Callable]] = {"visit": {}, "leave": {}}
    for klass in kind.__mro__:
        if klass is cst.CSTVisitor:
            return found["visit"], found["leave"]
        for name, function in vars(klass).items():
            callback = re.fullmatch(r"(visit|leave)_([A-Z]\w*)", name)
            if callback and "_" in callback.group(2):
                return None  # an attribute callback (`visit_<Node>_<field>`): libcst calls those
            if callback:
                found[callback.group(1)].setdefault(callback.group(2), function)
    return None


# While `indexed()` is active, each subtree is walked once: for every node under the node asked about, the
# walk records its pre-order list (for `find_all`) and its children (for `walk`), and later calls on it or on
# any node inside it (a statement a rewrite kept, say) read those. libcst nodes are immutable, so what was
# recorded stays right for as long as the nodes live; the index holds them, so an id in it is never reused
# by another node (see `lookup._Nodes`). Outside `indexed()` nothing is kept. The walk reads each node's
# fields in the order libcst visits them (learnt from libcst, once per node class), so the order is
# libcst's, without libcst rebuilding every node it passes.
_Entry = tuple[cst.CSTNode, list[cst.CSTNode], int, int, list[cst.CSTNode]]


class _Local(threading.local):
    index: dict[int, _Entry] | None = None  # per thread: two threads patching at once keep their own


_local = _Local()
_fields: dict[type, tuple[str, ...]] = {}


@contextmanager
def indexed() -> Iterator[None]:
    """Let `find_all` and `walk` reuse their walks until the outermost `indexed()` ends."""
    outer = _local.index is None
    if outer:
        _local.index = {}
    try:
        yield
    finally:
        if outer:
            _local.index = None


def _preorder(node: cst.CSTNode) -> Sequence[cst.CSTNode]:
    _, nodes, start, end, _ = _entry(node)
    return nodes[start:end] if start or end != len(nodes) else nodes


def _entry(node: cst.CSTNode) -> _Entry:
    """`node`'s pre-order list (a slice of a recorded list) and its children, walking its subtree if need be."""
    index = _local.index if _local.index is not None else {}
    nodes: list[cst.CSTNode] = []

    def add(node: cst.CSTNode) -> None:
        known = index.get(id(node))
        if known is not None and known[0] is node:
            nodes.extend(known[1][known[2] : known[3]])
            return
        start, children = len(nodes), []
        nodes.append(node)
        fields = _fields.get(type(node))
        if fields is None:
            fields = _fields[type(node)] = _FieldOrder.of(node)
        for name in fields:
            value = getattr(node, name)
            if isinstance(value, cst.CSTNode):
                children.append(value)
                add(value)
            elif value is not None and not isinstance(value, cst.MaybeSentinel):
                for child in value:
                    children.append(child)
                    add(child)
        index[id(node)] = (node, nodes, start, len(nodes), children)

    add(node)
    return index[id(node)]


class _FieldOrder(cst.CSTVisitor):
    """The fields libcst visits in a node, in its order (fixed per node class: every field, even if empty)."""

    def __init__(self, node: cst.CSTNode) -> None:
        super().__init__()
        self.node = node
        self.fields: dict[str, None] = {}

    @classmethod
    def of(cls, node: cst.CSTNode) -> tuple[str, ...]:
        order = cls(node)
        node.visit(order)
        return tuple(order.fields)

    def on_visit(self, visited: cst.CSTNode) -> bool:
        return visited is self.node  # its fields, not theirs

    def on_visit_attribute(self, node: cst.CSTNode, attribute: str) -> None:
        if node is self.node:
            self.fields[attribute] = None


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


def pretrained_roots(tree: cst.Module) -> list[cst.ClassDef]:
    """Top-level classes that subclass `PreTrainedModel` directly (every model class of a file inherits one)."""
    return [
        s
        for s in tree.body
        if isinstance(s, cst.ClassDef)
        and any((full_name(b.value) or "").split(".")[-1] == "PreTrainedModel" for b in s.bases)
    ]


def append_method(
    tree: cst.Module, classes: Sequence[cst.ClassDef], func: cst.FunctionDef, name: str, why: str
) -> cst.Module:
    """`func` appended, under the marker, to each of the top-level `classes` (nodes of `tree`)."""
    chosen = {id(c) for c in classes}
    body = []
    for stmt in tree.body:
        if id(stmt) in chosen:
            added = top_level_def([func], 1, name, why)
            stmt = stmt.with_changes(body=stmt.body.with_changes(body=[*stmt.body.body, *added]))
        body.append(stmt)
    return tree.with_changes(body=body)


def method_shape(func: cst.FunctionDef) -> str:
    """A method's syntax tree without its docstring and leading comments: layout and wording do not count,
    so an inserted method is recognised as ours however the file was reformatted since."""
    body = func.body.body[docstring_offset(func.body.body) :]
    return ast.dump(ast.parse(code(func.with_changes(leading_lines=[], body=func.body.with_changes(body=body)))))
