"""sdpa_gqa: SDPA attention inlined without `enable_gqa` (torch < 2.5 lacks it), other backends left to the registry."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from patch_sources import assert_patch, function_of


@pytest.mark.parametrize("groups", [1, 2])
def test_inlined_sdpa_matches_attention_math_without_enable_gqa(patched_source: str, monkeypatch, groups: int):
    torch = pytest.importorskip("torch")
    sdpa = function_of(patched_source, "_opensci_sdpa_attention_forward", torch=torch)
    seen: list[dict] = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: seen.append(k) or real(*a, **k)
    )
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen)
    k, v = (torch.randn(2, 4 // groups, 5, 8, generator=gen) for _ in range(2))
    out, weights = sdpa(SimpleNamespace(num_key_value_groups=groups), q, k, v, None, scaling=0.25)
    k_rep, v_rep = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    scores = (q @ k_rep.transpose(2, 3)) * 0.25 + torch.full((5, 5), float("-inf")).triu(1)
    expected = (scores.softmax(-1) @ v_rep).transpose(1, 2)
    assert weights is None
    assert torch.allclose(out, expected, atol=1e-6)
    assert len(seen) == 1 and "enable_gqa" not in seen[0] and seen[0]["is_causal"] is True


def test_sdpa_dispatch_keeps_other_backends_in_the_registry(patched_source: str):
    assert (
        'attention_interface = _opensci_sdpa_attention_forward if self.config._attn_implementation == "sdpa" '
        "else ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]" in patched_source
    )


def test_sdpa_runs_without_enable_gqa_and_matches_eager(loaded: dict):
    assert loaded["sdpa_calls"] == 3  # one per layer
    assert "enable_gqa" not in loaded["sdpa_kwargs"]
    assert loaded["sdpa_max_diff"] < 1e-5


def test_whole_output_the_lookup_is_guarded_and_the_function_inlined_above_its_first_use():
    # hand-written but for the inserted function, the patch's DEFINITION (its calls are tested above)
    from opensci_patch.rewrite.patches.sdpa_gqa import DEFINITION

    before = '''import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def attend(m, q, k, v, mask):
    f = ALL_ATTENTION_FUNCTIONS.get_interface(m.impl, None)
    return f(m, q, k, v, mask)
'''
    after = '''import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


# opensci-patch: sdpa_gqa (transformers >= 4.54 passes enable_gqa=True to torch SDPA)''' + DEFINITION + '''

def attend(m, q, k, v, mask):
    # opensci-patch: sdpa_gqa (transformers >= 4.54 passes enable_gqa=True to torch SDPA)
    f = _opensci_sdpa_attention_forward if m.impl == "sdpa" else ALL_ATTENTION_FUNCTIONS.get_interface(m.impl, None)
    return f(m, q, k, v, mask)
'''
    assert_patch("sdpa_gqa", before, after)
