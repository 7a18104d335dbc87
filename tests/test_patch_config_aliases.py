"""config_aliases: a configuration class's own names for the sizes transformers reads get attribute_map entries."""

from __future__ import annotations

import pytest
from conftest import FIXTURE_DIR
from patch_sources import OWN_NAMES_CONFIG, assert_patch

from opensci_patch._util.errors import PatchError
from opensci_patch.rewrite.patches import by_name

PATCH = by_name("config_aliases")

BEFORE = OWN_NAMES_CONFIG

AFTER = """\
from transformers import PretrainedConfig


class GlmLikeConfig(PretrainedConfig):
    model_type = "glm_like"
    # opensci-patch: config_aliases (transformers reads the standard config names: 4.57's cache reads num_hidden_layers)
    attribute_map = {"num_hidden_layers": "num_layers"}

    def __init__(self, num_layers=2, hidden_size=64, **kwargs):
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        super().__init__(**kwargs)


class GptLikeConfig(PretrainedConfig):
    model_type = "gpt_like"
    # opensci-patch: config_aliases (transformers reads the standard config names: 4.57's cache reads num_hidden_layers)
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}

    def __init__(self, n_layer=2, n_embd=64, n_head=4, **kwargs):
        self.n_layer = n_layer
        self.n_embd = n_embd
        self.n_head = n_head
        super().__init__(**kwargs)
"""


def test_whole_output_and_a_second_run_is_already_patched():
    assert_patch(PATCH, BEFORE, AFTER, filename="configuration_x.py")


def test_the_installed_release_reads_the_standard_names_through_the_map():
    pytest.importorskip("transformers")
    namespace: dict = {}
    exec(compile(AFTER, "configuration_x.py", "exec"), namespace)
    glm, gpt = namespace["GlmLikeConfig"](num_layers=3), namespace["GptLikeConfig"](n_layer=5, n_head=2)
    assert (glm.num_hidden_layers, gpt.num_hidden_layers, gpt.num_attention_heads) == (3, 5, 2)
    assert "num_hidden_layers" not in glm.to_dict() and glm.to_dict()["num_layers"] == 3


def test_standard_names_and_human_maps_are_not_applicable():
    mapped = BEFORE.replace('{"hidden_size": "n_embd"}', '{"hidden_size": "n_embd", "num_hidden_layers": "n_layer"}')
    for text in (
        (FIXTURE_DIR / "configuration_opensci.py").read_text(),
        (FIXTURE_DIR / "modeling_opensci.py").read_text(),
        mapped[mapped.index("class GptLikeConfig") :].replace("        self.n_head = n_head\n", ""),
    ):
        outcome = PATCH.apply(text)
        assert (outcome.status, outcome.source) == ("not-applicable", text)


def test_an_attribute_map_that_is_no_dict_of_names_is_refused():
    source = BEFORE.replace('attribute_map = {"hidden_size": "n_embd"}', "attribute_map = dict(hidden_size='n_embd')")
    with pytest.raises(PatchError, match=r"patch 'config_aliases' cannot rewrite configuration_x\.py: .*attribute_map"):
        PATCH.apply(source, "configuration_x.py")
