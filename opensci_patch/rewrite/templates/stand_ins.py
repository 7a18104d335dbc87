"""Stand-ins for library helpers a release lacks, inserted by moved_helpers (`patches/stand_ins.py`).

A section named after a helper defines it, used as `except ImportError:` of the helper's import. Shared code is
written once with its first user's name: `GenericForQuestionAnswering` stands for the other `GenericFor*` heads,
`create_causal_mask` (`sliding_window = None`) for `create_sliding_window_causal_mask`; `stand_ins.py` replaces the
name (and the window). `cache` wraps an imported `DynamicCache`; `adapter` is the keyword adapter of the mask helpers.
Header (not inserted): what the patched file imports (`torch`) or what the section follows (`DynamicCache`).
"""

# the inserted code byte for byte as the hotfix has always written it (so its outputs stay the same):
# ruff: noqa: E501

import torch
from transformers import DynamicCache


# --- template: auto_docstring ---
def auto_docstring(obj=None, **kwargs):
    """Stand-in (opensci-patch): documentation only; returns what it decorates."""
    return obj if obj is not None else (lambda inner: inner)


# --- template: use_kernel_forward_from_hub ---
def use_kernel_forward_from_hub(layer_name):
    """Stand-in (opensci-patch): kernels from the hub are opt-in; keep the module's own forward."""
    return lambda cls: cls


# --- template: can_return_tuple ---
def can_return_tuple(func):
    """Stand-in (opensci-patch): the config's return_dict default, as 4.54 applies it."""
    import functools

    @functools.wraps(func)
    def wrapper(self, *args, **kwargs):
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        output = func(self, *args, **kwargs)
        return output if return_dict or isinstance(output, tuple) else output.to_tuple()

    return wrapper


# --- template: check_model_inputs ---
try:
    from transformers.utils.generic import merge_with_config_defaults
    from transformers.utils.output_capturing import capture_outputs

    def check_model_inputs(func=None, *, tie_last_hidden_states=True):
        """Stand-in (opensci-patch) for 5.2-5.22: config defaults merged around output capturing, as 5.2 does."""

        def wrap(function):
            return merge_with_config_defaults(capture_outputs(function, tie_last_hidden_states=tie_last_hidden_states))

        return wrap if func is None else wrap(func)

except ImportError:  # before 4.54

    def check_model_inputs(func=None, **options):
        """Stand-in (opensci-patch) for < 4.54: use_cache/return_dict defaults; no output recording."""
        import functools

        def wrap(function):
            @functools.wraps(function)
            def wrapper(self, *args, **kwargs):
                if kwargs.get("use_cache") is None:
                    kwargs["use_cache"] = getattr(self.config, "use_cache", None)
                if kwargs["use_cache"] and getattr(self, "gradient_checkpointing", False) and self.training:
                    kwargs["use_cache"] = False
                for flag in ("output_attentions", "output_hidden_states"):
                    wanted = kwargs.pop(flag, None)
                    if wanted or (wanted is None and getattr(self.config, flag, False)):
                        raise NotImplementedError(f"{flag} needs transformers >= 4.54 with this model file")
                return_dict = kwargs.pop("return_dict", None)
                if return_dict is None:
                    return_dict = getattr(self.config, "return_dict", True)
                output = function(self, *args, **kwargs)
                return output if return_dict or isinstance(output, tuple) else output.to_tuple()

            return wrapper

        return wrap if func is None else wrap(func)


# --- template: dynamic_rope_update ---
def dynamic_rope_update(rope_forward):
    """Stand-in (opensci-patch) for < 4.50: exact for rope types that never change inv_freq at run time."""
    import functools

    @functools.wraps(rope_forward)
    def wrapper(self, x, position_ids):
        if "dynamic" in self.rope_type or self.rope_type == "longrope":
            raise NotImplementedError(f"rope type {self.rope_type!r} needs transformers >= 4.50 with this model file")
        return rope_forward(self, x, position_ids)

    return wrapper


# --- template: GradientCheckpointingLayer ---
class GradientCheckpointingLayer(torch.nn.Module):
    """Stand-in (opensci-patch) for < 4.52: a plain module (no gradient checkpointing)."""


# --- template: GenericForQuestionAnswering ---
class GenericForQuestionAnswering:
    """Stand-in (opensci-patch) for < 4.54: this task head needs a newer transformers."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("GenericForQuestionAnswering needs transformers >= 4.54 with this model file")


# --- template: create_causal_mask ---
def create_causal_mask(config, input_embeds, attention_mask, cache_position, past_key_values, position_ids=None, **kwargs):
    """Stand-in (opensci-patch) for transformers < 4.53: the mask 4.54 builds for eager and SDPA attention."""
    sliding_window = None
    queries = cache_position
    kv_length = queries.shape[0] + (past_key_values.get_seq_length() if past_key_values is not None else 0)
    keys = torch.arange(kv_length, device=queries.device)
    allowed = keys[None, :] <= queries[:, None]
    if sliding_window is not None:
        allowed = allowed & (queries[:, None] - keys[None, :] < sliding_window)
    allowed = allowed[None, None].expand(input_embeds.shape[0], 1, -1, -1)
    padded = attention_mask is not None and not bool(attention_mask.all())
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :kv_length].bool()
    if getattr(config, "_attn_implementation", "eager") == "sdpa":
        if not padded and sliding_window is None and queries.shape[0] in (1, kv_length):
            return None  # causal order alone: SDPA runs with is_causal, as 4.54 lets it
        return allowed
    dtype = input_embeds.dtype
    return torch.where(allowed, torch.tensor(0.0, dtype=dtype, device=allowed.device), torch.finfo(dtype).min)


# --- template: layer_type_validation ---
def layer_type_validation(*args, **kwargs):
    """Stand-in (opensci-patch) for < 4.53: validation only."""
    return None


# --- template: is_torch_greater_or_equal_than_1_13 ---
is_torch_greater_or_equal_than_1_13 = tuple(map(int, torch.__version__.split(".")[:2])) >= (1, 13)


# --- template: is_torch_fx_available ---
def is_torch_fx_available():
    """Stand-in (opensci-patch) for >= 5.0: whether torch.fx imports, as 4.x answers it."""
    import importlib.util

    return importlib.util.find_spec("torch.fx") is not None


# --- template: cache ---
def _opensci_cache_takes_config(cache_class):
    import inspect

    return "config" in inspect.signature(cache_class.__init__).parameters


if not _opensci_cache_takes_config(DynamicCache):

    class DynamicCache(DynamicCache):
        """DynamicCache accepting (and ignoring) the config= that 4.56+ code passes (opensci-patch)."""

        def __init__(self, *args, config=None, **kwargs):
            super().__init__(*args, **kwargs)


# --- template: adapter ---
def _opensci_mask_keywords(mask_function):
    """Call `mask_function` with the keywords of the installed release (this code passes 4.54's)."""
    import inspect

    parameters = inspect.signature(mask_function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    renamed = {"input_embeds": "inputs_embeds", "past_key_values": "cache"}  # 5.2, 5.24

    def call(*args, **kwargs):
        for old, new in renamed.items():
            if old in kwargs and new in parameters:  # 5.25 also lists the deprecated `past_key_values`
                kwargs[new] = kwargs.pop(old)
        if not takes_any:
            kwargs = {key: value for key, value in kwargs.items() if key in parameters}
        return mask_function(*args, **kwargs)

    return call
