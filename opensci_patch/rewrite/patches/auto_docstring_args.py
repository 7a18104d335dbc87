"""auto_docstring_args: document the cache parameters so transformers' docstring check prints no `[ERROR]` lines.

`@auto_docstring` (4.54+) checks, when the model file is imported, that every parameter of a decorated method is
documented, in the method's docstring or in the library's table of standard arguments, and prints one line for
each that is not: `[ERROR] \\`cache\\` is part of OpensciModel.forward's signature, but not documented. ...`.
Nothing is wrong with the model, but a user reads "[ERROR]" as broken. Which names the table has changes with the
release: 4.57 and 5.2 lack `cache` (which `cache_kwarg` adds); 5.24 renamed `past_key_values` to `cache` and
dropped `cache_position` from it (measured: docs/upstream.md, "5.25.0"). So the docstring itself documents the
three cache parameters wherever the signature has them, and every release finds them there.

Rewrites: each method of a top-level class decorated `@auto_docstring` (also `@auto_docstring(...)`) whose
signature has `cache`, `past_key_values` or `cache_position` undocumented gets their entries (the format
auto_docstring parses: `name (type, *optional*):` then an indented description) at the top of its docstring, or
after its `Args:` line; a method without a docstring gets one. Only the docstring changes, so the numerics cannot.
Detects: such methods. Refuses a docstring that neither starts with a newline nor has an `Args:` line (a summary
line first: where the entries would go is a guess).
Verifies: every such parameter is documented in the docstring.
"""

from __future__ import annotations

import re

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State, Unrecognised
from opensci_patch.rewrite.patches.inserts import marker, with_block
from opensci_patch.rewrite.patches.syntax import docstring_offset, full_name

NAME = "auto_docstring_args"
WHY = "auto_docstring prints [ERROR] for undocumented parameters"
ENTRIES = {
    "cache": (
        "cache (`~cache_utils.Cache`, *optional*):",
        "The KV cache, as transformers 5.24+ passes it; the same as `past_key_values` (pass only one).",
    ),
    "past_key_values": (
        "past_key_values (`~cache_utils.Cache`, *optional*):",
        "The KV cache of the previous decoding steps (`cache` from transformers 5.24 on).",
    ),
    "cache_position": (
        "cache_position (`torch.LongTensor` of shape `(sequence_length)`, *optional*):",
        "Positions of the input tokens in the sequence; derived from the cache when not given.",
    ),
}
INDENT = " " * 8  # the body of a method of a top-level class


def _is_auto_docstring(decorator: cst.Decorator) -> bool:
    node = decorator.decorator
    if isinstance(node, cst.Call):
        node = node.func
    return (full_name(node) or "").split(".")[-1] == "auto_docstring"


def _params(func: cst.FunctionDef) -> list[str]:
    p = func.params
    return [q.name.value for q in (*p.posonly_params, *p.params, *p.kwonly_params)]


def _docstring(func: cst.FunctionDef) -> cst.SimpleString | None:
    body = func.body.body if isinstance(func.body, cst.IndentedBlock) else []
    if not docstring_offset(body):
        return None
    value = body[0].body[0].value
    if not isinstance(value, cst.SimpleString) or not value.value.endswith('"""'):
        raise Unrecognised(f"`def {func.name.value}` has a docstring that is not a triple-quoted string")
    return value


def _documented(text: str, name: str) -> bool:
    return re.search(rf"^\s*{re.escape(name)} \(", text, re.MULTILINE) is not None


def _missing(func: cst.FunctionDef) -> list[str]:
    doc = _docstring(func)
    text = doc.evaluated_value if doc is not None else ""
    return [n for n in ENTRIES if n in _params(func) and not _documented(text, n)]


def _targets(tree: cst.Module) -> list[cst.FunctionDef]:
    return [
        stmt
        for cls in tree.body
        if isinstance(cls, cst.ClassDef)
        for stmt in cls.body.body
        if isinstance(stmt, cst.FunctionDef)
        and any(_is_auto_docstring(d) for d in stmt.decorators)
        and any(n in _params(stmt) for n in ENTRIES)
    ]


def inspect(tree: cst.Module) -> State:
    targets = _targets(tree)
    if not targets:
        return State.ABSENT
    return State.NEEDED if any(_missing(f) for f in targets) else State.DONE


def _entries(names: list[str]) -> str:
    return "".join(f"{INDENT}{ENTRIES[n][0]}\n{INDENT}    {ENTRIES[n][1]}\n" for n in names)


def _with_entries(func: cst.FunctionDef) -> cst.FunctionDef:
    names = _missing(func)
    if not names:
        return func
    doc = _docstring(func)
    body = list(func.body.body)
    if doc is None:
        line = cst.SimpleStatementLine(
            [cst.Expr(cst.SimpleString(f'r"""\n{_entries(names)}{INDENT}"""'))],
            leading_lines=[marker(NAME, WHY)],
        )
        return with_block(func, [line, *body])
    raw = doc.value
    prefix = raw[: raw.index('"""') + 3]
    inner = raw[len(prefix) : -3]
    args = re.search(r"^[ \t]*Args:[ \t]*\n", inner, re.MULTILINE)
    if args is not None:
        inner = inner[: args.end()] + _entries(names) + inner[args.end() :]
    elif inner.startswith("\n"):
        inner = "\n" + _entries(names) + inner[1:]
    else:
        raise Unrecognised(
            f"`def {func.name.value}`'s docstring starts with text and has no `Args:` line: "
            f"document {', '.join(names)} in it by hand"
        )
    new_doc = doc.with_changes(value=prefix + inner + '"""')
    first = body[0].with_changes(body=[body[0].body[0].with_changes(value=new_doc)])
    first = first.with_changes(leading_lines=[*first.leading_lines, marker(NAME, WHY)])
    return with_block(func, [first, *body[1:]])


def _documented_members(cls: cst.ClassDef) -> cst.ClassDef:
    decorated = lambda m: isinstance(m, cst.FunctionDef) and any(map(_is_auto_docstring, m.decorators))  # noqa: E731
    return with_block(cls, [_with_entries(m) if decorated(m) else m for m in cls.body.body])


def rewrite(tree: cst.Module) -> cst.Module:
    return tree.with_changes(body=[_documented_members(s) if isinstance(s, cst.ClassDef) else s for s in tree.body])


PATCH = Patch(
    name=NAME,
    order=35,
    description="document the cache parameters of @auto_docstring methods (no [ERROR] lines at import)",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
