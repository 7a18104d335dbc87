"""`find_all` and `walk` over libcst trees: one walk of each subtree, however many patches ask.

While `indexed()` is active (`apply_all` runs the patches in it), each subtree is walked once: the walk
records, for every node under the node asked about, its place in a pre-order list of the nodes, and
later calls on that node or on any node inside it (a statement a rewrite kept, say) read the list. Per
list, the positions of each node class are kept too, so `find_all(node, kind)` reads the positions of
the classes that are `kind` inside `node`'s slice instead of testing every node, and `walk` calls a
visitor on the nodes of the classes it has callbacks for, not on every node. libcst nodes are immutable,
so what was recorded stays right for as long as the nodes live; the index holds them, so an id in it is
never reused by another node (see `lookup._Nodes`). Outside `indexed()` nothing is kept. The walk reads
each node's fields in the order libcst visits them (learnt from libcst, once per node class), so the
order is libcst's, without libcst rebuilding every node it passes.
"""

from __future__ import annotations

import bisect
import itertools
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import libcst as cst

N = TypeVar("N", bound=cst.CSTNode)
_Entry = tuple[cst.CSTNode, list[cst.CSTNode], int, int]  # a node, the pre-order list it is in, its slice there


class _Index:
    """What one `indexed()` (or one call outside it) has recorded."""

    def __init__(self) -> None:
        self.entries: dict[int, _Entry] = {}  # id(node) -> its entry
        self.positions: dict[int, tuple[list[cst.CSTNode], dict[type, list[int]]]] = {}  # per pre-order list
        self.kinds: dict[tuple[int, type], list[type]] = {}  # (id of a positions dict, kind) -> its classes of kind


class _Local(threading.local):
    index: _Index | None = None  # per thread: two threads patching at once keep their own


_local = _Local()
_fields: dict[type, tuple[str, ...]] = {}


@contextmanager
def indexed() -> Iterator[None]:
    """Let `find_all` and `walk` reuse their walks until the outermost `indexed()` ends."""
    outer = _local.index is None
    if outer:
        _local.index = _Index()
    try:
        yield
    finally:
        if outer:
            _local.index = None


def find_all(node: cst.CSTNode, kind: type[N], where: Callable[[N], bool] = lambda _: True) -> list[N]:
    """Every node of type `kind` under `node` (in source order) for which `where` holds."""
    index = _local.index or _Index()
    _, nodes, start, end = _entry(index, node)
    by_type = _positions(index, nodes)
    return [nodes[i] for i in _between(by_type, _kinds(index, by_type, kind), start, end) if where(nodes[i])]


def walk(node: cst.CSTNode, visitor: cst.CSTVisitor) -> None:
    """`node.visit(visitor)` for a read-only visitor, without libcst rebuilding every node it passes.

    The same calls in the same order (`visit_<Node>`, whose False skips the children, then
    `leave_<Node>`), made only on the nodes of the classes the visitor has callbacks for, in the
    recorded pre-order; outside `indexed()`, or for a visitor that overrides `on_visit`/`on_leave` or
    has attribute callbacks (`visit_<Node>_<field>`), it is `node.visit`.
    """
    index = _local.index
    callbacks = _callbacks(type(visitor)) if index is not None else None
    if callbacks is None:
        node.visit(visitor)
        return
    visits, leaves = callbacks
    _, nodes, start, end = _entry(index, node)
    by_type = _positions(index, nodes)
    named = [t for t in by_type if t.__name__ in visits or t.__name__ in leaves]
    entries = index.entries
    pending: list[tuple[int, Callable, cst.CSTNode]] = []  # leave callbacks due at the end of a subtree
    skip_to = start
    for at in _between(by_type, named, start, end):
        if at < skip_to:
            continue  # inside a subtree whose visit_ returned False
        while pending and pending[-1][0] <= at:
            _, on_leave, left = pending.pop()
            on_leave(visitor, left)
        current = nodes[at]
        _, _, first, last = entries[id(current)]
        name = type(current).__name__
        on_visit = visits.get(name)
        if on_visit is not None and on_visit(visitor, current) is False:
            skip_to = at + last - first
        on_leave = leaves.get(name)
        if on_leave is not None:
            pending.append((at + last - first, on_leave, current))
    while pending:
        _, on_leave, left = pending.pop()
        on_leave(visitor, left)


def visit_statements(
    tree: cst.Module, transformer: cst.CSTTransformer, targets: Callable[[cst.BaseStatement], Sequence[cst.CSTNode]]
) -> cst.Module:
    """`tree.visit(transformer)` for a transformer that changes a top-level statement only at the nodes
    `targets(statement)` gives (and at their ancestors, as it leaves them): libcst visits only the paths
    from each statement to its targets and the targets' subtrees. Every other node stays as it is (libcst
    would rebuild each one it passes), and so does its index entry, for the next patch."""

    def visited(stmt: cst.BaseStatement) -> cst.BaseStatement:
        found = targets(stmt)
        if not found:
            return stmt
        toward = _holding(stmt, found)
        on_visit = transformer.on_visit
        transformer.on_visit = lambda node: on_visit(node) and id(node) in toward  # called for every node visited
        try:
            return stmt.visit(transformer)
        finally:
            del transformer.on_visit

    return tree.with_changes(body=[visited(stmt) for stmt in tree.body])


def _holding(node: cst.CSTNode, targets: Sequence[cst.CSTNode]) -> set[int]:
    """ids of the nodes under `node` (itself included) that are one of `targets`, hold one or are inside one."""
    index = _local.index or _Index()
    _, nodes, start, end = _entry(index, node)
    entries, wanted, found = index.entries, {id(t) for t in targets}, set()
    above: list[tuple[int, cst.CSTNode]] = []  # (end of its subtree, node) for the nodes above the current one
    inside_to = start  # the end of the target subtree the walk is in
    for at in range(start, end):
        current = nodes[at]
        if at < inside_to:
            found.add(id(current))
            continue
        while above and above[-1][0] <= at:
            above.pop()
        _, _, first, last = entries[id(current)]
        if id(current) in wanted:
            found.add(id(current))
            found.update(id(parent) for _, parent in above)
            inside_to = at + last - first
        else:
            above.append((at + last - first, current))
    return found


def _kinds(index: _Index, by_type: dict[type, list[int]], kind: type) -> list[type]:
    """The node classes of `by_type` that are `kind` (remembered: libcst's classes are ABCs, slow to ask)."""
    key = (id(by_type), kind)
    found = index.kinds.get(key)
    if found is None:
        found = index.kinds[key] = [t for t in by_type if issubclass(t, kind)]
    return found


def _between(by_type: dict[type, list[int]], types: Sequence[type], start: int, end: int) -> Sequence[int]:
    """The positions in [start, end) of the nodes of `types`, in order."""
    runs = []
    for t in types:
        positions = by_type[t]
        low = bisect.bisect_left(positions, start)
        high = bisect.bisect_left(positions, end, low)
        if high > low:
            runs.append(positions[low:high])
    if len(runs) == 1:
        return runs[0]
    return sorted(itertools.chain.from_iterable(runs))


def _positions(index: _Index, nodes: list[cst.CSTNode]) -> dict[type, list[int]]:
    """Per node class, where its nodes stand in the pre-order list `nodes` (computed once per list)."""
    known = index.positions.get(id(nodes))
    if known is not None and known[0] is nodes:
        return known[1]
    by_type: dict[type, list[int]] = {}
    for at, node in enumerate(nodes):
        positions = by_type.get(type(node))
        if positions is None:
            by_type[type(node)] = [at]
        else:
            positions.append(at)
    index.positions[id(nodes)] = (nodes, by_type)
    return by_type


def _entry(index: _Index, node: cst.CSTNode) -> _Entry:
    """`node`'s entry: its pre-order list (a slice of a recorded list), walking its subtree if need be."""
    entries = index.entries
    known = entries.get(id(node))
    if known is not None and known[0] is node:
        return known
    nodes: list[cst.CSTNode] = []

    def add(node: cst.CSTNode) -> None:
        known = entries.get(id(node))
        if known is not None and known[0] is node:
            nodes.extend(known[1][known[2] : known[3]])
            return
        start = len(nodes)
        nodes.append(node)
        fields = _fields.get(type(node))
        if fields is None:
            fields = _fields[type(node)] = _FieldOrder.of(node)
        for name in fields:
            value = getattr(node, name)
            if isinstance(value, (tuple, list)):
                for child in value:
                    add(child)
            elif value is not None and type(value) is not cst.MaybeSentinel:
                add(value)
        entries[id(node)] = (node, nodes, start, len(nodes))

    add(node)
    return entries[id(node)]


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
