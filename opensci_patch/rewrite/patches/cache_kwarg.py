"""cache_kwarg: transformers 5.24 hands the KV cache to the model as `cache=`, not `past_key_values=`.

5.24's `generate` puts the cache in `model_inputs["cache"]` (`past_key_values` stays a deprecated
alias of its own arguments until 5.40). A remote-code `forward(..., past_key_values=None, ...,
**kwargs)` swallows `cache` in `**kwargs`, sees `past_key_values=None`, builds a fresh cache at every
step, and each decode step attends only to itself: the first position's logits stay bit-identical,
greedy text goes wrong from the second new token. (Outputs need no change: 5.24's `ModelOutput`
renames `past_key_values=` to `cache` itself.)

Rewrites: every `forward` that takes `past_key_values` gets a keyword-only `cache=None` parameter
(before `**kwargs`, which stays last) and, first thing after its docstring::

    if cache is not None:
        if past_key_values is not None and past_key_values is not cache:
            raise ValueError(...)
        past_key_values = cache

so the cache arrives under either name and the rest of the method, unchanged, passes it on as
`past_key_values` (to the inner model, the layers and the mask helpers, whose own names
`moved_helpers` adapts). Given both names with two different caches is an error, as it is in
5.24's own models ("You cannot specify both `cache` and `past_key_values`"): guessing which one
the caller meant would silently decode from the wrong history. The same object under both names
is accepted. Because `cache` becomes a named parameter it no longer travels on in `**kwargs`, so an
inner call never receives the cache twice.

Releases before 5.24 never pass `cache`, so the inserted code is inert there. The forwards this
patch knows derive `cache_position` from the cache when it is None, which 5.24's `generate`
still builds for remote code but says it will stop doing (tests check the decode loop without it).

Detects: methods named `forward` with a `past_key_values` parameter. Refuses one that already
takes a `cache` parameter without the inserted code (someone else's cache handling), or whose
body already uses the name `cache` or a `"cache"` string (it reads the cache some other way).
Verifies: each such forward takes keyword-only `cache=None` and starts with the code above.
"""

from __future__ import annotations

from collections.abc import Sequence

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State, Unrecognised, combined
from opensci_patch.rewrite.patches.inserts import marker, parsed, template
from opensci_patch.rewrite.patches.syntax import code, docstring_offset, is_string
from opensci_patch.rewrite.patches.tree_walk import find_all, visit_statements, walk

NAME = "cache_kwarg"
WHY = "transformers 5.24 passes the KV cache as cache="
OLD, NEW = "past_key_values", "cache"

BRIDGE = f"""
if {NEW} is not None:
    if {OLD} is not None and {OLD} is not {NEW}:
        raise ValueError("got one KV cache as `{NEW}` and another as `{OLD}`: pass only one")
    {OLD} = {NEW}
"""


def _parameters(func: cst.FunctionDef) -> list[cst.Param]:
    p = func.params
    stars = [s for s in (p.star_arg, p.star_kwarg) if isinstance(s, cst.Param)]
    return [*p.posonly_params, *p.params, *p.kwonly_params, *stars]


def _param(func: cst.FunctionDef, name: str) -> cst.Param | None:
    return next((p for p in _parameters(func) if p.name.value == name), None)


def _is_bridge(stmt: cst.BaseStatement) -> bool:
    return stmt.with_changes(leading_lines=[]).deep_equals(parsed(BRIDGE)[0])


def _body(func: cst.FunctionDef) -> Sequence[cst.BaseStatement]:
    if not isinstance(func.body, cst.IndentedBlock):
        raise Unrecognised(f"`def {func.name.value}` has its body on the `def` line")
    return func.body.body


def _uses_cache_name(func: cst.FunctionDef) -> bool:
    """Whether the body reads or binds the variable `cache` or holds a `"cache"` string (e.g. kwargs["cache"])."""

    class Uses(cst.CSTVisitor):
        found = False

        def visit_Name(self, node: cst.Name) -> None:
            self.found |= node.value == NEW

        def visit_SimpleString(self, node: cst.SimpleString) -> None:
            self.found |= is_string(node, NEW)

        def visit_Attribute(self, node: cst.Attribute) -> bool:
            node.value.visit(self)  # `x.cache` is an attribute, not the variable
            return False

        def visit_Arg(self, node: cst.Arg) -> bool:
            node.value.visit(self)  # `f(cache=...)` names the callee's parameter, not a variable
            return False

    uses = Uses()
    for stmt in _body(func):
        walk(stmt, uses)
    return uses.found


def _targets(tree: cst.CSTNode) -> list[cst.FunctionDef]:
    return find_all(tree, cst.FunctionDef, lambda f: f.name.value == "forward" and _param(f, OLD) is not None)


def _state(func: cst.FunctionDef) -> State:
    body = _body(func)
    start = docstring_offset(body)
    bridged = len(body) > start and _is_bridge(body[start])
    cache = _param(func, NEW)
    if cache is None:
        if bridged or _uses_cache_name(func):
            raise Unrecognised(f"`def {func.name.value}` uses the name `{NEW}` without taking it as a parameter")
        return State.NEEDED
    ours = (
        cache in func.params.kwonly_params
        and cache.default is not None
        and code(cache.default) == "None"
        and cache.annotation is None
    )
    if not (ours and bridged):
        raise Unrecognised(
            f"`def {func.name.value}` already takes a `{NEW}` parameter (`{code(cache)}`) that this patch did not add"
        )
    return State.DONE


def inspect(tree: cst.Module) -> State:
    return combined(_state(func) for func in _targets(tree))


def _with_cache_parameter(params: cst.Parameters) -> cst.Parameters:
    """`params` plus a keyword-only `cache=None`, after the other keyword-only ones and before `**kwargs`.

    The separator after each new item copies the one the signature already uses, so a signature
    written one parameter per line stays that way."""
    new = cst.Param(
        name=cst.Name(NEW),
        default=cst.Name("None"),
        equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")),
    )
    star = params.star_arg
    before = [*params.posonly_params, *params.params]
    items: list[cst.CSTNode] = [*before, *([star] if isinstance(star, (cst.Param, cst.ParamStar)) else [])]
    items.extend(params.kwonly_params)
    last = items[-1]  # `self` at least: these are methods
    if isinstance(params.star_kwarg, cst.Param):
        separator, end = last.comma, last.comma
    else:
        previous = items[-2].comma if len(items) > 1 else None
        separator = (
            previous if isinstance(previous, cst.Comma) else cst.Comma(whitespace_after=cst.SimpleWhitespace(" "))
        )
        end = last.comma
    new = new.with_changes(comma=end)
    changes: dict = {}
    if not isinstance(star, (cst.Param, cst.ParamStar)):
        changes["star_arg"] = cst.ParamStar(comma=separator)
    kwonly = list(params.kwonly_params)
    if isinstance(params.star_kwarg, cst.Param):
        kwonly.append(new)
    elif kwonly:
        kwonly[-1] = kwonly[-1].with_changes(comma=separator)
        kwonly.append(new)
    else:
        # the last positional parameter (or `*args`) now has something after it
        kwonly.append(new)
        if isinstance(star, (cst.Param, cst.ParamStar)):
            changes["star_arg"] = star.with_changes(comma=separator)
        else:
            changes["params"] = [*params.params[:-1], params.params[-1].with_changes(comma=separator)]
    return params.with_changes(kwonly_params=kwonly, **changes)


class _Rewrite(cst.CSTTransformer):
    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        return any(func is not node for func in _targets(node))  # into a def only for a target inside it

    def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
        if original.name.value != "forward" or _param(original, OLD) is None or _state(original) is State.DONE:
            return updated
        body = list(_body(updated))
        at = docstring_offset(body)
        bridge = template(BRIDGE)[0].with_changes(leading_lines=[marker(NAME, WHY)])
        body.insert(at, bridge)
        return updated.with_changes(
            params=_with_cache_parameter(updated.params), body=updated.body.with_changes(body=body)
        )


def rewrite(tree: cst.Module) -> cst.Module:
    return visit_statements(tree, _Rewrite(), _targets)


PATCH = Patch(
    name=NAME,
    order=30,
    description="forwards taking past_key_values also take the cache as cache= (transformers 5.24's generate)",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
