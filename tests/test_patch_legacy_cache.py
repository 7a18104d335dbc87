"""legacy_cache: the 4.3x Cache API and tuple indexing of the cache, through the installed release's Cache API."""

from __future__ import annotations

import pytest
from conftest import FIXTURE_DIR
from patch_sources import GENERATED, LEGACY_CACHE_43, assert_patch, function_of

from opensci_patch.rewrite.patches import by_name

PATCH = by_name("legacy_cache")

BEFORE = """\
import torch


def past_length(past_key_values, q_len, i):
    if past_key_values is None:
        return 0
    return past_key_values.get_usable_length(q_len, i) - past_key_values[0][0].shape[-2]
"""

AFTER = '''\
import torch


# opensci-patch: legacy_cache (the legacy Cache API is gone from newer transformers)
def _opensci_cache_usable_length(cache, new_seq_length, layer_idx=0):
    """`cache.get_usable_length(...)` (gone by 4.57): the release's own where it has one, else 4.48's arithmetic."""
    if hasattr(cache, "get_usable_length"):
        return cache.get_usable_length(new_seq_length, layer_idx)
    max_length = _opensci_cache_max_length(cache)
    previous_seq_length = cache.get_seq_length(layer_idx)
    if max_length is not None and previous_seq_length + new_seq_length > max_length:
        return max_length - new_seq_length
    return previous_seq_length


# opensci-patch: legacy_cache (the legacy Cache API is gone from newer transformers)
def _opensci_cache_max_length(cache):
    """`cache.get_max_length()` as 4.48 gives it (gone by 4.57; another meaning by 5.23): None for no maximum."""
    if hasattr(cache, "get_max_cache_shape"):  # 4.45 .. 5.2 at least
        length = cache.get_max_cache_shape()
    elif hasattr(cache, "layers"):  # by 5.23: get_max_length again, -1 for none, and it raises for no layers
        length = max((layer.get_max_length() for layer in cache.layers), default=-1)
    else:
        length = cache.get_max_length()
    return None if length is None or length < 0 else length


# opensci-patch: legacy_cache (the legacy Cache API is gone from newer transformers)
def _opensci_past_length(past_key_values, layer_idx, dim):
    """`past_key_values[layer_idx][0].shape[dim]`, the cached length, also for the Cache object generate passes."""
    if hasattr(past_key_values, "get_seq_length"):
        return past_key_values.get_seq_length(layer_idx)
    return past_key_values[layer_idx][0].shape[dim]


def past_length(past_key_values, q_len, i):
    if past_key_values is None:
        return 0
    # opensci-patch: legacy_cache (the legacy Cache API is gone from newer transformers)
    return _opensci_cache_usable_length(past_key_values, q_len, i) - _opensci_past_length(past_key_values, 0, -2)
'''

EVERY_USE = LEGACY_CACHE_43


def test_whole_output_and_a_second_run_is_already_patched():
    assert_patch(PATCH, BEFORE, AFTER, filename="modeling_x.py")


def test_every_legacy_use_goes_through_a_helper():
    patched = PATCH.apply(EVERY_USE).source
    assert "cache = _opensci_cache_from_legacy(DynamicCache, past_key_values)" in patched
    assert "_opensci_cache_max_length(cache) is not None and _opensci_cache_seen_tokens(cache) + n" in patched
    assert "return _opensci_cache_to_legacy(cache), full, _opensci_cache_usable_length(cache, n), " in patched
    assert "_opensci_past_length(past_key_values, 1, 2)\n" in patched
    for name in ("seen_tokens", "from_legacy", "to_legacy", "usable_length", "max_length"):
        assert patched.count(f"def _opensci_cache_{name}(") == 1
    assert patched.count("def _opensci_past_length(") == 1


def test_helpers_on_the_installed_release_s_cache_give_4_48_s_values():
    """On a DynamicCache of the installed release (5.25 has none of the legacy methods): 4.48's answers."""
    torch = pytest.importorskip("torch")
    from transformers.cache_utils import DynamicCache

    patched = PATCH.apply(EVERY_USE).source
    helpers = {n: function_of(patched, f"_opensci_{n}") for n in ("cache_max_length", "cache_from_legacy")}
    usable = function_of(patched, "_opensci_cache_usable_length", _opensci_cache_max_length=helpers["cache_max_length"])
    past = function_of(patched, "_opensci_past_length")
    to_legacy = function_of(patched, "_opensci_cache_to_legacy")
    keys = [torch.randn(1, 2, 3, 4) for _ in range(2)]
    legacy = tuple((k, k + 1) for k in keys)
    cache = helpers["cache_from_legacy"](DynamicCache, legacy)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 3
    assert helpers["cache_max_length"](cache) is None and helpers["cache_max_length"](DynamicCache()) is None
    assert usable(cache, 5, 1) == 3 and usable(DynamicCache(), 5) == 0
    assert past(DynamicCache(), 0, 2) == 0 and past(cache, 1, 2) == 3 and past(legacy, 0, -2) == 3
    back = to_legacy(cache)
    pairs = zip(back, legacy, strict=True)
    assert len(back) == 2 and all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in pairs)


def test_the_file_s_own_cache_methods_and_other_indexing_are_left_alone():
    source = (
        "class MyCache:\n    def length(self):\n        return self.get_usable_length(1) + self.seen_tokens\n\n\n"
        "def f(layer_past):\n    return layer_past[0].shape[-2] + layer_past[0][1].shape[2]\n"
    )
    for text in (source, (FIXTURE_DIR / "modeling_opensci.py").read_text(), GENERATED):
        outcome = PATCH.apply(text)
        assert (outcome.status, outcome.source) == ("not-applicable", text)
