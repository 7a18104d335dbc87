"""Functions copied from transformers 4.48, inlined by the registry-lookup patches (`patches/lookup.py`).

`rope_default`: 4.48's `_compute_default_rope_parameters` (5.x has no `ROPE_INIT_FUNCTIONS["default"]`);
`sdpa_gqa`: 4.48's `sdpa_attention_forward` (never passes `enable_gqa`). Each section is one function,
inserted above the first statement that looks the table up.
Header (not inserted): `torch`, which the patched file imports.
"""

import torch


# --- template: rope_default ---
def _opensci_default_rope_init(config, device=None, seq_len=None, **rope_kwargs):
    """RoPE inverse frequencies as transformers 4.48 `_compute_default_rope_parameters` computes them.

    Inlined because transformers 5.x has no `ROPE_INIT_FUNCTIONS["default"]`. Returns
    `(inv_freq, attention_scaling)`.
    """
    rope_parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    base = getattr(config, "rope_theta", None)
    if base is None:
        base = rope_parameters.get("rope_theta")
    if base is None:
        raise ValueError("the config has no rope_theta (neither as an attribute nor in rope_parameters)")
    partial_rotary_factor = getattr(config, "partial_rotary_factor", None)
    if partial_rotary_factor is None:
        partial_rotary_factor = rope_parameters.get("partial_rotary_factor", 1.0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * partial_rotary_factor)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
    return inv_freq, 1.0


# --- template: sdpa_gqa ---
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
