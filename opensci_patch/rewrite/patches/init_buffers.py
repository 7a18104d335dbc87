"""The general half of `inv_freq_guard`: every non-persistent buffer a module computes in `__init__`, restored by
running that `__init__` again.

transformers 5.x builds the model on the meta device and, after loading, re-creates every non-persistent buffer
with `torch.empty_like`: uninitialised memory. `inv_freq_guard` handles the 4.48-style rotary class (an
`inv_freq` made by `self.rope_init_fn`) with its own formula; every other class that registers a non-persistent
buffer (`register_buffer(..., persistent=False)`: `inv_freq = 1 / base ** (arange(0, dim, 2) / dim)` in
`__init__`, `cos_cached`/`sin_cached` built by a `_set_cos_sin_cache` helper, a causal-mask buffer...) is handled
here, without reading the formula at all:

(a) `__init__` first records its arguments and the default dtype it runs under
    (`self.__dict__.setdefault("_opensci_init_args", ((a, b, *args), {"k": k, **kwargs}, dtype))`; the
    outermost `__init__` of a subclass chain records, so the most derived class's own arguments are kept);
(b) `_opensci_check_buffers()` builds the module once more, on CPU, with those arguments, under that default
    dtype and with the random state put back afterwards (`torch.random.fork_rng`), and compares each
    non-persistent buffer with the one the fresh module got: same shape but not `torch.equal` (or another
    dtype) -> replaced, with one warning. A buffer of another shape is the module's own later work (a cos/sin
    cache grown in `forward`) and is left alone. A set found right is remembered (each tensor, its version
    counter and data pointer) and not compared again until one is replaced or written;
(c) it runs at the top of the class's `forward` (and of each subclass's in the file), and from the model's
    `_init_weights` (`if isinstance(module, <class>): module._opensci_check_buffers(warn=False)`), which 5.x runs
    after loading for modules whose buffers were not loaded (there the repair is expected: no warning).

On 4.48 (built on CPU, not on meta) the buffers are what the fresh module computes, so nothing changes. The
cost: one more construction of each such module (on its first forward or `_init_weights`); for a class that
holds large layers as well (an attention with a mask buffer) that is those layers' size once more, on CPU.

Not covered: persistent buffers (a 4.30-era `register_buffer("inv_freq", t)` comes from the checkpoint, or is a
missing weight), tensors kept as plain attributes (`self.x = torch...` in `__init__`), and a fresh module built
onto meta (accelerate's `init_empty_weights(include_buffers=True)`): then nothing is compared until a later check.

Refused, each for its class only (`base.refuse`): a class deriving from a `PreTrainedModel` (rebuilding it
would rebuild the model), a class without `__init__` (a parent's, not in this file, computes the buffers) or
without `forward` (nothing to check them in).
"""

from __future__ import annotations

from dataclasses import dataclass

import libcst as cst

from opensci_patch.rewrite.patches.base import refuse
from opensci_patch.rewrite.patches.inserts import marker, parsed, template, template_members, with_block
from opensci_patch.rewrite.patches.syntax import docstring_offset, full_name, is_string, method
from opensci_patch.rewrite.patches.tree_walk import find_all
from opensci_patch.rewrite.templates import section

NAME = "inv_freq_guard"
WHY = "transformers 5.x leaves non-persistent buffers uninitialised after loading"
CHECK = "_opensci_check_buffers"
ARGS = "_opensci_init_args"
CHECK_CALL = f"self.{CHECK}()\n"

CHECK_METHOD = section("buffers_check", "check")  # class _Template: def {CHECK}(self...)

BRANCH = """
def _template(module):
    if isinstance({module}, {cls}):
        {module}.{check}(warn=False)
"""


@dataclass(frozen=True)
class Family:
    """A class that registers non-persistent buffers (`root`, which gets the check method) and its subclasses in
    the file (each records its `__init__` arguments and checks at the top of its `forward`)."""

    root: str
    members: tuple[str, ...]


def is_buffer_registration(call: cst.Call) -> bool:
    """`<x>.register_buffer(...)` of a non-persistent buffer (`persistent=` anything but `True`) or of `inv_freq`."""
    name = full_name(call.func) or ""
    if not name.endswith("register_buffer") or not call.args:
        return False
    named = {a.keyword.value: a.value for a in call.args if a.keyword is not None}
    positional = [a.value for a in call.args if a.keyword is None]
    first = named.get("name", positional[0] if positional else None)
    if first is not None and is_string(first, "inv_freq"):
        return True
    at = 3 if name != "self.register_buffer" else 2  # nn.Module.register_buffer(self, name, tensor, persistent)
    flag = named.get("persistent", positional[at] if len(positional) > at else None)
    return flag is not None and full_name(flag) != "True"


def _registers(func: cst.FunctionDef) -> bool:
    return bool(find_all(func, cst.Call, lambda c: full_name(c.func) == "self.register_buffer"
                         and is_buffer_registration(c)))  # fmt: skip


def registering_classes(tree: cst.Module) -> list[cst.ClassDef]:
    """Top-level classes with a method that registers a non-persistent buffer (or `inv_freq`) on `self`."""
    classes = [s for s in tree.body if isinstance(s, cst.ClassDef)]
    return [c for c in classes if any(_registers(m) for m in c.body.body if isinstance(m, cst.FunctionDef))]


def _ancestors(cls: cst.ClassDef, local: dict[str, cst.ClassDef]) -> list[str]:
    """Base-class names of `cls`, following the classes of this file (last name part only)."""
    out, todo = [], [cls]
    while todo:
        for base in todo.pop().bases:
            name = (full_name(base.value) or "").split(".")[-1]
            if name and name not in out:
                out.append(name)
                if name in local:
                    todo.append(local[name])
    return out


def families(tree: cst.Module, skip: set[str]) -> list[Family]:
    """The families of the registering classes not in `skip` (those `inv_freq_guard` handles by formula); a class it
    cannot handle is refused (`base.refuse`), the others are returned."""
    local = {s.name.value: s for s in tree.body if isinstance(s, cst.ClassDef)}
    registering = {c.name.value for c in registering_classes(tree)} - skip
    found = []
    for cls in (c for c in local.values() if c.name.value in registering):
        name, ancestors = cls.name.value, _ancestors(cls, local)
        if any(a in registering for a in ancestors):
            continue  # a subclass of another registering class: a member of that family
        why = None
        if "PreTrainedModel" in ancestors:
            why = "derives from PreTrainedModel (recomputing its buffers would rebuild the model)"
        elif method(cls, "__init__") is None:
            why = "defines no __init__ (the buffers come from a parent's, not in this file)"
        elif method(cls, "forward") is None:
            why = "has no forward method to check them in"
        if why is not None:
            refuse(f"{name} registers non-persistent buffers but {why}; they are left as they are")
            continue
        members = [n for n, c in local.items() if n == name or name in _ancestors(c, local)]
        found.append(Family(name, tuple(members)))
    return found


def record_line(init: cst.FunctionDef) -> str:
    """The statement that records `__init__`'s arguments (all but `self`) and the default dtype."""
    p = init.params
    positional = [x.name.value for x in [*p.posonly_params, *p.params][1:]]
    if isinstance(p.star_arg, cst.Param):
        positional.append(f"*{p.star_arg.name.value}")
    keywords = [f'"{x.name.value}": {x.name.value}' for x in p.kwonly_params]
    if p.star_kwarg is not None:
        keywords.append(f"**{p.star_kwarg.name.value}")
    args = f"({', '.join(positional)}{',' if len(positional) == 1 else ''})"
    return f'self.__dict__.setdefault("{ARGS}", ({args}, {{{", ".join(keywords)}}}, torch.get_default_dtype()))\n'


def _starts_with(func: cst.FunctionDef, line: str) -> bool:
    body = func.body.body
    at = docstring_offset(body)
    return (
        len(body) > at
        and isinstance(body[at], cst.SimpleStatementLine)
        and body[at].body[0].deep_equals(parsed(line)[0].body[0])
    )


def _member_done(cls: cst.ClassDef, root: bool) -> bool:
    init, forward = method(cls, "__init__"), method(cls, "forward")
    return (
        (not root or method(cls, CHECK) is not None)
        and (init is None or _starts_with(init, record_line(init)))
        and (forward is None or _starts_with(forward, CHECK_CALL))
    )


def members_done(tree: cst.Module, found: list[Family]) -> bool:
    local = {s.name.value: s for s in tree.body if isinstance(s, cst.ClassDef)}
    return all(_member_done(local[m], m == f.root) for f in found for m in f.members)


def _prepend(func: cst.FunctionDef, line: str) -> cst.FunctionDef:
    if _starts_with(func, line):
        return func
    stmt = template(line)[0].with_changes(leading_lines=[marker(NAME, WHY)])
    body = list(func.body.body)
    at = docstring_offset(body)
    return with_block(func, [*body[:at], stmt, *body[at:]])


def patched_member(cls: cst.ClassDef, root: bool) -> cst.ClassDef:
    """`cls` recording its `__init__` arguments, checking at the top of `forward`, the root with the check method."""
    members = []
    for member in cls.body.body:
        if isinstance(member, cst.FunctionDef) and member.name.value == "__init__":
            member = _prepend(member, record_line(member))
        elif isinstance(member, cst.FunctionDef) and member.name.value == "forward":
            member = _prepend(member, CHECK_CALL)
        members.append(member)
    if root and method(cls, CHECK) is None:
        check = template_members(CHECK_METHOD)[0]
        members.append(check.with_changes(leading_lines=[cst.EmptyLine(indent=False)]))
    return with_block(cls, members)


def has_branch(func: cst.FunctionDef, module: str, cls: str) -> bool:
    """An `if isinstance(<module>, <cls>)` statement in the body that calls the check."""
    for stmt in func.body.body:
        test = stmt.test if isinstance(stmt, cst.If) else None
        if not (isinstance(test, cst.Call) and full_name(test.func) == "isinstance" and len(test.args) == 2):
            continue
        if full_name(test.args[0].value) != module or full_name(test.args[1].value) != cls:
            continue
        if find_all(stmt.body, cst.Call, lambda call: full_name(call.func) == f"{module}.{CHECK}"):
            return True
    return False


def branches(module: str, classes: list[str]) -> list[cst.BaseStatement]:
    out = []
    for cls in classes:
        branch = template_members(BRANCH.format(module=module, cls=cls, check=CHECK))[0]
        out.append(branch.with_changes(leading_lines=[marker(NAME, WHY)]))
    return out
