"""rope_scaling: on transformers 5.x `config.rope_scaling` is never None.

A 4.3x-era model file tests `if config.rope_scaling is None:` and otherwise reads
`config.rope_scaling["type"]` and `["factor"]`. On 5.x a config whose `rope_scaling` is null (config.json)
or unset gives `{"rope_theta": ..., "rope_type": "default"}` (measured on 5.0.0 and 5.25.0, for a library
`LlamaConfig` and for a custom config class setting `self.rope_scaling = None` alike), so the file takes the
scaled branch and raises `KeyError: 'type'` on every 5.x.

Applies to a file that indexes a rope_scaling value with a key the default dict lacks (`X.rope_scaling["type"]`,
or `name["factor"]` for a name assigned from `X.rope_scaling`). Rewrites: every read `X.rope_scaling` (not on
`self`, not a store) becomes `_opensci_rope_scaling(X)`, inserted
once at module level: the attribute, except that a dict whose `rope_type` (or `type`) is "default" reads as
None, which is what the file meant by "no scaling". Any other value, a real scaling dict included, is returned
as it is. 4.x gives None there already, so nothing changes on 4.x.

Not applicable to the shipped file (it reads `config.rope_scaling.get("rope_type", ...)`, which the default dict
answers as 4.x's None did) nor to the generated one. Detects: that indexing, and reads of `.rope_scaling`
other than on `self`; refuses `getattr(X, "rope_scaling", ...)` in such a file. Verifies: each read goes
through the helper, which is defined at module level.
"""

from __future__ import annotations

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State
from opensci_patch.rewrite.patches.helper_calls import (
    attribute_reads,
    helper_call,
    helpers_done,
    insert_helpers,
    refuse_by_name,
    replace,
    user_statements,
)
from opensci_patch.rewrite.patches.syntax import full_name, is_string
from opensci_patch.rewrite.patches.tree_walk import find_all

NAME = "rope_scaling"
HELPER = "_opensci_rope_scaling"
WHY = "transformers 5.x gives a default rope_scaling dict where 4.x gave None"
DEFINITIONS = {
    HELPER: f'''
def {HELPER}(config):
    """`config.rope_scaling`, None where it only names the default rope (5.x: never None)."""
    rope_scaling = config.rope_scaling
    if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
        return None
    return rope_scaling
'''
}


OLD_KEYS_OK = ("rope_type", "rope_theta")  # the keys 5.x's default dict has


def _indexed(tree: cst.Module) -> bool:
    """Whether the file indexes a rope_scaling value with a key 5.x's default dict lacks (`["type"]`, `["factor"]`):
    `X.rope_scaling[key]`, or `name[key]` for a name assigned from `X.rope_scaling` in the same statement block."""
    for stmt in user_statements(tree):
        bound = {
            full_name(target.target)
            for assign in find_all(stmt, cst.Assign)
            if isinstance(assign.value, cst.Attribute) and assign.value.attr.value == "rope_scaling"
            for target in assign.targets
        }
        for node in find_all(stmt, cst.Subscript):
            owner = full_name(node.value) or ""
            if owner.split(".")[-1] != "rope_scaling" and owner not in bound:
                continue
            keys = [e.slice.value for e in node.slice if isinstance(e.slice, cst.Index)]
            if any(is_string(key) and key.evaluated_value not in OLD_KEYS_OK for key in keys):
                return True
    return False


def inspect(tree: cst.Module) -> State:
    """Needed where the file indexes rope_scaling with a 4.x key and reads a config's rope_scaling unguarded;
    the shipped file reads it only through `.get(...)`, which the default dict answers correctly."""
    reads = attribute_reads(tree, "rope_scaling")
    if _indexed(tree):
        refuse_by_name(tree, ["rope_scaling"], "on 5.x it is never None")
    if reads and _indexed(tree):
        return State.NEEDED
    if HELPER in {s.name.value for s in tree.body if isinstance(s, cst.FunctionDef)}:
        return State.DONE if not reads and helpers_done(tree, DEFINITIONS) else State.NEEDED
    return State.ABSENT


def _wrap(node: cst.Attribute) -> cst.Call:
    return helper_call(HELPER, [node.value], node)


def rewrite(tree: cst.Module) -> cst.Module:
    builds = {id(read): _wrap for read in attribute_reads(tree, "rope_scaling")}
    return insert_helpers(replace(tree, builds, NAME, WHY), DEFINITIONS, NAME, WHY)


PATCH = Patch(
    name=NAME,
    order=42,
    description="read rope_scaling as None where 5.x gives the default-rope dict",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
