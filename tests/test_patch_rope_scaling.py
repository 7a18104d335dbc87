"""rope_scaling: a file indexing rope_scaling["type"] after an `is None` test reads 5.x's default dict as None."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import FIXTURE_DIR
from patch_sources import GENERATED, ROPE_SCALING_43, assert_patch, function_of

from opensci_patch.rewrite.patches import by_name

PATCH = by_name("rope_scaling")

BEFORE = ROPE_SCALING_43

AFTER = '''\
# opensci-patch: rope_scaling (transformers 5.x gives a default rope_scaling dict where 4.x gave None)
def _opensci_rope_scaling(config):
    """`config.rope_scaling`, None where it only names the default rope (5.x: never None)."""
    rope_scaling = config.rope_scaling
    if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
        return None
    return rope_scaling


class Attention:
    def __init__(self, config):
        self.config = config
        # opensci-patch: rope_scaling (transformers 5.x gives a default rope_scaling dict where 4.x gave None)
        if _opensci_rope_scaling(config) is None:
            self.factor = 1.0
        else:
            # opensci-patch: rope_scaling (transformers 5.x gives a default rope_scaling dict where 4.x gave None)
            self.factor = _opensci_rope_scaling(config)["factor"]
        self.rope_scaling = None
'''


def test_whole_output_and_a_second_run_is_already_patched():
    assert_patch(PATCH, BEFORE, AFTER, filename="modeling_x.py")


def test_helper_reads_the_default_dict_as_none_and_keeps_real_scaling():
    helper = function_of(AFTER, "_opensci_rope_scaling")
    assert helper(SimpleNamespace(rope_scaling={"rope_theta": 1e4, "rope_type": "default"})) is None  # 5.x
    assert helper(SimpleNamespace(rope_scaling=None)) is None  # 4.x
    linear = {"type": "linear", "factor": 2.0, "rope_theta": 1e4, "rope_type": "linear"}
    assert helper(SimpleNamespace(rope_scaling=linear)) is linear
    with pytest.raises(AttributeError):
        helper(SimpleNamespace())


def test_helper_on_the_installed_release_s_config():
    transformers = pytest.importorskip("transformers")
    helper = function_of(AFTER, "_opensci_rope_scaling")
    assert helper(transformers.LlamaConfig(rope_scaling=None)) is None
    scaled = helper(transformers.LlamaConfig(rope_scaling={"type": "linear", "factor": 2.0}))
    assert scaled["factor"] == 2.0


def test_a_name_bound_from_rope_scaling_and_indexed_is_found():
    source = "def f(config):\n    scaling = config.rope_scaling\n    return scaling['type'] if scaling else None\n"
    outcome = PATCH.apply(source)
    assert outcome.status == "applied" and "scaling = _opensci_rope_scaling(config)" in outcome.source


def test_get_with_a_default_and_rope_type_keys_are_not_applicable():
    """The shipped file reads `config.rope_scaling.get("rope_type", ...)`: right with the default dict already."""
    for source in (
        (FIXTURE_DIR / "modeling_opensci.py").read_text(),
        (FIXTURE_DIR / "configuration_opensci.py").read_text(),
        GENERATED,
        "def f(config):\n    return config.rope_scaling['rope_type'] if config.rope_scaling else 'default'\n",
    ):
        outcome = PATCH.apply(source)
        assert (outcome.status, outcome.source) == ("not-applicable", source)
