"""legacy_cache: the KV-cache API of the 4.3x era, removed since, called through the installed release's API.

Measured on the releases' `DynamicCache` (4.48.0, 4.57.6, 5.0.0, 5.2.0, 5.23.0, 5.24.0, 5.25.0):

- `cache.get_usable_length(new_seq_length, layer_idx)`, `cache.seen_tokens` and `cache.get_max_length()` are
  there on 4.48.0 and gone on 4.57.6 (5.23.0, 5.24.0 and 5.25.0 have a `get_max_length` again, in place of
  `get_max_cache_shape`, with another meaning: -1 for no maximum, and it raises on a cache without layers);
- `DynamicCache.from_legacy_cache(...)` and `cache.to_legacy_cache()` are there on 4.57.6 and gone in 5.0.0;
- the cache `generate` passes is a `Cache` object, not a tuple of layers: `past_key_values[0][0].shape[2]`
  (the cached length, as 4.3x files compute it) raises `KeyError: 'Cache only has 0 layers'` on 4.48.0 and
  `'NoneType' object has no attribute 'shape'` on 4.57.6 at the first step.

Rewrites each use into a call of a module-level helper: `X.get_usable_length(n, i)` ->
`_opensci_cache_usable_length(X, n, i)` (the release's method where it has one, else 4.48's arithmetic over
`get_seq_length` and the maximum length), `X.seen_tokens` -> `_opensci_cache_seen_tokens(X)`
(`get_seq_length()`), `X.get_max_length()` -> `_opensci_cache_max_length(X)` (4.48's value: None where the
cache has no maximum; from `get_max_cache_shape` where the release has it, else from the layers),
`C.from_legacy_cache(p)` -> `_opensci_cache_from_legacy(C, p)`, `X.to_legacy_cache()` ->
`_opensci_cache_to_legacy(X)` (the release's methods where it has them, else the same layers through
`update` / `layers`), and `X[i][0].shape[d]` with `d` 2 or -2 -> `_opensci_past_length(X, i, d)` (a cache
object's `get_seq_length(i)`, else the expression itself). Where a release has the method the file called,
that method runs: nothing changes there.

Not applicable to the shipped and generated open-sci files. Detects: those calls, reads and subscripts (not
on `self`: a cache class of the file's own may define them); refuses those methods passed around uncalled or
read by name with `getattr`. Verifies: none is left and each helper called is
defined at module level.
"""

from __future__ import annotations

import libcst as cst

from opensci_patch.rewrite.patches.base import Patch, State
from opensci_patch.rewrite.patches.helper_calls import (
    Build,
    attribute_reads,
    helper_call,
    helper_state,
    insert_helpers,
    method_calls,
    refuse_by_name,
    refuse_uncalled,
    replace,
    user_statements,
)
from opensci_patch.rewrite.patches.syntax import full_name
from opensci_patch.rewrite.patches.tree_walk import find_all

NAME = "legacy_cache"
WHY = "the legacy Cache API is gone from newer transformers"
DEFINITIONS = {
    "_opensci_cache_usable_length": '''
def _opensci_cache_usable_length(cache, new_seq_length, layer_idx=0):
    """`cache.get_usable_length(...)` (gone by 4.57): the release's own where it has one, else 4.48's arithmetic."""
    if hasattr(cache, "get_usable_length"):
        return cache.get_usable_length(new_seq_length, layer_idx)
    max_length = _opensci_cache_max_length(cache)
    previous_seq_length = cache.get_seq_length(layer_idx)
    if max_length is not None and previous_seq_length + new_seq_length > max_length:
        return max_length - new_seq_length
    return previous_seq_length
''',
    "_opensci_cache_seen_tokens": '''
def _opensci_cache_seen_tokens(cache):
    """`cache.seen_tokens` (gone by 4.57): the tokens the cache holds."""
    return cache.get_seq_length()
''',
    "_opensci_cache_max_length": '''
def _opensci_cache_max_length(cache):
    """`cache.get_max_length()` as 4.48 gives it (gone by 4.57; another meaning by 5.23): None for no maximum."""
    if hasattr(cache, "get_max_cache_shape"):  # 4.45 .. 5.2 at least
        length = cache.get_max_cache_shape()
    elif hasattr(cache, "layers"):  # by 5.23: get_max_length again, -1 for none, and it raises for no layers
        length = max((layer.get_max_length() for layer in cache.layers), default=-1)
    else:
        length = cache.get_max_length()
    return None if length is None or length < 0 else length
''',
    "_opensci_cache_from_legacy": '''
def _opensci_cache_from_legacy(cache_class, past_key_values):
    """`cache_class.from_legacy_cache(...)` (gone in 5.0): a cache holding the legacy tuple's layers, in order."""
    if hasattr(cache_class, "from_legacy_cache"):
        return cache_class.from_legacy_cache(past_key_values)
    cache = cache_class()
    for layer_idx, (keys, values) in enumerate(past_key_values or ()):
        cache.update(keys, values, layer_idx)
    return cache
''',
    "_opensci_cache_to_legacy": '''
def _opensci_cache_to_legacy(cache):
    """`cache.to_legacy_cache()` (gone in 5.0): each layer's (keys, values)."""
    if hasattr(cache, "to_legacy_cache"):
        return cache.to_legacy_cache()
    return tuple((layer.keys, layer.values) for layer in cache.layers)
''',
    "_opensci_past_length": '''
def _opensci_past_length(past_key_values, layer_idx, dim):
    """`past_key_values[layer_idx][0].shape[dim]`, the cached length, also for the Cache object generate passes."""
    if hasattr(past_key_values, "get_seq_length"):
        return past_key_values.get_seq_length(layer_idx)
    return past_key_values[layer_idx][0].shape[dim]
''',
}


def _index(node: cst.Subscript) -> cst.BaseExpression | None:
    """The one plain index of `X[index]`, else None."""
    if len(node.slice) == 1 and isinstance(node.slice[0].slice, cst.Index):
        return node.slice[0].slice.value
    return None


def _literal(node: cst.BaseExpression | None) -> int | None:
    """The value of an integer literal (`2`, `-2`), else None."""
    if isinstance(node, cst.Integer):
        return int(node.value)
    if isinstance(node, cst.UnaryOperation) and isinstance(node.operator, cst.Minus):
        inner = _literal(node.expression)
        return None if inner is None else -inner
    return None


def _past_length(node: cst.Subscript) -> tuple[cst.BaseExpression, cst.BaseExpression, cst.BaseExpression] | None:
    """(X, i, d) for `X[i][0].shape[d]` with d 2 or -2, else None."""
    shape = node.value
    if _literal(_index(node)) not in (2, -2) or not isinstance(shape, cst.Attribute) or shape.attr.value != "shape":
        return None
    keys = shape.value
    if not isinstance(keys, cst.Subscript) or _literal(_index(keys)) != 0 or not isinstance(keys.value, cst.Subscript):
        return None
    layer = _index(keys.value)
    return None if layer is None else (keys.value.value, layer, _index(node))


def _builds(tree: cst.Module) -> dict[int, Build]:
    builds: dict[int, Build] = {}

    def method(name: str, helper: str, arity: set[int] | None = None, on_class: bool = False) -> None:
        def where(call: cst.Call) -> bool:
            owner = full_name(call.func.value) or ""
            return (arity is None or len(call.args) in arity) and (not on_class or owner.endswith("Cache"))

        for call in method_calls(tree, name, where):
            builds[id(call)] = lambda n, h=helper: helper_call(h, [n.func.value], n, n.args)

    method("get_usable_length", "_opensci_cache_usable_length", {1, 2})
    method("get_max_length", "_opensci_cache_max_length", {0})
    method("from_legacy_cache", "_opensci_cache_from_legacy", {1}, on_class=True)
    method("to_legacy_cache", "_opensci_cache_to_legacy", {0})
    for read in attribute_reads(tree, "seen_tokens"):
        builds[id(read)] = lambda n: helper_call("_opensci_cache_seen_tokens", [n.value], n)
    for stmt in user_statements(tree):
        for node in find_all(stmt, cst.Subscript, lambda s: _past_length(s) is not None):
            builds[id(node)] = lambda n: helper_call("_opensci_past_length", list(_past_length(n)), n)
    return builds


def inspect(tree: cst.Module) -> State:
    refuse_uncalled(tree, ("get_usable_length", "from_legacy_cache", "to_legacy_cache"))
    refuse_by_name(tree, ("get_usable_length", "seen_tokens", "from_legacy_cache", "to_legacy_cache"), "gone since")
    return helper_state(tree, _builds(tree), DEFINITIONS)


def rewrite(tree: cst.Module) -> cst.Module:
    return insert_helpers(replace(tree, _builds(tree), NAME, WHY), DEFINITIONS, NAME, WHY)


PATCH = Patch(
    name=NAME,
    order=32,
    description="call the legacy Cache methods and tuple indexing through the installed release's Cache API",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
