"""generation_defaults: a config's generation parameters read with transformers 4.x's defaults (5.x has none)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import FIXTURE_DIR
from patch_sources import GENERATED, MAX_LENGTH_43, assert_patch, function_of

from opensci_patch.rewrite.patches import by_name

PATCH = by_name("generation_defaults")

BEFORE = MAX_LENGTH_43

AFTER = '''\
import torch


# opensci-patch: generation_defaults (transformers 5.x configs have no generation defaults)
def _opensci_generation_default(config, name):
    """`config.<name>`, or transformers 4.x's default for that generation parameter (5.x configs have none)."""
    defaults = {
        "max_length": 20,
        "min_length": 0,
        "do_sample": False,
        "early_stopping": False,
        "num_beams": 1,
        "num_beam_groups": 1,
        "diversity_penalty": 0.0,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
        "typical_p": 1.0,
        "repetition_penalty": 1.0,
        "length_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "encoder_no_repeat_ngram_size": 0,
        "bad_words_ids": None,
        "num_return_sequences": 1,
        "output_scores": False,
        "return_dict_in_generate": False,
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
        "remove_invalid_values": False,
        "exponential_decay_length_penalty": None,
        "suppress_tokens": None,
        "begin_suppress_tokens": None,
    }
    return getattr(config, name, defaults[name])


class Model(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        # opensci-patch: generation_defaults (transformers 5.x configs have no generation defaults)
        self.limit = _opensci_generation_default(config, "max_length")
        self.generation_config.max_length = 5
        config.num_beams = 1
'''


def test_whole_output_and_a_second_run_is_already_patched():
    assert_patch(PATCH, BEFORE, AFTER, filename="modeling_x.py")


def test_the_defaults_are_4_48_s_and_a_set_value_wins():
    helper = function_of(AFTER, "_opensci_generation_default")
    assert helper(SimpleNamespace(), "max_length") == 20 and helper(SimpleNamespace(), "top_k") == 50
    assert helper(SimpleNamespace(max_length=7), "max_length") == 7


def test_the_installed_release_s_config_has_no_max_length_and_the_helper_gives_20():
    transformers = pytest.importorskip("transformers")
    config = transformers.PretrainedConfig()
    if hasattr(config, "max_length"):
        pytest.skip("this transformers still sets generation defaults on configs (4.x)")
    assert function_of(AFTER, "_opensci_generation_default")(config, "max_length") == 20


def test_files_without_such_reads_are_not_applicable():
    for text in (
        (FIXTURE_DIR / "modeling_opensci.py").read_text(),
        GENERATED,
        "def f(tokenizer):\n    return tokenizer.max_length\n",
    ):
        outcome = PATCH.apply(text)
        assert (outcome.status, outcome.source) == ("not-applicable", text)
