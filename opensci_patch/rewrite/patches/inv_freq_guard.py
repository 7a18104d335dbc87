"""inv_freq_guard: make the rotary `inv_freq` buffer hold the right values after loading.

transformers 5.x builds the model on the meta device and re-creates every non-persistent
buffer with `torch.empty_like`: uninitialised memory, usually zeros but sometimes garbage
such as 8192 or -3.2e8, changing from run to run. A guard `if not inv_freq.any()` lets the
non-zero garbage through, so the patch compares with recomputed values, in two places:

(a) `_init_weights` of the pretrained-model class starts with a branch for the rotary class
    that recomputes the frequencies with the module's own `rope_init_fn`, copies them into the
    buffer and returns (5.x runs `_init_weights` for modules whose buffers were not loaded;
    upstream also prefers fixing the model's own `_init_weights`, PR #48932). Returning keeps
    the module away from 5.x's base `_init_weights`, whose rotary branch needs a
    `compute_default_rope_parameters` method this code does not have. Without an
    `_init_weights` of its own, the class gets one: the branch, then `super()._init_weights`;
(b) the rotary `forward` first calls `_opensci_check_inv_freq`, which lazily computes the
    expected values on CPU in float32 (as `__init__` does), and if the buffer is not exactly
    equal (`torch.equal`; a buffer downcast by `model.to(dtype)` is not) replaces it and warns
    once. It is computed lazily in `forward`, never in `__init__`, which 5.x runs on meta.
    A buffer found correct is remembered (the tensor itself, its version counter and data
    pointer), so later forwards skip the comparison, and with it a host-device copy and sync
    per forward on a GPU, until the buffer is replaced (`model.to`, loading), written in place
    (`copy_`, `zero_`) or given new storage (`.data =`). Inference tensors keep no version
    counter: a buffer made under `torch.inference_mode()` is compared at every forward.
    Dynamic and longrope rotary types change `inv_freq` at run time on purpose, so (b) leaves
    them alone and only (a) applies to them.

Detects: classes with a method that registers an `inv_freq` buffer (any class name; `__init__` or a
helper it calls) and have `self.rope_init_fn`, `self.config` and a `forward` (the 4.48 shape: (a) and (b)),
and the class that defines `_init_weights` (or else the one deriving from `PreTrainedModel`). Every other class
registering a non-persistent buffer (4.3x-era rotary classes computing `inv_freq` from `base`/`dim`, cos/sin
caches, masks) gets the general mechanism of `init_buffers`: its `__init__` re-run on CPU with the arguments it
had. A class neither handles is refused for that class only (`base.refuse`); a registration outside the methods
of a top-level class is refused for the file.
Verifies: each rotary forward starts with the check, the check method exists, and each
`_init_weights` has an `isinstance(module, <rotary class>)` branch that copies into `inv_freq`; for the general
classes, `init_buffers.members_done` and their `_init_weights` branches.
"""

from __future__ import annotations

import libcst as cst

from opensci_patch.rewrite.patches import init_buffers
from opensci_patch.rewrite.patches.base import Patch, State, Unrecognised
from opensci_patch.rewrite.patches.init_buffers import is_buffer_registration
from opensci_patch.rewrite.patches.inserts import marker, parsed, template, template_members, with_block
from opensci_patch.rewrite.patches.syntax import (
    docstring_offset,
    full_name,
    is_string,
    method,
    require_torch,
    self_assignments,
)
from opensci_patch.rewrite.patches.tree_walk import find_all
from opensci_patch.rewrite.templates import section

NAME = "inv_freq_guard"
CHECK = "_opensci_check_inv_freq"
WHY = "transformers 5.x leaves non-persistent buffers uninitialised after loading"

CHECK_METHOD = section("inv_freq_check", "check")  # class _Template: def {CHECK}(self...)

CHECK_CALL = f"self.{CHECK}()\n"

BRANCH = """
def _template(module):
    if isinstance({module}, {rotary}):
        with torch.no_grad():
            {module}.inv_freq.copy_({module}.rope_init_fn({module}.config, torch.device("cpu"))[0])
        return
"""

INIT_METHOD = """
class _Template:
    def _init_weights(self, module):
        super()._init_weights(module)
"""


def _is_inv_freq_registration(call: cst.Call) -> bool:
    """`<anything>.register_buffer("inv_freq", ...)` (or `name="inv_freq"`)."""
    name = full_name(call.func) or ""
    if not name.endswith("register_buffer") or not call.args:
        return False
    named = [a.value for a in call.args if a.keyword is not None and a.keyword.value == "name"]
    return is_string(named[0] if named else call.args[0].value, "inv_freq")


def _registers_inv_freq(func: cst.FunctionDef) -> bool:
    return bool(find_all(func, cst.Call, lambda call: full_name(call.func) == "self.register_buffer"
                         and _is_inv_freq_registration(call)))  # fmt: skip


def _registers_other_buffers(func: cst.FunctionDef) -> bool:
    return bool(find_all(func, cst.Call, lambda call: full_name(call.func) == "self.register_buffer"
                         and is_buffer_registration(call) and not _is_inv_freq_registration(call)))  # fmt: skip


def _methods(cls: cst.ClassDef) -> list[cst.FunctionDef]:
    return [stmt for stmt in cls.body.body if isinstance(stmt, cst.FunctionDef)]


def rotary_classes(tree: cst.Module) -> list[cst.ClassDef]:
    """Top-level classes of the 4.48 shape: a method registers `inv_freq` (`__init__` or a helper it calls), and
    none another non-persistent buffer; `self.rope_init_fn`, `self.config` and a `forward`. (a) and (b) above.

    Every other class registering a non-persistent buffer is `init_buffers`' (an `inv_freq` from `base`/`dim`,
    cos/sin caches). A registration anywhere else (a module-level function, a nested class) is `Unrecognised`:
    "not applicable" must mean the file has no such buffer, never "the pattern did not match".
    """
    found = []
    for cls in (s for s in tree.body if isinstance(s, cst.ClassDef)):
        methods = _methods(cls)
        if not any(_registers_inv_freq(m) for m in methods) or any(_registers_other_buffers(m) for m in methods):
            continue
        assigned: dict[str, cst.BaseExpression] = {}
        for m in methods:
            assigned |= self_assignments(m)
        if all(a in assigned for a in ("rope_init_fn", "config")) and method(cls, "forward") is not None:
            found.append(cls)
    classes = [s for s in tree.body if isinstance(s, cst.ClassDef)]
    for what, matches in (("inv_freq", _is_inv_freq_registration), ("a non-persistent buffer", is_buffer_registration)):
        on_self = lambda c, matches=matches: full_name(c.func) == "self.register_buffer" and matches(c)  # noqa: E731
        in_classes = sum(len(find_all(m, cst.Call, on_self)) for cls in classes for m in _methods(cls))
        if len(find_all(tree, cst.Call, matches)) != in_classes:
            raise Unrecognised(f"{what} is registered outside the methods of a top-level class")
    return found


def init_classes(tree: cst.Module) -> list[cst.ClassDef]:
    """Classes defining `_init_weights`; else the ones deriving directly from transformers' PreTrainedModel."""
    classes = [s for s in tree.body if isinstance(s, cst.ClassDef)]
    defining = [c for c in classes if method(c, "_init_weights") is not None]
    if defining:
        return defining
    local = {c.name.value for c in classes}
    pretrained = [
        c
        for c in classes
        if any((full_name(b.value) or "").split(".")[-1] == "PreTrainedModel" for b in c.bases)
        and "PreTrainedModel" not in local
    ]
    if not pretrained:
        raise Unrecognised("no class defines _init_weights or derives from PreTrainedModel")
    return pretrained


def _module_param(func: cst.FunctionDef) -> str:
    params = func.params.params
    if len(params) < 2:
        raise Unrecognised("_init_weights does not take a module argument")
    return params[1].name.value


def _has_branch(func: cst.FunctionDef, rotary: str) -> bool:
    """An `if isinstance(<module>, <rotary>)` statement in the body that copies into `inv_freq`."""
    module = _module_param(func)
    for stmt in func.body.body:
        if not (isinstance(stmt, cst.If) and isinstance(stmt.test, cst.Call)):
            continue
        if full_name(stmt.test.func) != "isinstance" or len(stmt.test.args) != 2:
            continue
        if full_name(stmt.test.args[0].value) != module or full_name(stmt.test.args[1].value) != rotary:
            continue
        if find_all(stmt.body, cst.Call, lambda call: full_name(call.func) == f"{module}.inv_freq.copy_"):
            return True
    return False


def _starts_with_check(forward: cst.FunctionDef) -> bool:
    body = forward.body.body
    start = docstring_offset(body)
    return (
        len(body) > start
        and isinstance(body[start], cst.SimpleStatementLine)
        and body[start].body[0].deep_equals(parsed(CHECK_CALL)[0].body[0])
    )


def _forward_checks(cls: cst.ClassDef) -> bool:
    forward = method(cls, "forward")
    return method(cls, CHECK) is not None and forward is not None and _starts_with_check(forward)


def _found(tree: cst.Module) -> tuple[list[cst.ClassDef], list[init_buffers.Family]]:
    rotaries = rotary_classes(tree)
    return rotaries, init_buffers.families(tree, {c.name.value for c in rotaries})


def inspect(tree: cst.Module) -> State:
    rotaries, families = _found(tree)
    if not rotaries and not families:
        return State.ABSENT
    if not all(_forward_checks(cls) for cls in rotaries) or not init_buffers.members_done(tree, families):
        return State.NEEDED
    for cls in init_classes(tree):
        init = method(cls, "_init_weights")
        if init is None or not all(_has_branch(init, r.name.value) for r in rotaries):
            return State.NEEDED
        if not all(init_buffers.has_branch(init, _module_param(init), f.root) for f in families):
            return State.NEEDED
    return State.DONE


def _with_check(cls: cst.ClassDef) -> cst.ClassDef:
    members = []
    for member in cls.body.body:
        if isinstance(member, cst.FunctionDef) and member.name.value == "forward" and not _starts_with_check(member):
            call = template(CHECK_CALL)[0].with_changes(leading_lines=[marker(NAME, WHY)])
            body = list(member.body.body)
            at = docstring_offset(body)
            member = with_block(member, [*body[:at], call, *body[at:]])
        members.append(member)
    if method(cls, CHECK) is None:
        check = template_members(CHECK_METHOD)[0]
        members.append(check.with_changes(leading_lines=[cst.EmptyLine(indent=False)]))
    return with_block(cls, members)


def _branches(module: str, rotaries: list[str]) -> list[cst.BaseStatement]:
    out = []
    for rotary in rotaries:
        branch = template_members(BRANCH.format(module=module, rotary=rotary))[0]
        out.append(branch.with_changes(leading_lines=[marker(NAME, WHY)]))
    return out


def _with_branches(cls: cst.ClassDef, rotaries: list[str], roots: list[str]) -> cst.ClassDef:
    members = list(cls.body.body)
    existing = method(cls, "_init_weights")
    if existing is None:
        added = template_members(INIT_METHOD)[0]
        members.append(added.with_changes(leading_lines=[cst.EmptyLine(indent=False)]))
    for i, member in enumerate(members):
        if isinstance(member, cst.FunctionDef) and member.name.value == "_init_weights":
            module = _module_param(member)
            missing = [r for r in rotaries if not _has_branch(member, r)]
            general = [r for r in roots if not init_buffers.has_branch(member, module, r)]
            body = list(member.body.body)
            at = docstring_offset(body)
            body[at:at] = [*_branches(module, missing), *init_buffers.branches(module, general)]
            members[i] = with_block(member, body)
    return with_block(cls, members)


def rewrite(tree: cst.Module) -> cst.Module:
    require_torch(tree)
    found, families = _found(tree)
    rotaries = {id(c): c for c in found}
    owners = {id(c) for c in init_classes(tree)}
    names = [c.name.value for c in rotaries.values()]
    roots = [f.root for f in families]
    members = {m: f.root == m for f in families for m in f.members}  # name -> whether it is its family's root

    def fixed(stmt: cst.BaseStatement) -> cst.BaseStatement:
        stmt = _with_check(stmt) if id(stmt) in rotaries else stmt
        if isinstance(stmt, cst.ClassDef) and stmt.name.value in members:
            stmt = init_buffers.patched_member(stmt, members[stmt.name.value])
        return _with_branches(stmt, names, roots) if id(stmt) in owners else stmt

    return tree.with_changes(body=[fixed(stmt) for stmt in tree.body])


PATCH = Patch(
    name=NAME,
    order=80,
    description="recompute non-persistent buffers (rotary inv_freq, cos/sin caches) in _init_weights and check "
    "them at the top of forward",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
