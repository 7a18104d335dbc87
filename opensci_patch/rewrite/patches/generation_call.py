"""generation_call: private `GenerationMixin` helpers called with the installed release's signature.

4.3x-era model files override `_update_model_kwargs_for_generation(self, outputs, model_kwargs,
is_encoder_decoder=False, standardize_cache_format=False)` and pass `standardize_cache_format=` on, to
`super()._update_model_kwargs_for_generation(...)` or to `self._extract_past_from_model_output(...)`. 4.48.0
dropped the keyword (measured: `_update_model_kwargs_for_generation(self, outputs, model_kwargs,
is_encoder_decoder=False, num_new_tokens=1)` on 4.48.0, 4.57.6, 5.0.0, 5.2.0 and 5.25.0), so `generate` raises
TypeError at its first step. `_extract_past_from_model_output` returns `(cache name, cache)` on 4.48.0 instead
of the cache, and is gone by 4.57.6 (`generate` reads `outputs.past_key_values` itself).

Rewrites: a call `X._update_model_kwargs_for_generation(...)` passing a keyword the method has on none of those
releases becomes `_opensci_generation_call(X._update_model_kwargs_for_generation, ...)`, which drops the
keywords the installed method does not take (`inspect.signature`; all of them where it takes `**kwargs`);
`X._extract_past_from_model_output(...)` becomes `_opensci_extract_past(X, ...)`: the release's method called
the same way, its `(name, cache)` pair unpacked to the cache, and where the method is gone,
`outputs.past_key_values`. Both helpers are inserted once at module level.

Not applicable to the shipped and generated open-sci files. Detects: those calls; refuses the two methods used
other than called (but as the helper's argument). Verifies: none is left
outside the helpers, and the helpers are defined.
"""

from __future__ import annotations

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State
from opensci_patch.rewrite.patches.helper_calls import (
    Build,
    helper_call,
    helper_state,
    insert_helpers,
    refuse_uncalled,
    replace,
    user_statements,
)
from opensci_patch.rewrite.patches.tree_walk import find_all

NAME = "generation_call"
WHY = "private generation helpers changed signature in transformers 4.48"
UPDATE = "_update_model_kwargs_for_generation"
EXTRACT = "_extract_past_from_model_output"
TAKEN = {"outputs", "model_kwargs", "is_encoder_decoder", "num_new_tokens"}  # UPDATE's keywords, 4.48.0 .. 5.25.0
CALL, PAST = "_opensci_generation_call", "_opensci_extract_past"
DEFINITIONS = {
    CALL: f'''
def {CALL}(method, *args, **kwargs):
    """`method(*args, **kwargs)` without the keywords the installed release's method does not take."""
    import inspect

    parameters = inspect.signature(method).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        kwargs = {{key: value for key, value in kwargs.items() if key in parameters}}
    return method(*args, **kwargs)
''',
    PAST: f'''
def {PAST}(model, outputs, *args, **kwargs):
    """`model.{EXTRACT}(outputs, ...)` as 4.3x gave it: the cache (4.48: a (name, cache) pair; 4.57: gone)."""
    method = getattr(model, "{EXTRACT}", None)
    if method is None:
        return getattr(outputs, "past_key_values", None)
    past = {CALL}(method, outputs, *args, **kwargs)
    if isinstance(past, tuple) and len(past) == 2 and isinstance(past[0], str):
        return past[1]
    return past
''',
}


def _method(call: cst.Call) -> str | None:
    return call.func.attr.value if isinstance(call.func, cst.Attribute) else None


def _builds(tree: cst.Module) -> dict[int, Build]:
    builds: dict[int, Build] = {}
    for stmt in user_statements(tree):
        for call in find_all(stmt, cst.Call, lambda c: _method(c) in (UPDATE, EXTRACT)):
            if _method(call) == EXTRACT:
                builds[id(call)] = lambda n: helper_call(PAST, [n.func.value], n, n.args)
            elif any(a.keyword is not None and a.keyword.value not in TAKEN for a in call.args):
                builds[id(call)] = lambda n: helper_call(CALL, [n.func], n, n.args)
    return builds


def inspect(tree: cst.Module) -> State:
    refuse_uncalled(tree, (UPDATE, EXTRACT), lambda c: isinstance(c.func, cst.Name) and c.func.value == CALL)
    return helper_state(tree, _builds(tree), DEFINITIONS)


def rewrite(tree: cst.Module) -> cst.Module:
    return insert_helpers(replace(tree, _builds(tree), NAME, WHY), DEFINITIONS, NAME, WHY)


PATCH = Patch(
    name=NAME,
    order=34,
    description="call the private generation helpers an override uses with the installed release's signature",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
