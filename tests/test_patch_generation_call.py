"""generation_call: an override's private generation-helper calls run with the installed release's signature."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import FIXTURE_DIR
from patch_sources import GENERATED, OVERRIDE_43, assert_patch, function_of

from opensci_patch.rewrite.patches import by_name

PATCH = by_name("generation_call")

BEFORE = OVERRIDE_43

AFTER = '''\
from transformers import GenerationMixin


# opensci-patch: generation_call (private generation helpers changed signature in transformers 4.48)
def _opensci_generation_call(method, *args, **kwargs):
    """`method(*args, **kwargs)` without the keywords the installed release's method does not take."""
    import inspect

    parameters = inspect.signature(method).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        kwargs = {key: value for key, value in kwargs.items() if key in parameters}
    return method(*args, **kwargs)


class ForCausalLM(GenerationMixin):
    def _update_model_kwargs_for_generation(self, outputs, kwargs, flag=False):
        # opensci-patch: generation_call (private generation helpers changed signature in transformers 4.48)
        return _opensci_generation_call(
            super()._update_model_kwargs_for_generation, outputs, kwargs, standardize_cache_format=flag
        )
'''


def test_whole_output_and_a_second_run_is_already_patched():
    assert_patch(PATCH, BEFORE, AFTER, filename="modeling_x.py")


def test_the_call_drops_only_the_keywords_the_method_lacks():
    call = function_of(AFTER, "_opensci_generation_call")

    def update(outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):  # 4.48.0 .. 5.25.0
        return (outputs, model_kwargs, is_encoder_decoder, num_new_tokens)

    assert call(update, "o", {}, is_encoder_decoder=True, standardize_cache_format=True) == ("o", {}, True, 1)
    assert call(lambda *a, **k: k, standardize_cache_format=True) == {"standardize_cache_format": True}


def test_the_installed_release_s_method_takes_the_patched_call():
    """On the installed release the unpatched call raises TypeError; the patched one updates the kwargs."""
    generation = pytest.importorskip("transformers.generation")
    mixin = generation.GenerationMixin()
    mixin.config = SimpleNamespace(is_encoder_decoder=False)
    with pytest.raises(TypeError, match="standardize_cache_format"):
        mixin._update_model_kwargs_for_generation({}, {}, standardize_cache_format=True)
    call = function_of(AFTER, "_opensci_generation_call")
    kwargs = call(mixin._update_model_kwargs_for_generation, {}, {"a": 1}, standardize_cache_format=True)
    assert kwargs["a"] == 1


def test_extract_past_gives_the_cache_as_4_3x_did():
    source = (
        "class M:\n    def f(self, o):\n"
        "        return self._extract_past_from_model_output(o, standardize_cache_format=1)\n"
    )
    patched = PATCH.apply(source).source
    assert "return _opensci_extract_past(self, o, standardize_cache_format=1)" in patched
    call = function_of(patched, "_opensci_generation_call")
    extract = function_of(patched, "_opensci_extract_past", _opensci_generation_call=call)
    outputs = SimpleNamespace(past_key_values="cache")
    assert extract(SimpleNamespace(), outputs, standardize_cache_format=True) == "cache"  # 4.57+: no such method
    on_4_48 = SimpleNamespace(_extract_past_from_model_output=lambda outputs: ("past_key_values", "cache"))
    assert extract(on_4_48, outputs, standardize_cache_format=True) == "cache"


def test_calls_with_the_stable_keywords_are_not_applicable():
    source = (
        "class M:\n    def f(self, o, k):\n"
        "        return self._update_model_kwargs_for_generation(o, k, num_new_tokens=2)\n"
    )
    for text in (source, (FIXTURE_DIR / "modeling_opensci.py").read_text(), GENERATED):
        outcome = PATCH.apply(text)
        assert (outcome.status, outcome.source) == ("not-applicable", text)
