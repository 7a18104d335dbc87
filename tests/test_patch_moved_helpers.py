"""moved_helpers' mask keyword adapter: each release's keywords (5.24 renamed `past_key_values` to `cache`), and the
upgrade of a file hotfixed by the earlier adapter, which did not rename it.

The rest of moved_helpers (guards, stand-ins, config_class, the DynamicCache shim) is tested in tests/test_patches.py.
"""

from __future__ import annotations

import pytest
from test_patches import GENERATED, _function

from opensci_patch.errors import PatchError
from opensci_patch.patches import by_name

PATCH = by_name("moved_helpers")

# The adapter as moved_helpers wrote it before 5.24 (opensci-patch at commit 135e7fb): files hotfixed then hold it.
ADAPTER_BEFORE_5_24 = '''\
def _opensci_mask_keywords(mask_function):
    """Call `mask_function` with the keywords of the installed release (this code passes 4.54's)."""
    import inspect

    parameters = inspect.signature(mask_function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

    def call(*args, **kwargs):
        if "input_embeds" in kwargs and "input_embeds" not in parameters and "inputs_embeds" in parameters:
            kwargs["inputs_embeds"] = kwargs.pop("input_embeds")
        if not takes_any:
            kwargs = {key: value for key, value in kwargs.items() if key in parameters}
        return mask_function(*args, **kwargs)

    return call
'''


def _adapter_text(source: str) -> str:
    """The adapter's definition in a patched source, from its `def` line to its `return call`."""
    start = source.index("def _opensci_mask_keywords(")
    end = source.index("    return call\n", start) + len("    return call\n")
    return source[start:end]


@pytest.fixture(scope="module")
def patched() -> str:
    return PATCH.apply(GENERATED, "modeling_opensci.py").source


@pytest.fixture(scope="module")
def hotfixed_before_5_24(patched: str) -> str:
    """A file as the earlier moved_helpers left it: everything the same but the adapter."""
    old = patched.replace(_adapter_text(patched), ADAPTER_BEFORE_5_24)
    assert old != patched
    return old


def _mask_function(*names: str, any_keywords: bool = False):
    """A stand-in for an installed mask function with these keyword parameters; returns what it got."""
    params = ", ".join(names) + (", **more" if any_keywords else "")
    extra = " | more" if any_keywords else ""
    namespace: dict = {}
    exec(f"def mask({params}):\n    return dict({', '.join(f'{n}={n}' for n in names)}){extra}\n", namespace)
    return namespace["mask"]


# what the 4.54-generated code passes
CALL = {"config": "c", "input_embeds": "e", "attention_mask": "a", "cache_position": "p", "past_key_values": "k"}


@pytest.mark.parametrize(
    ("release", "params", "received"),
    [
        ("4.54-5.1", ("config", "input_embeds", "attention_mask", "cache_position", "past_key_values"), CALL),
        (
            "5.2",
            ("config", "inputs_embeds", "attention_mask", "cache_position", "past_key_values"),
            {"config": "c", "inputs_embeds": "e", "attention_mask": "a", "cache_position": "p", "past_key_values": "k"},
        ),
        (
            "5.23",
            ("config", "inputs_embeds", "attention_mask", "past_key_values", "layer_idx"),
            {"config": "c", "inputs_embeds": "e", "attention_mask": "a", "past_key_values": "k", "layer_idx": None},
        ),
        (
            "5.24",
            ("config", "inputs_embeds", "attention_mask", "cache", "position_ids", "layer_idx"),
            {
                "config": "c",
                "inputs_embeds": "e",
                "attention_mask": "a",
                "cache": "k",
                "position_ids": None,
                "layer_idx": None,
            },
        ),  # fmt: skip
    ],
)
def test_mask_adapter_passes_the_keywords_each_release_takes(patched, release, params, received):
    adapter = _function(patched, "_opensci_mask_keywords")
    defaults = {"layer_idx": None, "position_ids": None}
    function = _mask_function(*params)
    function.__defaults__ = tuple(defaults[n] for n in params if n in defaults) or None
    assert adapter(function)(**CALL) == received


def test_mask_adapter_passes_everything_to_a_function_that_takes_any_keyword(patched):
    adapter = _function(patched, "_opensci_mask_keywords")
    assert adapter(_mask_function("config", any_keywords=True))(**CALL) == CALL


def test_mask_adapter_keeps_past_key_values_for_a_function_taking_both_names(patched):
    """Only a helper that lacks the old name gets the new one: never rename what the helper still takes."""
    adapter = _function(patched, "_opensci_mask_keywords")
    both = _mask_function("config", "input_embeds", "attention_mask", "cache_position", "past_key_values", "cache")
    both.__defaults__ = (None,)
    assert adapter(both)(**CALL) == {**CALL, "cache": None}


def test_mask_adapter_hands_the_cache_to_the_installed_create_causal_mask(patched):
    """Against the installed release's own helper (5.24: `cache`, positional, no **kwargs): the cached positions
    reach it, so a one-token step gets a mask over all five positions."""
    torch = pytest.importorskip("torch")
    masking = pytest.importorskip("transformers.masking_utils")
    from transformers import LlamaConfig
    from transformers.cache_utils import DynamicCache

    config = LlamaConfig(
        num_hidden_layers=1, hidden_size=8, num_attention_heads=1, num_key_value_heads=1, intermediate_size=8
    )
    config._attn_implementation = "eager"
    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), 0)
    step = {
        "config": config,
        "input_embeds": torch.zeros(1, 1, 8),
        "attention_mask": None,
        "cache_position": torch.tensor([4]),
        "past_key_values": cache,
        "position_ids": torch.tensor([[4]]),
    }
    mask = _function(patched, "_opensci_mask_keywords")(masking.create_causal_mask)(**step)
    assert mask.shape == (1, 1, 1, 5)
    assert bool((mask == 0).all())  # the new token sees the four cached ones and itself


def test_file_hotfixed_before_5_24_is_needed_again_and_upgraded(patched, hotfixed_before_5_24):
    outcome = PATCH.apply(hotfixed_before_5_24, "modeling_opensci.py")
    assert outcome.status == "applied"
    assert outcome.source == patched  # exactly what hotfixing the original gives now
    assert outcome.source.count("# opensci-patch: moved_helpers (create_causal_mask's keywords") == 1
    assert PATCH.apply(outcome.source).status == "already-applied"


def test_old_adapter_fails_with_5_24s_helper_and_the_upgraded_one_does_not(patched, hotfixed_before_5_24):
    """The failure the upgrade fixes, on a helper with 5.24's signature."""

    def create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids=None, layer_idx=None):
        return cache

    old = _function(hotfixed_before_5_24, "_opensci_mask_keywords")
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'cache'"):
        old(create_causal_mask)(**CALL)
    assert _function(patched, "_opensci_mask_keywords")(create_causal_mask)(**CALL) == "k"


def test_an_adapter_edited_by_hand_is_refused_not_replaced(patched):
    edited = patched.replace("return mask_function(*args, **kwargs)", "return mask_function(*args, **kwargs)  # mine")
    assert edited != patched
    with pytest.raises(PatchError, match="patch 'moved_helpers'.*modeling_opensci.py.*not the adapter"):
        PATCH.apply(edited, "modeling_opensci.py")
