"""Stand-ins for `transformers.modeling_attn_mask_utils` (removed in 5.24): 5.23.0's code (moved_helpers).

Inserted by moved_helpers (`patches/stand_ins.py`): for each imported name, `tracing` and `converter`, then the name's
own function (none for `AttentionMaskConverter`). `CONVERTER` is replaced by the converter's class name:
`AttentionMaskConverter` where that name is imported, else `_OpensciAttentionMaskConverter`.
Header (not inserted): `torch`, which the patched file imports.
"""

# 5.23.0's own code, operation for operation:
# ruff: noqa: B009

import torch

# isort: split


# --- template: tracing ---
import dataclasses


def _opensci_is_torchdynamo_compiling():
    """transformers 5.23's `utils.import_utils.is_torchdynamo_compiling` (opensci-patch)."""
    try:
        import torch

        return torch.compiler.is_compiling()
    except Exception:
        return False


def _opensci_is_tracing(tensor=None):
    """transformers 5.23's `utils.import_utils.is_tracing` (opensci-patch): dynamo, jit, CUDA/XPU stream
    capture; for a tensor also fx proxies, FakeTensor and jax.jit (torchax)."""
    import torch

    checks = [
        _opensci_is_torchdynamo_compiling,
        lambda: torch.jit.is_tracing(),
        lambda: torch.cuda.is_current_stream_capturing(),
        lambda: torch.xpu.is_current_stream_capturing(),
    ]
    if tensor is not None:
        checks += [
            lambda: isinstance(tensor, __import__("torch.fx").fx.Proxy),
            lambda: isinstance(tensor, getattr(torch, "_subclasses").FakeTensor),
            lambda: hasattr(tensor, "jax") and isinstance(tensor.jax(), getattr(__import__("jax"), "core").Tracer),
        ]
    tracing = False
    for check in checks:
        try:
            tracing |= bool(check())
        except Exception:
            pass
    return tracing


# --- template: converter ---
@dataclasses.dataclass
class CONVERTER:
    """Stand-in (opensci-patch) for transformers >= 5.24: 5.23's AttentionMaskConverter."""

    is_causal: bool
    sliding_window: int

    def __init__(self, is_causal, sliding_window=None):
        self.is_causal = is_causal
        self.sliding_window = sliding_window

        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(
                "Make sure that when passing `sliding_window` that its value is a strictly positive integer, "
                f"not `{self.sliding_window}`"
            )

    def to_causal_4d(self, batch_size, query_length, key_value_length, dtype, device="cpu"):
        if not self.is_causal:
            raise ValueError(f"Please use `to_causal_4d` only if {self.__class__} has `is_causal` set to True.")

        input_shape = (batch_size, query_length)
        past_key_values_length = key_value_length - query_length

        causal_4d_mask = None
        if input_shape[-1] > 1 or self.sliding_window is not None:
            causal_4d_mask = self._make_causal_mask(
                input_shape,
                dtype,
                device=device,
                past_key_values_length=past_key_values_length,
                sliding_window=self.sliding_window,
            )

        return causal_4d_mask

    def to_4d(self, attention_mask_2d, query_length, dtype, key_value_length=None):
        input_shape = (attention_mask_2d.shape[0], query_length)

        causal_4d_mask = None
        if (input_shape[-1] > 1 or self.sliding_window is not None) and self.is_causal:
            if key_value_length is None:
                raise ValueError(
                    "This attention mask converter is causal. Make sure to pass `key_value_length` to correctly "
                    "create a causal mask."
                )

            past_key_values_length = key_value_length - query_length
            causal_4d_mask = self._make_causal_mask(
                input_shape,
                dtype,
                device=attention_mask_2d.device,
                past_key_values_length=past_key_values_length,
                sliding_window=self.sliding_window,
            )
        elif self.sliding_window is not None:
            raise NotImplementedError("Sliding window is currently only implemented for causal masking")

        expanded_attn_mask = self._expand_mask(attention_mask_2d, dtype, tgt_len=input_shape[-1]).to(
            attention_mask_2d.device
        )

        if causal_4d_mask is not None:
            expanded_attn_mask = causal_4d_mask.masked_fill(expanded_attn_mask.bool(), torch.finfo(dtype).min)

        expanded_4d_mask = expanded_attn_mask

        return expanded_4d_mask

    @staticmethod
    def _make_causal_mask(input_ids_shape, dtype, device, past_key_values_length=0, sliding_window=None):
        bsz, tgt_len = input_ids_shape
        mask = torch.full((tgt_len, tgt_len), torch.finfo(dtype).min, device=device)
        mask_cond = torch.arange(mask.size(-1), device=device)
        mask.masked_fill_(mask_cond < (mask_cond + 1).view(mask.size(-1), 1), 0)

        mask = mask.to(dtype)

        if past_key_values_length > 0:
            mask = torch.cat([torch.zeros(tgt_len, past_key_values_length, dtype=dtype, device=device), mask], dim=-1)

        if sliding_window is not None:
            diagonal = past_key_values_length - sliding_window - 1

            context_mask = torch.tril(torch.ones_like(mask, dtype=torch.bool), diagonal=diagonal)
            if _opensci_is_torchdynamo_compiling():
                mask = mask.clone()
            mask.masked_fill_(context_mask, torch.finfo(dtype).min)

        return mask[None, None, :, :].expand(bsz, 1, tgt_len, tgt_len + past_key_values_length)

    @staticmethod
    def _expand_mask(mask, dtype, tgt_len=None):
        bsz, src_len = mask.size()
        tgt_len = tgt_len if tgt_len is not None else src_len

        expanded_mask = mask[:, None, None, :].expand(bsz, 1, tgt_len, src_len).to(dtype)

        inverted_mask = torch.tensor(1.0, dtype=dtype) - expanded_mask

        return inverted_mask.masked_fill(inverted_mask.to(torch.bool), torch.finfo(dtype).min)

    @staticmethod
    def _unmask_unattended(expanded_mask, min_dtype):
        if expanded_mask.dtype == torch.bool:
            raise ValueError(
                "AttentionMaskConverter._unmask_unattended expects a float `expanded_mask`, got a BoolTensor."
            )

        return expanded_mask.mul(~torch.all(expanded_mask == min_dtype, dim=-1, keepdim=True))

    @staticmethod
    def _ignore_causal_mask_sdpa(
        attention_mask, inputs_embeds, past_key_values_length, sliding_window=None, is_training=False
    ):
        _, query_length = inputs_embeds.shape[0], inputs_embeds.shape[1]
        key_value_length = query_length + past_key_values_length

        is_tracing_ = _opensci_is_tracing(inputs_embeds)

        ignore_causal_mask = False

        if attention_mask is None:
            if (
                (is_training or not is_tracing_)
                and (query_length == 1 or key_value_length == query_length)
                and (sliding_window is None or key_value_length < sliding_window)
            ):
                ignore_causal_mask = True
        elif sliding_window is None or key_value_length < sliding_window:
            if len(attention_mask.shape) == 4:
                return False
            elif not is_tracing_ and torch.all(attention_mask == 1):
                if query_length == 1 or key_value_length == query_length:
                    ignore_causal_mask = True

        return ignore_causal_mask


# --- template: _prepare_4d_causal_attention_mask ---
def _prepare_4d_causal_attention_mask(
    attention_mask, input_shape, inputs_embeds, past_key_values_length, sliding_window=None
):
    """Stand-in (opensci-patch) for transformers >= 5.24: 5.23's code."""
    attn_mask_converter = CONVERTER(is_causal=True, sliding_window=sliding_window)

    key_value_length = input_shape[-1] + past_key_values_length

    if attention_mask is not None and len(attention_mask.shape) == 2:
        attention_mask = attn_mask_converter.to_4d(
            attention_mask, input_shape[-1], key_value_length=key_value_length, dtype=inputs_embeds.dtype
        )
    elif attention_mask is not None and len(attention_mask.shape) == 4:
        expected_shape = (input_shape[0], 1, input_shape[1], key_value_length)
        if tuple(attention_mask.shape) != expected_shape:
            raise ValueError(
                f"Incorrect 4D attention_mask shape: {tuple(attention_mask.shape)}; expected: {expected_shape}."
            )
        else:
            inverted_mask = 1.0 - attention_mask
            attention_mask = inverted_mask.masked_fill(
                inverted_mask.to(torch.bool), torch.finfo(inputs_embeds.dtype).min
            )
    else:
        attention_mask = attn_mask_converter.to_causal_4d(
            input_shape[0], input_shape[-1], key_value_length, dtype=inputs_embeds.dtype, device=inputs_embeds.device
        )

    return attention_mask


# --- template: _prepare_4d_causal_attention_mask_for_sdpa ---
def _prepare_4d_causal_attention_mask_for_sdpa(
    attention_mask, input_shape, inputs_embeds, past_key_values_length, sliding_window=None
):
    """Stand-in (opensci-patch) for transformers >= 5.24: 5.23's code."""
    attn_mask_converter = CONVERTER(is_causal=True, sliding_window=sliding_window)

    key_value_length = input_shape[-1] + past_key_values_length

    is_tracing_ = _opensci_is_tracing(inputs_embeds)

    ignore_causal_mask = CONVERTER._ignore_causal_mask_sdpa(
        attention_mask=attention_mask,
        inputs_embeds=inputs_embeds,
        past_key_values_length=past_key_values_length,
        sliding_window=sliding_window,
    )

    if ignore_causal_mask:
        expanded_4d_mask = None
    elif attention_mask is None:
        expanded_4d_mask = attn_mask_converter.to_causal_4d(
            input_shape[0], input_shape[-1], key_value_length, dtype=inputs_embeds.dtype, device=inputs_embeds.device
        )
    else:
        if attention_mask.dim() == 4:
            expanded_4d_mask = attention_mask
        else:
            expanded_4d_mask = attn_mask_converter.to_4d(
                attention_mask,
                input_shape[-1],
                dtype=inputs_embeds.dtype,
                key_value_length=key_value_length,
            )

        if not is_tracing_ and expanded_4d_mask.device.type in ["cuda", "xpu"]:
            expanded_4d_mask = CONVERTER._unmask_unattended(
                expanded_4d_mask, min_dtype=torch.finfo(inputs_embeds.dtype).min
            )

    return expanded_4d_mask


# --- template: _prepare_4d_attention_mask ---
def _prepare_4d_attention_mask(mask, dtype, tgt_len=None):
    """Stand-in (opensci-patch) for transformers >= 5.24: 5.23's code."""
    return CONVERTER._expand_mask(mask=mask, dtype=dtype, tgt_len=tgt_len)


# --- template: _prepare_4d_attention_mask_for_sdpa ---
def _prepare_4d_attention_mask_for_sdpa(mask, dtype, tgt_len=None):
    """Stand-in (opensci-patch) for transformers >= 5.24: 5.23's code."""
    _, key_value_length = mask.shape
    tgt_len = tgt_len if tgt_len is not None else key_value_length

    if not _opensci_is_tracing(mask) and torch.all(mask == 1):
        return None
    else:
        return CONVERTER._expand_mask(mask=mask, dtype=dtype, tgt_len=tgt_len)


# --- template: _create_4d_causal_attention_mask ---
def _create_4d_causal_attention_mask(input_shape, dtype, device, past_key_values_length=0, sliding_window=None):
    """Stand-in (opensci-patch) for transformers >= 5.24: 5.23's code."""
    attn_mask_converter = CONVERTER(is_causal=True, sliding_window=sliding_window)

    key_value_length = past_key_values_length + input_shape[-1]
    attention_mask = attn_mask_converter.to_causal_4d(
        input_shape[0], input_shape[-1], key_value_length, dtype=dtype, device=device
    )

    return attention_mask
