"""rope_theta: transformers 5.x library configs keep `rope_theta` only inside `config.rope_parameters`.

A model file of the 4.4x era that builds on a library config class (e.g. `LlamaConfig`) reads
`config.rope_theta`; on 5.x such a config has no `rope_theta` attribute (measured on 5.24:
`LlamaConfig(rope_theta=5e5)` has `rope_parameters == {"rope_theta": 500000.0, "rope_type": "default"}`
and no attribute), so loading raises AttributeError. (A custom config class that sets
`self.rope_theta` itself still has it, and is read as before.)

Rewrites: every read `X.rope_theta` becomes `_opensci_rope_theta(X)`, inserted once at module level:
the attribute where the config has it (every 4.x config, custom ones on 5.x), else
`X.rope_parameters["rope_theta"]`, else the same AttributeError as before. Same value, same type:
the bits of anything computed from it do not change. Only reads are rewritten: assignments
(`self.rope_theta = rope_theta` in a configuration file), `del` and augmented assignments are left
alone, and so is `self.rope_theta` (an object reading what it stored itself).

Refuses `getattr(X, "rope_theta", ...)` outside the functions opensci-patch inserts: with a default it
would silently give the default on 5.x instead of the configured value, so it needs a human.

A default patch, although neither the shipped nor the generated open-sci file reads `rope_theta` (it is
not applicable to them, and leaves their output unchanged): remote code of the same era written by others
does, and `hotfix` should make it load without the user knowing which patch to ask for. It runs before
`rope_default`, whose inlined init reads `rope_theta` by `getattr` with its own fallback.

Detects: reads of a `.rope_theta` attribute other than on `self`. Verifies: every such read goes
through the helper and the helper is defined at module level.
"""

from __future__ import annotations

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State, Unrecognised
from opensci_patch.rewrite.patches.helper_calls import inserted, written
from opensci_patch.rewrite.patches.inserts import template, top_level_def, with_marker
from opensci_patch.rewrite.patches.syntax import code, full_name, is_string, top_functions
from opensci_patch.rewrite.patches.tree_walk import find_all, visit_statements

NAME = "rope_theta"
HELPER = "_opensci_rope_theta"
WHY = "transformers 5.x configs keep rope_theta in rope_parameters"

DEFINITION = f'''
def {HELPER}(config):
    """`config.rope_theta`, or where the config keeps it only in `rope_parameters` (5.x library configs), from there."""
    if not hasattr(config, "rope_theta"):
        rope_parameters = getattr(config, "rope_parameters", None)
        if isinstance(rope_parameters, dict) and "rope_theta" in rope_parameters:
            return rope_parameters["rope_theta"]
    return config.rope_theta
'''


def _reads(node: cst.CSTNode) -> list[cst.Attribute]:
    if isinstance(node, cst.Module):
        return [read for stmt in node.body for read in _reads(stmt)]
    if inserted(node):  # e.g. this patch's helper, which reads the attribute on purpose
        return []
    stores = written(node)
    return find_all(
        node,
        cst.Attribute,
        lambda a: a.attr.value == "rope_theta" and id(a) not in stores and full_name(a.value) != "self",
    )


def _refuse_getattr(tree: cst.Module) -> None:
    for stmt in tree.body:
        if inserted(stmt):
            continue  # e.g. rope_default's, which falls back to rope_parameters itself
        for call in find_all(stmt, cst.Call, lambda c: full_name(c.func) == "getattr" and len(c.args) >= 2):
            if is_string(call.args[1].value, "rope_theta"):
                raise Unrecognised(f"`{code(call)}` reads rope_theta by name; on 5.x a library config has none")


def inspect(tree: cst.Module) -> State:
    _refuse_getattr(tree)
    reads = _reads(tree)
    defined = HELPER in top_functions(tree)
    if not reads and not defined:
        return State.ABSENT
    return State.NEEDED if reads or not defined else State.DONE


class _Wrap(cst.CSTTransformer):
    def __init__(self, reads: list[cst.Attribute]) -> None:
        super().__init__()
        self.reads = {id(a) for a in reads}
        self.changes = 0
        self.stack: list[int] = []

    def leave_Attribute(self, original: cst.Attribute, updated: cst.Attribute) -> cst.BaseExpression:
        if id(original) not in self.reads:
            return updated
        self.changes += 1
        return cst.Call(
            func=cst.Name(HELPER),
            args=[cst.Arg(updated.value)],
            lpar=updated.lpar,
            rpar=updated.rpar,
        )

    def visit_SimpleStatementLine(self, node: cst.SimpleStatementLine) -> None:
        self.stack.append(self.changes)

    def leave_SimpleStatementLine(
        self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine
    ) -> cst.BaseStatement:
        return with_marker(updated, NAME, WHY) if self.stack.pop() != self.changes else updated


def rewrite(tree: cst.Module) -> cst.Module:
    reads = {id(stmt): _reads(stmt) for stmt in tree.body}
    position = next((i for i, stmt in enumerate(tree.body) if reads[id(stmt)]), len(tree.body))
    tree = visit_statements(tree, _Wrap([a for found in reads.values() for a in found]), lambda s: reads[id(s)])
    if HELPER in top_functions(tree):
        return tree
    definition = top_level_def(template(DEFINITION), 2, NAME, WHY)
    return tree.with_changes(body=[*tree.body[:position], *definition, *tree.body[position:]])


PATCH = Patch(
    name=NAME,
    order=40,
    description="read rope_theta through rope_parameters where a 5.x library config has no such attribute",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
