"""rope_default: the "default" rope init inlined (bit-identical to 4.48's), other rope types left to the registry."""

from __future__ import annotations

import textwrap
from types import SimpleNamespace

import pytest
from patch_sources import assert_patch, function_of

from opensci_patch.rewrite.patches import by_name


def _rope_448(config, device=None):
    """transformers 4.48 `_compute_default_rope_parameters`, verbatim in substance."""
    import torch

    base = config.rope_theta
    partial_rotary_factor = config.partial_rotary_factor if hasattr(config, "partial_rotary_factor") else 1.0
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    dim = int(head_dim * partial_rotary_factor)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim)), 1.0


@pytest.mark.parametrize(
    "config",
    [
        SimpleNamespace(rope_theta=10000.0, hidden_size=96, num_attention_heads=4, head_dim=24),
        SimpleNamespace(rope_theta=500000.0, hidden_size=2048, num_attention_heads=16, head_dim=128),
        SimpleNamespace(
            rope_theta=10000, hidden_size=96, num_attention_heads=4, head_dim=24, partial_rotary_factor=0.5
        ),
    ],
    ids=["fixture", "llama3-like", "partial-rotary"],
)
def test_inlined_default_rope_is_bit_identical_to_448(patched_source: str, config):
    torch = pytest.importorskip("torch")
    rope = function_of(patched_source, "_opensci_default_rope_init", torch=torch)
    inv_freq, scaling = rope(config, torch.device("cpu"))
    expected, _ = _rope_448(config)
    assert torch.equal(inv_freq, expected)
    assert scaling == 1.0


def test_inlined_default_rope_reads_rope_theta_from_rope_parameters(patched_source: str):
    """transformers 5.x may keep rope_theta only in `rope_parameters`."""
    torch = pytest.importorskip("torch")
    rope = function_of(patched_source, "_opensci_default_rope_init", torch=torch)
    moved = SimpleNamespace(rope_parameters={"rope_theta": 500000.0}, hidden_size=96, num_attention_heads=4)
    plain = SimpleNamespace(rope_theta=500000.0, hidden_size=96, num_attention_heads=4, head_dim=24)
    assert torch.equal(rope(moved)[0], _rope_448(plain)[0])


def test_rope_lookup_keeps_other_rope_types_in_the_registry(patched_source: str):
    assert (
        'self.rope_init_fn = _opensci_default_rope_init if self.rope_type == "default" '
        "else ROPE_INIT_FUNCTIONS[self.rope_type]" in patched_source
    )


def test_rope_lookup_used_as_a_call_is_parenthesised():
    source = textwrap.dedent(
        """
        import torch
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        def init(config, rope_type):
            return ROPE_INIT_FUNCTIONS[rope_type](config, None)[0] * 2
        """
    )
    patched = by_name("rope_default").apply(source).source
    guard = '(_opensci_default_rope_init if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type])'
    assert f"return {guard}(config, None)[0] * 2" in patched


def test_rope_lookup_of_the_literal_default_key_is_replaced_outright():
    source = "import torch\nfrom transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS\n\n\n"
    source += 'rope_init = ROPE_INIT_FUNCTIONS["default"]\nlinear = ROPE_INIT_FUNCTIONS["linear"]\n'
    outcome = by_name("rope_default").apply(source)
    assert outcome.status == "applied"
    assert "rope_init = _opensci_default_rope_init\n" in outcome.source
    assert 'linear = ROPE_INIT_FUNCTIONS["linear"]\n' in outcome.source
    assert by_name("rope_default").apply(outcome.source).status == "already-applied"


def test_whole_output_the_lookup_is_guarded_and_the_function_inlined_above_its_first_use():
    # hand-written but for the inserted function, the patch's DEFINITION (its numerics are tested above)
    from opensci_patch.rewrite.patches.rope_default import DEFINITION

    head = "import torch\nfrom transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS\n\nX = 1\n"
    before = head + '''

class Rotary(torch.nn.Module):
    def __init__(self, config):
        self.fn = ROPE_INIT_FUNCTIONS[config.rope_type]
'''
    after = head + '''

# opensci-patch: rope_default (transformers 5.x has no ROPE_INIT_FUNCTIONS["default"])''' + DEFINITION + '''

class Rotary(torch.nn.Module):
    def __init__(self, config):
        # opensci-patch: rope_default (transformers 5.x has no ROPE_INIT_FUNCTIONS["default"])
        self.fn = _opensci_default_rope_init if config.rope_type == "default" else ROPE_INIT_FUNCTIONS[config.rope_type]
'''
    assert_patch("rope_default", before, after)
