"""post_init: every model class's `__init__` ends with `self.post_init()`.

transformers 5.x sets `all_tied_weights_keys` (and the tie plan) in `PreTrainedModel.post_init` and
reads it while loading: a model class whose `__init__` never calls `self.post_init()` fails to load on
every 5.x with `AttributeError: ... all_tied_weights_keys`. 4.x tolerated it: `from_pretrained` ties
the weights itself after loading, and the weight initialisation `post_init` would run is switched off
while loading (`no_init_weights`), so on 4.48 the added call only ties the embeddings one step earlier:
the loaded tensors, and so the logits, are the same bits.

Detects: classes deriving (directly, or through a class of this file) from a base named
`PreTrainedModel` whose `__init__` has no `self.post_init()` call, except a class that another class of
this file extends with its own `__init__` (there the call belongs at the end of the subclass's).
Rewrites: appends `self.post_init()` to such an `__init__`.
Verifies: every such `__init__` calls `self.post_init()`.
"""

from __future__ import annotations

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State, Unrecognised
from opensci_patch.rewrite.patches.inserts import template, with_block, with_marker
from opensci_patch.rewrite.patches.syntax import full_name, method
from opensci_patch.rewrite.patches.tree_walk import find_all, visit_statements

NAME = "post_init"
WHY = "transformers 5.x sets all_tied_weights_keys there"


def model_classes(tree: cst.Module) -> list[cst.ClassDef]:
    """Top-level classes deriving from `PreTrainedModel` (by that name, or through a class of this file)."""
    found: dict[str, cst.ClassDef] = {}
    classes = [s for s in tree.body if isinstance(s, cst.ClassDef)]
    changed = True
    while changed:
        changed = False
        for cls in classes:
            if cls.name.value in found:
                continue
            bases = [(full_name(b.value) or "").split(".")[-1] for b in cls.bases]
            if any(b == "PreTrainedModel" or b in found for b in bases):
                found[cls.name.value] = cls
                changed = True
    return [c for c in classes if c.name.value in found]


def _calls_post_init(init: cst.FunctionDef) -> bool:
    return bool(find_all(init, cst.Call, lambda c: full_name(c.func) == "self.post_init"))


def _targets(tree: cst.Module) -> list[tuple[cst.ClassDef, cst.FunctionDef]]:
    """(class, __init__) of the model classes whose constructor should end with post_init."""
    models = model_classes(tree)
    extended = {
        (full_name(b.value) or "").split(".")[-1] for c in models if method(c, "__init__") is not None for b in c.bases
    }
    out = []
    for cls in models:
        init = method(cls, "__init__")
        if init is not None and cls.name.value not in extended:
            out.append((cls, init))
    return out


def inspect(tree: cst.Module) -> State:
    targets = _targets(tree)
    if not targets:
        return State.ABSENT
    for cls, init in targets:
        if not isinstance(init.body, cst.IndentedBlock):
            raise Unrecognised(f"{cls.name.value}.__init__ is a one-line body")
    return State.DONE if all(_calls_post_init(init) for _, init in targets) else State.NEEDED


def rewrite(tree: cst.Module) -> cst.Module:
    inits = [init for _, init in _targets(tree) if not _calls_post_init(init)]
    todo = {id(init) for init in inits}
    call = template("self.post_init()\n")[0]

    class Append(cst.CSTTransformer):
        def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
            if id(original) not in todo:
                return updated
            return with_block(updated, [*updated.body.body, with_marker(call, NAME, WHY)])

    return visit_statements(tree, Append(), lambda stmt: find_all(stmt, cst.FunctionDef, lambda f: id(f) in todo))


PATCH = Patch(
    name=NAME,
    order=64,
    description="end every model class's __init__ with self.post_init() (5.x sets all_tied_weights_keys there)",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
