"""Replacing uses of a construct with calls of module-level helpers that a patch inserts (issue 29's patches).

Shared by `rope_scaling`, `legacy_cache`, `generation_call` and `generation_defaults`: each finds its nodes
(attribute reads, method calls, subscripts), says which expression replaces each, and which helper
definitions the file must hold. `replace` rewrites only those nodes (and marks the statement holding one);
`insert_helpers` adds each missing definition, once, above the first top-level statement that calls it.
Code opensci-patch inserted (top-level `_opensci_*` functions) is never rewritten: the helpers use the
constructs on purpose.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import libcst as cst

from opensci_patch.rewrite.patches.base import State, Unrecognised
from opensci_patch.rewrite.patches.inserts import template, top_level_def, with_marker
from opensci_patch.rewrite.patches.syntax import code, full_name, is_string
from opensci_patch.rewrite.patches.tree_walk import find_all, visit_statements

Build = Callable[[cst.CSTNode], cst.BaseExpression]


def inserted(stmt: cst.CSTNode) -> bool:
    """A top-level function opensci-patch inserted."""
    return isinstance(stmt, cst.FunctionDef) and stmt.name.value.startswith("_opensci_")


def user_statements(tree: cst.Module) -> list[cst.BaseStatement]:
    """The top-level statements other than the ones opensci-patch inserted."""
    return [stmt for stmt in tree.body if not inserted(stmt)]


def written(node: cst.CSTNode) -> set[int]:
    """ids of the nodes inside assignment, `del`, `for` and walrus targets: written, not read."""
    targets: list[cst.CSTNode] = []
    for assign in find_all(node, cst.Assign):
        targets.extend(t.target for t in assign.targets)
    for kind in (cst.AugAssign, cst.AnnAssign, cst.Del, cst.For, cst.NamedExpr):
        targets.extend(n.target for n in find_all(node, kind))
    found: set[int] = set()
    for target in targets:
        found |= {id(n) for n in find_all(target, cst.CSTNode)}
    return found


def attribute_reads(tree: cst.Module, attr: str, where: Callable[[cst.Attribute], bool] = lambda _: True) -> list:
    """Reads of `<expr>.attr` (not on `self`, not written) in the user's statements, for which `where` holds."""
    found = []
    for stmt in user_statements(tree):
        stores = written(stmt)
        found += [
            a
            for a in find_all(stmt, cst.Attribute, lambda a: a.attr.value == attr and full_name(a.value) != "self")
            if id(a) not in stores and where(a)
        ]
    return found


def method_calls(tree: cst.Module, method: str, where: Callable[[cst.Call], bool] = lambda _: True) -> list[cst.Call]:
    """Calls `<expr>.method(...)` in the user's statements (not on `self`), for which `where` holds."""
    found = []
    for stmt in user_statements(tree):
        found += find_all(
            stmt,
            cst.Call,
            lambda c: (
                isinstance(c.func, cst.Attribute)
                and c.func.attr.value == method
                and full_name(c.func.value) != "self"
                and where(c)
            ),
        )
    return found


def refuse_by_name(tree: cst.Module, names: Sequence[str], why: str, arity: Sequence[int] = (2, 3)) -> None:
    """Refuse `getattr(X, "<name>"[, default])` for `names` in the user's statements: read by name, the patch
    cannot tell what the file relies on (`why`)."""
    for stmt in user_statements(tree):
        for call in find_all(stmt, cst.Call, lambda c: full_name(c.func) == "getattr" and len(c.args) in arity):
            if is_string(call.args[1].value) and call.args[1].value.evaluated_value in names:
                raise Unrecognised(f"`{code(call)}` reads {call.args[1].value.evaluated_value} by name; {why}")


def refuse_uncalled(tree: cst.Module, methods: Sequence[str], allowed: Callable[[cst.Call], bool] = lambda _: False):
    """Refuse `X.<method>` used other than called (`f = cache.to_legacy_cache`), except as an argument of a call
    for which `allowed` holds: the patch rewrites calls and cannot follow a method passed around."""
    for stmt in user_statements(tree):
        called = {id(c.func) for c in find_all(stmt, cst.Call)}
        called |= {id(a.value) for c in find_all(stmt, cst.Call, allowed) for a in c.args}
        for node in find_all(stmt, cst.Attribute, lambda a: a.attr.value in methods):
            if id(node) not in called and full_name(node.value) != "self":
                raise Unrecognised(f"`{code(node)}` is used other than called")


def helper_call(
    helper: str, leading: Sequence[cst.BaseExpression], like: cst.BaseExpression, rest: Sequence[cst.Arg] = ()
) -> cst.Call:
    """`helper(*leading, *rest)` in place of `like`, keeping its parentheses (and, for a call, the layout of its
    arguments `rest`)."""
    space = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
    arguments = [cst.Arg(value, comma=space) for value in leading] + list(rest)
    if not rest:
        arguments[-1] = arguments[-1].with_changes(comma=cst.MaybeSentinel.DEFAULT)
    before = like.whitespace_before_args if isinstance(like, cst.Call) else cst.SimpleWhitespace("")
    return cst.Call(
        func=cst.Name(helper), args=arguments, lpar=like.lpar, rpar=like.rpar, whitespace_before_args=before
    )


def calls_of(stmts: Sequence[cst.CSTNode], helpers: Sequence[str]) -> set[str]:
    """Which of `helpers` the statements call."""
    return {
        call.func.value
        for stmt in stmts
        for call in find_all(stmt, cst.Call, lambda c: isinstance(c.func, cst.Name) and c.func.value in helpers)
    }


def _wanted(tree: cst.Module, definitions: Mapping[str, str]) -> set[str]:
    """The helpers the user's statements call, and those these call."""
    wanted = calls_of(user_statements(tree), list(definitions))
    for helper in list(wanted):
        wanted |= {other for other in definitions if other != helper and f"{other}(" in definitions[helper]}
    return wanted


class _Replace(cst.CSTTransformer):
    """Each chosen node becomes `build(updated node)`; the innermost statement holding a change gets the marker."""

    def __init__(self, builds: dict[int, Build], name: str, why: str) -> None:
        super().__init__()
        self.builds, self.name, self.why = builds, name, why
        self.pending: list[int] = []  # per open statement: changes made in it and not in a statement inside it

    def on_visit(self, node: cst.CSTNode) -> bool:
        if isinstance(node, cst.BaseStatement):
            self.pending.append(0)
        return True

    def on_leave(self, original: cst.CSTNode, updated: cst.CSTNode):  # noqa: ANN201 (libcst's own union)
        build = self.builds.get(id(original))
        if build is not None:
            self.pending[-1] += 1
            return build(updated)
        if isinstance(original, cst.BaseStatement):
            changed = self.pending.pop()
            return with_marker(updated, self.name, self.why) if changed else updated
        return updated


def replace(tree: cst.Module, builds: dict[int, Build], name: str, why: str) -> cst.Module:
    """`tree` with each node whose id is in `builds` replaced by what its build gives for the rewritten node."""
    if not builds:
        return tree

    def targets(stmt: cst.BaseStatement) -> list[cst.CSTNode]:
        return find_all(stmt, cst.CSTNode, lambda n: id(n) in builds)

    return visit_statements(tree, _Replace(builds, name, why), targets)


def insert_helpers(tree: cst.Module, definitions: Mapping[str, str], name: str, why: str) -> cst.Module:
    """Each helper of `definitions` (name -> template) the file calls but lacks, above the first statement calling
    one (a helper that another helper calls is inserted with it)."""
    defined = {s.name.value for s in tree.body if isinstance(s, cst.FunctionDef)}
    missing = [helper for helper in definitions if helper in _wanted(tree, definitions) and helper not in defined]
    if not missing:
        return tree
    position = next(
        (i for i, stmt in enumerate(tree.body) if not inserted(stmt) and calls_of([stmt], missing)), len(tree.body)
    )
    added = [stmt for helper in missing for stmt in top_level_def(template(definitions[helper]), 2, name, why)]
    if position == 0:  # the file's first statement: no blank lines above it
        added[0] = added[0].with_changes(leading_lines=[line for line in added[0].leading_lines if line.comment])
    after = tree.body[position:]
    if after and not any(line.comment is None for line in after[0].leading_lines):  # two blank lines above it
        after = [after[0].with_changes(leading_lines=[cst.EmptyLine(indent=False)] * 2 + list(after[0].leading_lines))]
        after += tree.body[position + 1 :]
    return tree.with_changes(body=[*tree.body[:position], *added, *after])


def helpers_done(tree: cst.Module, definitions: Mapping[str, str]) -> bool:
    """Every helper of `definitions` that the file (or a helper it holds) calls is defined at top level."""
    defined = {s.name.value for s in tree.body if isinstance(s, cst.FunctionDef)}
    return _wanted(tree, definitions) <= defined


def helper_state(tree: cst.Module, uses: object, definitions: Mapping[str, str]) -> State:
    """The state of a patch that routes uses through helpers it adds: absent with neither a use nor a helper,
    done with no use left and its helpers as written here, else needed."""
    defined = {s.name.value for s in tree.body if isinstance(s, cst.FunctionDef)} & set(definitions)
    if not uses and not defined:
        return State.ABSENT
    return State.DONE if not uses and helpers_done(tree, definitions) else State.NEEDED
