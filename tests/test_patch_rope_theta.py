"""rope_theta: reads of `config.rope_theta` go through `rope_parameters` where a 5.x library config has no attribute."""

from __future__ import annotations

import ast
from types import SimpleNamespace

import pytest
from conftest import FIXTURE_DIR
from patch_sources import LLAMA_STYLE, assert_patch

from opensci_patch._util.errors import PatchError
from opensci_patch.rewrite.patches import by_name

PATCH = by_name("rope_theta")

CONFIGURATION = """\
class LlamaLikeConfig:
    def __init__(self, rope_theta=10000.0):
        self.rope_theta = rope_theta
        self.rope_theta += 0.0
        self.other = {"rope_theta": self.rope_theta}
"""


def _helper(source: str):
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_opensci_rope_theta")
    namespace: dict = {}
    exec(compile(ast.Module([node], type_ignores=[]), "helper", "exec"), namespace)
    return namespace["_opensci_rope_theta"]


def test_reads_become_helper_calls_and_writes_stay():
    patched = PATCH.apply(LLAMA_STYLE, "modeling_llama.py")
    assert patched.status == "applied"
    assert "self.rope_theta = _opensci_rope_theta(config)" in patched.source
    assert "(self.rope_theta ** " in patched.source  # what the object stored itself: read as before
    assert patched.source.count("# opensci-patch: rope_theta") == 2  # the helper and the changed line
    again = PATCH.apply(patched.source)
    assert again.status == "already-applied" and again.source == patched.source


def test_helper_gives_the_attribute_or_the_rope_parameters_entry():
    helper = _helper(PATCH.apply(LLAMA_STYLE).source)
    assert helper(SimpleNamespace(rope_theta=5e5, rope_parameters={"rope_theta": 1.0})) == 5e5  # 4.x, custom
    assert helper(SimpleNamespace(rope_parameters={"rope_theta": 5e5, "rope_type": "default"})) == 5e5  # 5.x
    with pytest.raises(AttributeError, match="rope_theta"):
        helper(SimpleNamespace(rope_parameters={"rope_type": "default"}))
    with pytest.raises(AttributeError, match="rope_theta"):
        helper(SimpleNamespace())


def test_helper_on_the_installed_library_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(rope_theta=500000.0)
    assert _helper(PATCH.apply(LLAMA_STYLE).source)(config) == 500000.0


def test_patched_rotary_init_runs_on_a_library_config():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(rope_theta=500000.0, hidden_size=64, num_attention_heads=4)
    namespace: dict = {}
    exec(compile(PATCH.apply(LLAMA_STYLE).source, "modeling_llama.py", "exec"), namespace)
    rotary = namespace["LlamaRotaryEmbedding"](config)
    expected = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert torch.equal(rotary.inv_freq, expected)


def test_configuration_files_are_not_applicable():
    for source in (CONFIGURATION, (FIXTURE_DIR / "configuration_opensci.py").read_text()):
        outcome = PATCH.apply(source, "configuration_x.py")
        assert outcome.status == "not-applicable" and outcome.source == source


def test_refuses_getattr_with_a_default_that_would_hide_the_configured_value():
    source = LLAMA_STYLE.replace("config.rope_theta", 'getattr(config, "rope_theta", 10000.0)')
    with pytest.raises(PatchError, match=r"patch 'rope_theta' cannot rewrite modeling_llama\.py: .*getattr"):
        PATCH.apply(source, "modeling_llama.py")


WHOLE_BEFORE = """\
import torch


class Rotary(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.rope_theta = config.rope_theta
        self.base = self.rope_theta
"""

WHOLE_AFTER = '''\
import torch


# opensci-patch: rope_theta (transformers 5.x configs keep rope_theta in rope_parameters)
def _opensci_rope_theta(config):
    """`config.rope_theta`, or where the config keeps it only in `rope_parameters` (5.x library configs), from there."""
    if not hasattr(config, "rope_theta"):
        rope_parameters = getattr(config, "rope_parameters", None)
        if isinstance(rope_parameters, dict) and "rope_theta" in rope_parameters:
            return rope_parameters["rope_theta"]
    return config.rope_theta


class Rotary(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        # opensci-patch: rope_theta (transformers 5.x configs keep rope_theta in rope_parameters)
        self.rope_theta = _opensci_rope_theta(config)
        self.base = self.rope_theta
'''


def test_whole_output_the_config_read_goes_through_the_helper_above_the_class():
    assert_patch("rope_theta", WHOLE_BEFORE, WHOLE_AFTER)
