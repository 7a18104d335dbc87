"""config_params: a config parameter that `__init__` names but never uses reaches the config.

transformers' modular converter unrolls a modular config (`class OpensciConfig(Qwen3Config)` whose
`__init__` names `pad_token_id`, `bos_token_id`, `eos_token_id`) into the parent's body: the signature
keeps the named parameters, the body (4.57's `Qwen3Config`) never stores them and ends in
`super().__init__(tie_word_embeddings=..., **kwargs)`. A named parameter is no longer in `**kwargs`,
so config.json's value goes nowhere: 4.x's `PretrainedConfig.__init__` sets the three ids from its
kwargs, defaulting to None (silently: no EOS, no pad id); 5.x's `PreTrainedConfig` does not define
them at all, and `config.pad_token_id` raises AttributeError when the model is built.

Detects: top-level config classes (a base named `PretrainedConfig`/`PreTrainedConfig`, a config class
imported from transformers, or a config class of this file) whose `__init__` has a named parameter
(not `self`, not `*args`/`**kwargs`) that its body never reads: not stored, not passed on, not used.
Rewrites: passes each such parameter on to the body's `super().__init__(...)` as `name=name`: what
the value would have met had the signature not named it (4.x pops the ids from the kwargs, 5.x's base
sets unknown keywords as attributes, a library config class stores its own fields), so the config
holds config.json's values on every release. A body without exactly one `super().__init__(...)` call
is refused.
Verifies: every named parameter is read, and the call carries the marker (else "not applicable").
"""

from __future__ import annotations

import ast

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State, Unrecognised, combined
from opensci_patch.rewrite.patches.inserts import MARKER, with_marker
from opensci_patch.rewrite.patches.remote_code import library_configs
from opensci_patch.rewrite.patches.syntax import code, full_name, method
from opensci_patch.rewrite.patches.tree_walk import find_all, visit_statements

NAME = "config_params"
WHY = "a named parameter is not in **kwargs: its config.json value was lost"
BASES = ("PretrainedConfig", "PreTrainedConfig")


def config_classes(tree: cst.Module) -> list[cst.ClassDef]:
    """Top-level config classes: on a transformers config base, or on a config class of this file."""
    known = set(BASES) | set(library_configs(tree))
    classes = [s for s in tree.body if isinstance(s, cst.ClassDef)]
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for cls in classes:
            bases = {(full_name(b.value) or "").split(".")[-1] for b in cls.bases}
            if cls.name.value not in found and bases & (known | found):
                found.add(cls.name.value)
                changed = True
    return [c for c in classes if c.name.value in found]


def unread(init: cst.FunctionDef) -> list[str]:
    """The named parameters (not the first, `self`) that the body of `init` never reads."""
    params = init.params
    named = [*params.posonly_params, *params.params][1:] + list(params.kwonly_params)
    body = ast.parse(code(init)).body[0].body
    read = {n.id for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Name)}
    return [p.name.value for p in named if p.name.value not in read]


def _super_init(init: cst.FunctionDef) -> cst.Call | None:
    """The one `super().__init__(...)` call of `init` (None without one; more than one is refused)."""
    calls = find_all(init, cst.Call, _is_super_init)
    if len(calls) > 1:
        raise Unrecognised(f"{code(calls[0])} and {len(calls) - 1} more super().__init__ calls in one __init__")
    return calls[0] if calls else None


def _is_super_init(call: cst.Call) -> bool:
    func = call.func
    return (
        isinstance(func, cst.Attribute)
        and func.attr.value == "__init__"
        and isinstance(func.value, cst.Call)
        and full_name(func.value.func) == "super"
    )


def _marked(init: cst.FunctionDef) -> bool:
    return any(
        line.comment is not None and line.comment.value.startswith(f"{MARKER} {NAME} ")
        for stmt in find_all(init, cst.SimpleStatementLine)
        for line in stmt.leading_lines
    )


def _inits(tree: cst.Module) -> list[tuple[cst.ClassDef, cst.FunctionDef]]:
    return [(cls, init) for cls in config_classes(tree) if (init := method(cls, "__init__")) is not None]


def inspect(tree: cst.Module) -> State:
    found = []  # per config __init__: needed (a parameter lost) or done (passed on by this patch)
    for cls, init in _inits(tree):
        lost = unread(init)
        if lost and _super_init(init) is None:
            raise Unrecognised(f"{cls.name.value}.__init__ loses {', '.join(lost)} and calls no super().__init__")
        if lost or _marked(init):
            found.append(State.NEEDED if lost else State.DONE)
    return combined(found)


def _with_keywords(call: cst.Call, names: list[str]) -> cst.Call:
    """`call` with `name=name` for each of `names`, before its `**` argument (else last), in its layout."""
    args = list(call.args)
    at = next((i for i, a in enumerate(args) if a.star == "**"), len(args))
    if len(args) >= 2:
        sep = args[0].comma
    elif isinstance(call.whitespace_before_args, cst.ParenthesizedWhitespace):  # one argument a line
        sep = cst.Comma(whitespace_after=call.whitespace_before_args)
    else:
        sep = cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
    new = [cst.parse_expression(f"f({n}={n})").args[0].with_changes(comma=sep) for n in names]
    if at == len(args):  # appended: the last argument keeps the call's trailing comma (or its absence)
        last = args[-1].comma if args else cst.MaybeSentinel.DEFAULT
        new[-1] = new[-1].with_changes(comma=last)
        if args:
            args[-1] = args[-1].with_changes(comma=sep)
    return call.with_changes(args=[*args[:at], *new, *args[at:]])


def rewrite(tree: cst.Module) -> cst.Module:
    todo = {id(call): unread(init) for _, init in _inits(tree) if unread(init) and (call := _super_init(init))}

    class PassOn(cst.CSTTransformer):
        def leave_Call(self, original: cst.Call, updated: cst.Call) -> cst.Call:
            return _with_keywords(updated, todo[id(original)]) if id(original) in todo else updated

        def leave_SimpleStatementLine(
            self, original: cst.SimpleStatementLine, updated: cst.SimpleStatementLine
        ) -> cst.SimpleStatementLine:
            if any(id(c) in todo for c in find_all(original, cst.Call)):
                return with_marker(updated, NAME, WHY)
            return updated

    return visit_statements(tree, PassOn(), lambda stmt: find_all(stmt, cst.SimpleStatementLine, _holds_target(todo)))


def _holds_target(todo: dict[int, list[str]]):
    return lambda line: any(id(c) in todo for c in find_all(line, cst.Call))


PATCH = Patch(
    name=NAME,
    order=66,
    description="pass a config __init__'s unused named parameters (pad/bos/eos_token_id...) on to "
    "super().__init__, so config.json's values reach the config on every release",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
