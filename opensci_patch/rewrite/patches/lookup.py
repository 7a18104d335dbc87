"""Guard a registry lookup `TABLE[key]` so that one key resolves to code inlined in the file.

Shared by `rope_default` (`ROPE_INIT_FUNCTIONS[...]`, whose "default" entry is gone in 5.x) and
`sdpa_gqa` (`ALL_ATTENTION_FUNCTIONS[...]`, whose "sdpa" entry changed kernels in 4.54). Every
lookup becomes `REPLACEMENT if key == "literal" else TABLE[key]`: the other keys still go through
the registry of the installed transformers. Lookups are found by structure (a subscript of the
table, or `TABLE.<method>(key, ...)`), anywhere in the file; any other use of the table is
reported rather than guessed at. Keys must be names, attributes or string literals, because the
guard evaluates the key twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State, Unrecognised
from opensci_patch.rewrite.patches.inserts import template, top_level_def, with_marker
from opensci_patch.rewrite.patches.syntax import code, full_name, is_string, require_torch, top_functions
from opensci_patch.rewrite.patches.tree_walk import find_all, visit_statements, walk


@dataclass(frozen=True)
class GuardedLookup:
    table: str  # e.g. "ROPE_INIT_FUNCTIONS"
    literal: str  # the key that must not reach the table, e.g. "default"
    replacement: str  # module-level function inserted by the patch
    definition: str  # its source (a template)
    patch: str  # patch name, for the marker comment
    why: str  # short reason, for the marker comment
    methods: tuple[str, ...] = field(default=())  # call forms, e.g. ("get_interface",)

    # -- detection ---------------------------------------------------------------------------

    def key_of(self, node: cst.CSTNode) -> cst.BaseExpression | None:
        """The key if `node` is a lookup in the table, else None."""
        if isinstance(node, cst.Subscript) and self._is_table(node.value):
            if len(node.slice) == 1 and isinstance(node.slice[0].slice, cst.Index):
                return node.slice[0].slice.value
        if (
            isinstance(node, cst.Call)
            and isinstance(node.func, cst.Attribute)
            and node.func.attr.value in self.methods
            and self._is_table(node.func.value)
            and node.args
            and node.args[0].keyword is None
            and not node.args[0].star
        ):
            return node.args[0].value
        return None

    def _is_table(self, node: cst.BaseExpression) -> bool:
        name = full_name(node)
        return name is not None and (name == self.table or name.endswith("." + self.table))

    def guarded_lookup(self, node: cst.IfExp) -> cst.BaseExpression | None:
        """For `REPLACEMENT if key == "literal" else TABLE[key]`, the lookup node; else None."""
        test = node.test
        if not (isinstance(node.body, cst.Name) and node.body.value == self.replacement):
            return None
        if not (isinstance(test, cst.Comparison) and len(test.comparisons) == 1):
            return None
        target = test.comparisons[0]
        if not (isinstance(target.operator, cst.Equal) and is_string(target.comparator, self.literal)):
            return None
        key = self.key_of(node.orelse)
        return node.orelse if key is not None and key.deep_equals(test.left) else None

    def scan(self, node: cst.CSTNode) -> Found:
        """Lookups in `node`, which of them still need the guard, and uses of the table that are not lookups."""
        scan = _Scan(self)
        walk(node, scan)
        scan.found.stray = [code(use) for use in scan.uses if use not in scan.looked_up]
        return scan.found

    def inspect(self, tree: cst.Module) -> State:
        found = self.scan(tree)
        if found.stray:
            raise Unrecognised(f"{self.table} is used other than as `{self.table}[key]`")
        defined = self.replacement in top_functions(tree)
        if not found.lookups and not defined:
            return State.ABSENT
        return State.NEEDED if found.unguarded or not defined else State.DONE

    def _lookups(self, node: cst.CSTNode) -> list[cst.CSTNode]:
        """The lookups in `node` (guarded or not): where `_Guard` changes it."""
        lookups = find_all(node, cst.Subscript, lambda n: self.key_of(n) is not None)
        return lookups + find_all(node, cst.Call, lambda n: self.key_of(n) is not None)

    def as_patch(self, order: int, description: str) -> Patch:
        """The default patch that guards this lookup (named `self.patch`)."""
        return Patch(self.patch, order, description, default=True, inspect=self.inspect, rewrite=self.rewrite)

    # -- rewriting ---------------------------------------------------------------------------

    def rewrite(self, tree: cst.Module) -> cst.Module:
        """Guard every lookup, then define the replacement (torch code) before the first use."""
        require_torch(tree)
        position = next(i for i, stmt in enumerate(tree.body) if self.scan(stmt).lookups)
        tree = visit_statements(tree, _Guard(self), self._lookups)  # the others keep their nodes (and index)
        if self.replacement in top_functions(tree):
            return tree
        definition = top_level_def(template(self.definition), 2, self.patch, self.why)
        return tree.with_changes(body=[*tree.body[:position], *definition, *tree.body[position:]])


@dataclass
class Found:
    lookups: int = 0
    unguarded: int = 0
    stray: list[str] = field(default_factory=list)


class _Scan(cst.CSTVisitor):
    """What `GuardedLookup.scan` counts."""

    def __init__(self, lookup: GuardedLookup) -> None:
        super().__init__()
        self.lookup = lookup
        self.found = Found()
        self.guarded = _Nodes()
        self.looked_up = _Nodes()
        self.uses: list[cst.Name] = []

    def visit_Import(self, node: cst.Import) -> bool:
        return False

    def visit_ImportFrom(self, node: cst.ImportFrom) -> bool:
        return False

    def visit_IfExp(self, node: cst.IfExp) -> None:
        guarded = self.lookup.guarded_lookup(node)
        if guarded is not None:
            self.guarded.add(guarded)

    def on_lookup(self, node: cst.Subscript | cst.Call) -> None:
        key = self.lookup.key_of(node)
        if key is None:
            return
        self.found.lookups += 1
        table = node.value if isinstance(node, cst.Subscript) else node.func.value
        self.looked_up.add(table.attr if isinstance(table, cst.Attribute) else table)
        if node in self.guarded or (is_string(key) and not is_string(key, self.lookup.literal)):
            return
        if not (is_string(key) or full_name(key)):
            raise Unrecognised(f"`{code(node)}` has a key that is not a name or a literal")
        self.found.unguarded += 1

    def visit_Subscript(self, node: cst.Subscript) -> None:
        self.on_lookup(node)

    def visit_Call(self, node: cst.Call) -> None:
        self.on_lookup(node)

    def visit_Name(self, node: cst.Name) -> None:
        if node.value == self.lookup.table:
            self.uses.append(node)


class _Nodes:
    """A set of nodes by identity that keeps them alive.

    `id()` is only unique among live objects: a set of bare ids of nodes that are later freed (a
    replaced guard, a node of a discarded tree) matches whatever unrelated node CPython allocates
    next in the same memory, e.g. a parenthesised multi-line expression that then lost its
    parentheses and no longer parsed (issue 11). Holding the node pins its id.
    """

    def __init__(self) -> None:
        self._nodes: dict[int, cst.CSTNode] = {}

    def add(self, node: cst.CSTNode) -> None:
        self._nodes[id(node)] = node

    def __contains__(self, node: object) -> bool:
        return self._nodes.get(id(node)) is node


class _Guard(cst.CSTTransformer):
    """Wrap each unguarded lookup; mark the statements it changed."""

    def __init__(self, lookup: GuardedLookup) -> None:
        super().__init__()
        self.lookup = lookup
        self.guarded = _Nodes()  # lookups already inside a guard
        self.made = _Nodes()  # guards this transformer built (their parentheses may go)
        self.changes = 0
        self.stack: list[int] = []

    def visit_IfExp(self, node: cst.IfExp) -> None:
        guarded = self.lookup.guarded_lookup(node)
        if guarded is not None:
            self.guarded.add(guarded)

    def _wrap(self, original: cst.BaseExpression, updated: cst.BaseExpression) -> cst.BaseExpression:
        key = self.lookup.key_of(original)
        if key is None or original in self.guarded:
            return updated
        if is_string(key):
            if not is_string(key, self.lookup.literal):
                return updated
            self.changes += 1
            return cst.Name(self.lookup.replacement)
        self.changes += 1
        guard = cst.IfExp(
            test=cst.Comparison(
                left=key.deep_clone(),
                comparisons=[cst.ComparisonTarget(cst.Equal(), cst.SimpleString(f'"{self.lookup.literal}"'))],
            ),
            body=cst.Name(self.lookup.replacement),
            orelse=updated,
            lpar=[cst.LeftParen()],
            rpar=[cst.RightParen()],
        )
        self.made.add(guard)
        return guard

    def leave_Subscript(self, original: cst.Subscript, updated: cst.Subscript) -> cst.BaseExpression:
        return self._wrap(original, updated)

    def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.BaseExpression:
        return self._wrap(original, updated)

    def _unparen(self, value: cst.BaseExpression) -> cst.BaseExpression:
        # The guard carries parentheses in case it is called or subscripted; not needed as a plain value.
        return value.with_changes(lpar=[], rpar=[]) if value in self.made else value

    def leave_Assign(self, original: cst.Assign, updated: cst.Assign) -> cst.Assign:
        return updated.with_changes(value=self._unparen(updated.value))

    def leave_AnnAssign(self, original: cst.AnnAssign, updated: cst.AnnAssign) -> cst.AnnAssign:
        return updated.with_changes(value=self._unparen(updated.value)) if updated.value is not None else updated

    def leave_Return(self, original: cst.Return, updated: cst.Return) -> cst.Return:
        return updated.with_changes(value=self._unparen(updated.value)) if updated.value is not None else updated

    def visit_SimpleStatementLine(self, node: cst.SimpleStatementLine) -> None:
        self.stack.append(self.changes)

    def leave_SimpleStatementLine(
        self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine
    ) -> cst.BaseStatement:
        if self.stack.pop() != self.changes:
            return with_marker(updated, self.lookup.patch, self.lookup.why)
        return updated
