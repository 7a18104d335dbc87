"""The code moved_helpers inserts into a model file: stand-ins for library helpers a release lacks.

Data, not logic: the code is in real Python files (`templates/stand_ins.py`, `templates/attn_mask_utils.py`,
`templates/old_adapters.py`), each template plain Python that becomes part of the user's file, so each must
work on its own, whichever helpers the installed release lacks. `moved_helpers` decides where they go.

The stand-ins for `transformers.modeling_attn_mask_utils` (5.24 removed it; 4.4x-era Llama-style files import
`AttentionMaskConverter` from it, older ones the `_prepare_4d_*` and `_create_4d_causal_attention_mask` helpers)
are 5.23.0's code, operation for operation, without its deprecation warnings (4.48's copy has none either), its
docstrings and its type annotations; its tracing helpers are inlined. Each is self-contained (a file may import
any subset of the names), so a file importing several names carries one copy of the converter per name: only
one of them runs, and only where the module is gone. The mask stand-ins build the masks 4.54 builds.
"""

from __future__ import annotations

from opensci_patch.rewrite.templates import section, sections

ADAPTER = "_opensci_mask_keywords"
MASKS = ("create_causal_mask", "create_sliding_window_causal_mask")
ATTN_MASK_UTILS = "transformers.modeling_attn_mask_utils"
ATTN_MASK_NAMES = (  # every public or imported name 5.23's module has
    "AttentionMaskConverter",
    "_prepare_4d_causal_attention_mask",
    "_prepare_4d_causal_attention_mask_for_sdpa",
    "_prepare_4d_attention_mask",
    "_prepare_4d_attention_mask_for_sdpa",
    "_create_4d_causal_attention_mask",
)


def attn_mask_stand_in(name: str) -> str:
    """The stand-in source for one name of `modeling_attn_mask_utils`: the tracing helpers, the converter (named
    `name` where that is the converter, else `_OpensciAttentionMaskConverter`), then the name's own function."""
    code = sections("attn_mask_utils")
    converter = name if name == "AttentionMaskConverter" else "_OpensciAttentionMaskConverter"
    text = code["tracing"] + code["converter"].replace("CONVERTER", converter)
    if name != "AttentionMaskConverter":
        text += "\n" + code[name].replace("CONVERTER", converter)
    return text


def _stand_ins() -> dict[str, str]:
    """name -> stand-in source (defines `name`), used when importing it raises ImportError."""
    code = dict(sections("stand_ins"))
    del code["cache"], code["adapter"]
    head, mask = "GenericForQuestionAnswering", "create_causal_mask"
    for other in ("GenericForSequenceClassification", "GenericForTokenClassification"):
        code[other] = code[head].replace(head, other)
    window = "sliding_window = getattr(config, 'sliding_window', None)"
    sliding = "create_sliding_window_causal_mask"
    code[sliding] = code[mask].replace(mask, sliding).replace("sliding_window = None", window)
    return code | {name: attn_mask_stand_in(name) for name in ATTN_MASK_NAMES}


STAND_INS = _stand_ins()
NEEDS_TORCH = {"GradientCheckpointingLayer", "is_torch_greater_or_equal_than_1_13", *MASKS, *ATTN_MASK_NAMES}

CACHE = "DynamicCache"
CACHE_CHECK = "_opensci_cache_takes_config"
CACHE_DEF = section("stand_ins", "cache")

# The keyword adapter as this patch writes it. Keywords 4.54 code passes -> what later releases call them:
# `input_embeds` -> `inputs_embeds` (5.2), `past_key_values` -> `cache` (5.24, positional, no **kwargs); the new
# name wins wherever the helper takes it (5.25 lists the deprecated `past_key_values` too and warns when it is used).
ADAPTER_DEF = section("stand_ins", "adapter")

# Adapters earlier versions of this patch wrote (newest first): a file hotfixed with one of them is upgraded in place.
OLD_ADAPTER_DEFS = tuple(sections("old_adapters").values())
