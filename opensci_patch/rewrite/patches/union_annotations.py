"""union_annotations: `X | Y` annotations written as `Union[X, Y]`, which every release's docstring code reads.

transformers 4.57.6's `@auto_docstring` (`utils/auto_docstring.py`, `_process_parameter_type`) formats a
parameter's evaluated annotation: one whose `str()` contains "typing" is used as text, any other object
with a `__module__` is read as `f"{module}.{annotation.__name__}"`. A PEP 604 union (`int | torch.Tensor`,
`torch.Tensor | None`) is a `types.UnionType`: it has a `__module__` but no `__name__`, so decorating
the class or function raises `AttributeError: 'types.UnionType' object has no attribute '__name__'` when
the file is imported. `typing.Union[...]` and `Optional[...]` print as "typing.Union[...]" and take the
first branch; string annotations (`from __future__ import annotations`) have no `__module__` and pass;
`list[int]` has a `__name__`. 5.x reads annotations with its own `process_type_annotation`.
Annotations are not evaluated by the model's code, so the rewrite cannot change numerics.

Detects: annotations (parameters, returns, class fields such as a `ModelOutput` dataclass's) whose
outermost expression is `A | B`, in a file without `from __future__ import annotations`.
Rewrites: them to `Union[A, B]` (chains flattened), importing `Union` from `typing` when the file lacks it.
Verifies: no such annotation is left and `Union` is imported. A `Union` imported from elsewhere is refused.
"""

from __future__ import annotations

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State, Unrecognised
from opensci_patch.rewrite.patches.inserts import MARKER, with_marker
from opensci_patch.rewrite.patches.syntax import full_name
from opensci_patch.rewrite.patches.tree_walk import find_all, visit_statements

NAME = "union_annotations"
WHY = "transformers 4.57 @auto_docstring cannot read X | Y annotations"


def _future_annotations(tree: cst.Module) -> bool:
    return any(
        full_name(node.module) == "__future__"
        and not isinstance(node.names, cst.ImportStar)
        and any(full_name(a.name) == "annotations" for a in node.names)
        for node in find_all(tree, cst.ImportFrom)
    )


def _is_union(node: cst.BaseExpression) -> bool:
    return isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.BitOr)


def _unions(tree: cst.Module) -> list[cst.Annotation]:
    return find_all(tree, cst.Annotation, lambda a: _is_union(a.annotation))


def _union_import(tree: cst.Module) -> int | None:
    """Index of the top-level `from typing import ..., Union, ...` line, if any."""
    for i, stmt in enumerate(tree.body):
        if isinstance(stmt, cst.SimpleStatementLine):
            for small in stmt.body:
                if (
                    isinstance(small, cst.ImportFrom)
                    and full_name(small.module) == "typing"
                    and not isinstance(small.names, cst.ImportStar)
                    and any(full_name(a.name) == "Union" and a.asname is None for a in small.names)
                ):
                    return i
    return None


def _refuse_foreign_union(tree: cst.Module) -> None:
    """`Union` bound to something other than typing's: the rewritten annotations would name the wrong thing."""
    for node in find_all(tree, cst.ImportFrom):
        module = full_name(node.module) if node.module is not None else None
        if module in ("typing", "typing_extensions") or isinstance(node.names, cst.ImportStar):
            continue
        if any((a.asname and full_name(a.asname.name) == "Union") or (not a.asname and full_name(a.name) == "Union")
               for a in node.names):  # fmt: skip
            raise Unrecognised(f"`Union` is imported from {'.' * len(node.relative)}{module or ''}, not from typing")


def inspect(tree: cst.Module) -> State:
    if _future_annotations(tree):
        return State.ABSENT
    if _unions(tree):
        _refuse_foreign_union(tree)
        return State.NEEDED
    # the marker sits on the `typing` import (in the module header when that import opens the file)
    mark = f"{MARKER} {NAME} ("
    marked = find_all(tree, cst.Comment, lambda c: c.value.startswith(mark))
    rewritten = _union_import(tree) is not None and bool(marked)
    return State.DONE if rewritten else State.ABSENT


def _members(node: cst.BaseExpression) -> list[cst.BaseExpression]:
    """The operands of `A | B | C` (parenthesised sub-unions flattened), without their parentheses."""
    if _is_union(node):
        return [*_members(node.left), *_members(node.right)]
    return [node.with_changes(lpar=[], rpar=[])] if getattr(node, "lpar", None) else [node]


class _Rewrite(cst.CSTTransformer):
    def leave_Annotation(self, original: cst.Annotation, updated: cst.Annotation) -> cst.Annotation:
        if not _is_union(updated.annotation):
            return updated
        members = _members(updated.annotation)
        comma = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
        elements = [cst.SubscriptElement(cst.Index(m), comma=comma) for m in members[:-1]]
        elements.append(cst.SubscriptElement(cst.Index(members[-1])))
        return updated.with_changes(annotation=cst.Subscript(cst.Name("Union"), elements))


def rewrite(tree: cst.Module) -> cst.Module:
    tree = visit_statements(tree, _Rewrite(), _unions)
    body = list(tree.body)
    at = _union_import(tree)
    if at is not None:  # the marker goes on the import the rewritten annotations use
        body[at] = with_marker(body[at], NAME, WHY)
        return tree.with_changes(body=body)
    line = with_marker(cst.parse_statement("from typing import Union\n"), NAME, WHY)
    at = next(  # before the first import that is not from __future__ (so after the docstring)
        (
            i
            for i, stmt in enumerate(body)
            if isinstance(stmt, cst.SimpleStatementLine)
            and any(isinstance(s, (cst.Import, cst.ImportFrom)) for s in stmt.body)
            and not any(isinstance(s, cst.ImportFrom) and full_name(s.module) == "__future__" for s in stmt.body)
        ),
        0,
    )
    return tree.with_changes(body=[*body[:at], line, *body[at:]])


PATCH = Patch(
    name=NAME,
    order=15,
    description="write X | Y annotations as typing.Union[X, Y] (4.57's @auto_docstring reads annotation.__name__)",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
