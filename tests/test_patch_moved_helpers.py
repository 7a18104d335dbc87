"""moved_helpers' mask keyword adapter: each release's keywords (5.24 renamed `past_key_values` to `cache`), and the
upgrade of a file hotfixed by the earlier adapter, which did not rename it.

And the rest of moved_helpers: the check_model_inputs guard, the mask stand-ins before 4.54, the DynamicCache shim.
"""

from __future__ import annotations

import ast
import sys
from types import SimpleNamespace

import pytest
from patch_sources import GENERATED, assert_patch, function_of

from opensci_patch._util.errors import PatchError
from opensci_patch.rewrite.patches import by_name

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
    adapter = function_of(patched, "_opensci_mask_keywords")
    defaults = {"layer_idx": None, "position_ids": None}
    function = _mask_function(*params)
    function.__defaults__ = tuple(defaults[n] for n in params if n in defaults) or None
    assert adapter(function)(**CALL) == received


def test_mask_adapter_passes_everything_to_a_function_that_takes_any_keyword(patched):
    adapter = function_of(patched, "_opensci_mask_keywords")
    assert adapter(_mask_function("config", any_keywords=True))(**CALL) == CALL


def test_mask_adapter_passes_the_new_name_to_a_helper_that_also_lists_the_deprecated_one(patched):
    """5.25's mask helpers take `cache` and also list the deprecated `past_key_values` (keyword-only, None, before
    **kwargs: `deprecate_kwarg(..., expose_in_signature=True)`) and warn when it is used: the cache goes as `cache`."""
    adapter = function_of(patched, "_opensci_mask_keywords")
    namespace: dict = {}
    exec(
        "def create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids=None, layer_idx=None, *,"
        " past_key_values=None, **kwargs):\n"
        "    return dict(inputs_embeds=inputs_embeds, cache=cache, past_key_values=past_key_values, **kwargs)\n",
        namespace,
    )
    got = adapter(namespace["create_causal_mask"])(**CALL)
    assert got == {"inputs_embeds": "e", "cache": "k", "past_key_values": None, "cache_position": "p"}


def test_a_file_hotfixed_with_the_adapter_before_5_25_is_upgraded(patched):
    """The adapter written before 5.25 (rename only where the old name is absent) is replaced by the current one."""
    from opensci_patch.rewrite.patches.stand_ins import ADAPTER_DEF, OLD_ADAPTER_DEFS

    before = next(old for old in OLD_ADAPTER_DEFS if "old not in parameters" in old)
    hotfixed_before = patched.replace(ADAPTER_DEF.strip("\n"), before.strip("\n"))
    assert hotfixed_before != patched
    outcome = PATCH.apply(hotfixed_before, "modeling_opensci.py")
    assert (outcome.status, outcome.source) == ("applied", patched)


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
    mask = function_of(patched, "_opensci_mask_keywords")(masking.create_causal_mask)(**step)
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

    old = function_of(hotfixed_before_5_24, "_opensci_mask_keywords")
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'cache'"):
        old(create_causal_mask)(**CALL)
    assert function_of(patched, "_opensci_mask_keywords")(create_causal_mask)(**CALL) == "k"


def test_an_adapter_edited_by_hand_is_refused_not_replaced(patched):
    edited = patched.replace("return mask_function(*args, **kwargs)", "return mask_function(*args, **kwargs)  # mine")
    assert edited != patched
    with pytest.raises(PatchError, match="patch 'moved_helpers'.*modeling_opensci.py.*not the adapter"):
        PATCH.apply(edited, "modeling_opensci.py")


# --- the guards, the stand-ins before 4.54, the DynamicCache shim ------------------------------------------


def _check_guard(monkeypatch, generic_names: dict, capture_outputs=None) -> dict:
    """Run the patched file's check_model_inputs guard against fake transformers.utils modules."""
    import types

    generic = types.ModuleType("transformers.utils.generic")
    for key, value in generic_names.items():
        setattr(generic, key, value)
    monkeypatch.setitem(sys.modules, "transformers.utils.generic", generic)
    capturing = types.ModuleType("transformers.utils.output_capturing")
    if capture_outputs is not None:
        capturing.capture_outputs = capture_outputs
    monkeypatch.setitem(sys.modules, "transformers.utils.output_capturing", capturing)
    tree = ast.parse(by_name("moved_helpers").apply(GENERATED).source)
    guard = next(n for n in tree.body if isinstance(n, ast.Try) and "check_model_inputs" in ast.unparse(n.body[0]))
    namespace: dict = {}
    exec(compile(ast.Module([guard], type_ignores=[]), "guard", "exec"), namespace)
    return namespace


def test_check_model_inputs_fallback_composes_the_two_5_2_decorators(monkeypatch):
    """Where transformers.utils.generic has no check_model_inputs (5.2-5.22), it is built from its successors."""
    calls = []
    namespace = _check_guard(
        monkeypatch,
        {"merge_with_config_defaults": lambda f: calls.append(("merge", f)) or ("merged", f)},
        lambda f, tie_last_hidden_states=True: calls.append(("capture", f, tie_last_hidden_states)) or ("captured", f),
    )

    def forward():
        return None

    assert namespace["check_model_inputs"](forward) == ("merged", ("captured", forward))
    assert namespace["check_model_inputs"](tie_last_hidden_states=False)(forward) == ("merged", ("captured", forward))
    assert calls == [("capture", forward, True), ("merge", ("captured", forward))] + [
        ("capture", forward, False),
        ("merge", ("captured", forward)),
    ]


class _Output:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def to_tuple(self):
        return tuple(self.kwargs.values())


def test_check_model_inputs_stand_in_before_4_54_applies_the_config_defaults(monkeypatch):
    check = _check_guard(monkeypatch, {})["check_model_inputs"]  # neither it nor its successors exist

    class Model:
        config = SimpleNamespace(use_cache=True, return_dict=True, output_attentions=False)
        training = False

        @check
        def forward(self, input_ids=None, use_cache=None, **kwargs):
            return _Output(use_cache=use_cache, rest=sorted(kwargs))

    model = Model()
    assert model.forward(1).kwargs == {"use_cache": True, "rest": []}
    assert model.forward(1, use_cache=False).kwargs["use_cache"] is False
    assert model.forward(1, return_dict=False) == (True, [])
    assert model.forward(1, output_attentions=False, output_hidden_states=None).kwargs["rest"] == []
    with pytest.raises(NotImplementedError, match="output_attentions needs transformers >= 4.54"):
        model.forward(1, output_attentions=True)
    Model.config.output_hidden_states = True
    with pytest.raises(NotImplementedError, match="output_hidden_states"):
        model.forward(1)


def _stand_in(name: str):
    """The stand-in the patch inserts for `name` (the except branch of its guard), compiled on its own."""
    tree = ast.parse(by_name("moved_helpers").apply(GENERATED).source)
    guard = next(n for n in tree.body if isinstance(n, ast.Try) and f"import {name}" in ast.unparse(n.body[0]))
    import torch

    namespace: dict = {"torch": torch}
    exec(compile(ast.Module(guard.handlers[0].body, type_ignores=[]), name, "exec"), namespace)
    return namespace[name]


def test_causal_mask_stand_in_builds_4_54s_eager_and_sdpa_masks():
    torch = pytest.importorskip("torch")
    mask = _stand_in("create_causal_mask")
    embeds = torch.zeros(2, 4, 8)
    config = SimpleNamespace(_attn_implementation="eager")
    eager = mask(config, embeds, None, torch.arange(4), None)
    low = torch.finfo(torch.float32).min
    expected = torch.where(torch.ones(4, 4, dtype=torch.bool).tril(), torch.tensor(0.0), torch.tensor(low))
    assert eager.shape == (2, 1, 4, 4) and torch.equal(eager[0, 0], expected) and torch.equal(eager[1, 0], expected)
    padding = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    padded = mask(config, embeds, padding, torch.arange(4), None)
    assert bool((padded[1, 0, :, 0] == low).all()) and torch.equal(padded[0, 0], expected)
    config._attn_implementation = "sdpa"
    assert mask(config, embeds, None, torch.arange(4), None) is None  # SDPA's own is_causal
    assert mask(config, embeds, torch.ones(2, 4), torch.arange(4), None) is None
    assert torch.equal(mask(config, embeds, padding, torch.arange(4), None), padded == 0)
    past = SimpleNamespace(get_seq_length=lambda: 4)  # one new token after four cached ones
    step = mask(SimpleNamespace(_attn_implementation="eager"), embeds[:, :1], None, torch.tensor([4]), past)
    assert step.shape == (2, 1, 1, 5) and bool((step == 0).all())


def test_sliding_window_mask_stand_in_limits_how_far_back_a_query_sees():
    torch = pytest.importorskip("torch")
    mask = _stand_in("create_sliding_window_causal_mask")
    config = SimpleNamespace(_attn_implementation="sdpa", sliding_window=2)
    allowed = mask(config, torch.zeros(1, 4, 8), None, torch.arange(4), None)[0, 0]
    assert allowed.tolist() == [[True, False, False, False], [True, True, False, False],
                                [False, True, True, False], [False, False, True, True]]  # fmt: skip


def test_moved_helpers_refuses_a_mask_import_inside_a_function():
    nested = GENERATED.replace(
        "from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask\n", ""
    ).replace(
        "        mask_kwargs = {",
        "        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask\n\n"
        "        mask_kwargs = {",
    )
    with pytest.raises(PatchError, match="moved_helpers.*not a top-level import"):
        by_name("moved_helpers").apply(nested, "modeling_opensci.py")


CACHE_4_56 = """\
import torch

from transformers.cache_utils import Cache, DynamicCache


class OsrModel:
    def forward(self, use_cache=True, past_key_values=None):
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        return past_key_values
"""


def test_dynamic_cache_shim_only_where_the_installed_cache_takes_no_config():
    patch = by_name("moved_helpers")
    assert patch.apply(CACHE_4_56.replace("DynamicCache(config=self.config)", "DynamicCache()")).status == (
        "not-applicable"
    )  # 4.54-generated code: nothing to do
    patched = patch.apply(CACHE_4_56).source
    assert patch.apply(patched).status == "already-applied"
    tree = ast.parse(patched)
    shim = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.If))]

    class OldCache:  # < 4.56
        def __init__(self, *args, **kwargs):
            self.args = args

    class NewCache:  # >= 4.56
        def __init__(self, ddp_cache_data=None, config=None):
            self.config = config

    for cls, replaced in ((OldCache, True), (NewCache, False)):
        namespace = {"DynamicCache": cls}
        exec(compile(ast.Module(shim, type_ignores=[]), "shim", "exec"), namespace)
        assert (namespace["DynamicCache"] is not cls) is replaced
        cache = namespace["DynamicCache"](config="cfg")
        assert isinstance(cache, cls)


# 4.3x-era helper imports (issue 29): the first is absent on 4.48.0, the second gone in 5.0.
TORCH_HELPERS = """\
import torch
from transformers.pytorch_utils import is_torch_greater_or_equal_than_1_13
from transformers.utils import is_torch_fx_available
"""

TORCH_HELPERS_PATCHED = '''\
import torch
# opensci-patch: moved_helpers (a generated file's helper, missing or moved in some transformers release)
try:
    from transformers.pytorch_utils import is_torch_greater_or_equal_than_1_13
except ImportError:
    is_torch_greater_or_equal_than_1_13 = tuple(map(int, torch.__version__.split(".")[:2])) >= (1, 13)

# opensci-patch: moved_helpers (a generated file's helper, missing or moved in some transformers release)
try:
    from transformers.utils import is_torch_fx_available
except ImportError:
    def is_torch_fx_available():
        """Stand-in (opensci-patch) for >= 5.0: whether torch.fx imports, as 4.x answers it."""
        import importlib.util

        return importlib.util.find_spec("torch.fx") is not None
'''


def test_removed_torch_helpers_get_stand_ins_that_answer_for_the_installed_torch():
    outcome = PATCH.apply(TORCH_HELPERS, "modeling_x.py")
    assert (outcome.status, outcome.source) == ("applied", TORCH_HELPERS_PATCHED)
    assert PATCH.apply(outcome.source).status == "already-applied"
    pytest.importorskip("torch")
    namespace: dict = {}
    exec(compile(outcome.source, "modeling_x.py", "exec"), namespace)  # the installed release lacks the second
    assert namespace["is_torch_greater_or_equal_than_1_13"] is True and namespace["is_torch_fx_available"]() is True


WHOLE_BEFORE = """\
from transformers.configuration_utils import PretrainedConfig, layer_type_validation
from transformers.modeling_utils import PreTrainedModel


class TinyModel(PreTrainedModel):
    config: PretrainedConfig
    base_model_prefix = "model"
"""

WHOLE_AFTER = '''\
from transformers.configuration_utils import PretrainedConfig

# opensci-patch: moved_helpers (a generated file's helper, missing or moved in some transformers release)
try:
    from transformers.configuration_utils import layer_type_validation
except ImportError:
    def layer_type_validation(*args, **kwargs):
        """Stand-in (opensci-patch) for < 4.53: validation only."""
        return None

from transformers.modeling_utils import PreTrainedModel


class TinyModel(PreTrainedModel):
    config: PretrainedConfig
    # opensci-patch: moved_helpers (transformers < 4.54 reads config_class, not the annotation)
    config_class = PretrainedConfig
    base_model_prefix = "model"
'''


def test_whole_output_a_guarded_import_and_the_config_class_of_the_annotation():
    assert_patch("moved_helpers", WHOLE_BEFORE, WHOLE_AFTER)
