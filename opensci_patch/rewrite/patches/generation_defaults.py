"""generation_defaults: 5.x configs have no generation defaults (`config.max_length`, `config.num_beams`, ...).

Every 4.x `PretrainedConfig` carries 25 generation parameters with defaults (4.48.0's
`PretrainedConfig._get_global_generation_defaults()`: `max_length` 20, `num_beams` 1, `top_k` 50, ...). 5.0
removed them: `PreTrainedConfig.__init__` pops them from its keyword arguments and sets none (measured on
5.0.0 and 5.25.0, also where config.json names one), so a 4.3x-era model file that reads `config.max_length`
while building the model raises AttributeError on every 5.x.

Rewrites: each read `X.<parameter>` of a config object (`config`, `self.config`, `model_config`, ...: a name
ending in `config`, not `generation_config`) becomes `_opensci_generation_default(X, "<parameter>")`, inserted
once: the attribute where the config has it (every 4.x config; a class setting it itself), else 4.48.0's
default. The same value as 4.x wherever config.json does not set it; where it does, 5.x has already dropped the
value before the model file runs, and the file gets 4.x's default.

Not applicable to the shipped and generated open-sci files. Detects: those reads; refuses
`getattr(X, "<parameter>")` without a default. Verifies: none is left and
the helper is defined.
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
    refuse_by_name,
    replace,
)
from opensci_patch.rewrite.patches.syntax import full_name

NAME = "generation_defaults"
HELPER = "_opensci_generation_default"
WHY = "transformers 5.x configs have no generation defaults"
DEFAULTS = {  # transformers 4.48.0, PretrainedConfig._get_global_generation_defaults()
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
_ENTRIES = "".join(f"\n        {name!r}: {value!r}," for name, value in DEFAULTS.items()).replace("'", '"')
DEFINITIONS = {
    HELPER: f'''
def {HELPER}(config, name):
    """`config.<name>`, or transformers 4.x's default for that generation parameter (5.x configs have none)."""
    defaults = {{{_ENTRIES}
    }}
    return getattr(config, name, defaults[name])
'''
}


def _config(node: cst.Attribute) -> bool:
    owner = (full_name(node.value) or "").split(".")[-1]
    return node.attr.value in DEFAULTS and owner.endswith("config") and owner != "generation_config"


def _builds(tree: cst.Module) -> dict[int, Build]:
    builds: dict[int, Build] = {}
    for name in DEFAULTS:
        for read in attribute_reads(tree, name, _config):
            builds[id(read)] = lambda n: helper_call(HELPER, [n.value, cst.SimpleString(f'"{n.attr.value}"')], n)
    return builds


def inspect(tree: cst.Module) -> State:
    refuse_by_name(tree, list(DEFAULTS), "without a default it raises on 5.x", arity=(2,))
    return helper_state(tree, _builds(tree), DEFINITIONS)  # DEFINITIONS: HELPER alone


def rewrite(tree: cst.Module) -> cst.Module:
    return insert_helpers(replace(tree, _builds(tree), NAME, WHY), DEFINITIONS, NAME, WHY)


PATCH = Patch(
    name=NAME,
    order=44,
    description="read a config's generation parameters with 4.x's defaults where a 5.x config has none",
    default=True,
    inspect=inspect,
    rewrite=rewrite,
)
