"""sdpa_gqa: pin the SDPA attention path to what transformers 4.48 did.

From 4.54 the transformers SDPA wrapper passes `enable_gqa=True` to
`torch.nn.functional.scaled_dot_product_attention` (on 4.54-5.2 whenever torch >= 2.5 and there
is no mask, even for plain multi-head attention), which can select a different kernel than 4.x.

Detects: lookups `ALL_ATTENTION_FUNCTIONS[key]` (or `ALL_ATTENTION_FUNCTIONS.get_interface(key, ...)`).
Rewrites: `_opensci_sdpa_attention_forward if key == "sdpa" else <lookup>`, and inlines
`_opensci_sdpa_attention_forward`, a copy of 4.48's `sdpa_attention_forward` (repeat k/v, slice
the mask, contiguous inputs, no `enable_gqa`). Eager and flash attention are unchanged.
Verifies: every lookup is guarded and the function is defined at module level.
"""

from __future__ import annotations

from opensci_patch.rewrite.patches.lookup import GuardedLookup

NAME = "sdpa_gqa"
WHY = "transformers >= 4.54 passes enable_gqa=True to torch SDPA"

DEFINITION = '''
def _opensci_sdpa_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """SDPA attention exactly as transformers 4.48 runs it (never passes `enable_gqa`)."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    if n_rep > 1:
        batch, num_key_value_heads, slen, head_dim = key.shape
        key = key[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
        key = key.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)
        value = value[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
        value = value.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)
    causal_mask = attention_mask
    if attention_mask is not None:
        causal_mask = causal_mask[:, :, :, : key.shape[-2]]
    query = query.contiguous()
    key = key.contiguous()
    value = value.contiguous()
    if is_causal is None:
        is_causal = causal_mask is None and query.shape[2] > 1
    attn_output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=causal_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal
    )
    return attn_output.transpose(1, 2).contiguous(), None
'''

LOOKUP = GuardedLookup(
    "ALL_ATTENTION_FUNCTIONS", "sdpa", "_opensci_sdpa_attention_forward", DEFINITION, NAME, WHY, ("get_interface",)
)


PATCH = LOOKUP.as_patch(70, "route 'sdpa' attention through an inlined 4.48-style SDPA call (no enable_gqa)")
