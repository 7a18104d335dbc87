"""The code moved_helpers inserts into a model file: stand-ins for library helpers a release lacks.

Data, not logic: each template is plain Python that becomes part of the user's file, so each must
work on its own, whichever helpers the installed release lacks. `moved_helpers` decides where they
go; the stand-ins for `transformers.modeling_attn_mask_utils` (in `attn_mask_stand_ins`) are transformers
5.23.0's own code (the module 5.24 removed), the mask stand-ins build the masks 4.54 builds.
"""

from __future__ import annotations

from opensci_patch.rewrite.patches.attn_mask_stand_ins import ATTN_MASK_NAMES, attn_mask_stand_in

ADAPTER = "_opensci_mask_keywords"
MASKS = ("create_causal_mask", "create_sliding_window_causal_mask")

_IDENTITY_DECORATOR = '''
def {name}(obj=None, **kwargs):
    """Stand-in (opensci-patch): documentation only; returns what it decorates."""
    return obj if obj is not None else (lambda inner: inner)
'''

_MASK = '''
def {name}(config, input_embeds, attention_mask, cache_position, past_key_values, position_ids=None, **kwargs):
    """Stand-in (opensci-patch) for transformers < 4.53: the mask 4.54 builds for eager and SDPA attention."""
    sliding_window = {window}
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
'''

_RETURN_TUPLE = '''
def {name}(func):
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
'''

_CHECK_INPUTS = '''
try:
    from transformers.utils.generic import merge_with_config_defaults
    from transformers.utils.output_capturing import capture_outputs

    def {name}(func=None, *, tie_last_hidden_states=True):
        """Stand-in (opensci-patch) for 5.2-5.22: config defaults merged around output capturing, as 5.2 does."""

        def wrap(function):
            return merge_with_config_defaults(capture_outputs(function, tie_last_hidden_states=tie_last_hidden_states))

        return wrap if func is None else wrap(func)

except ImportError:  # before 4.54

    def {name}(func=None, **options):
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
                        raise NotImplementedError(f"{{flag}} needs transformers >= 4.54 with this model file")
                return_dict = kwargs.pop("return_dict", None)
                if return_dict is None:
                    return_dict = getattr(self.config, "return_dict", True)
                output = function(self, *args, **kwargs)
                return output if return_dict or isinstance(output, tuple) else output.to_tuple()

            return wrapper

        return wrap if func is None else wrap(func)
'''

_ROPE_UPDATE = '''
def {name}(rope_forward):
    """Stand-in (opensci-patch) for < 4.50: exact for rope types that never change inv_freq at run time."""
    import functools

    @functools.wraps(rope_forward)
    def wrapper(self, x, position_ids):
        if "dynamic" in self.rope_type or self.rope_type == "longrope":
            raise NotImplementedError(f"rope type {{self.rope_type!r}} needs transformers >= 4.50 with this model file")
        return rope_forward(self, x, position_ids)

    return wrapper
'''

_GENERIC_HEAD = '''
class {name}:
    """Stand-in (opensci-patch) for < 4.54: this task head needs a newer transformers."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("{name} needs transformers >= 4.54 with this model file")
'''

# name -> stand-in source (defines `name`), used when importing it raises ImportError
STAND_INS: dict[str, str] = {
    "auto_docstring": _IDENTITY_DECORATOR,
    "use_kernel_forward_from_hub": '''
def {name}(layer_name):
    """Stand-in (opensci-patch): kernels from the hub are opt-in; keep the module's own forward."""
    return lambda cls: cls
''',
    "can_return_tuple": _RETURN_TUPLE,
    "check_model_inputs": _CHECK_INPUTS,
    "dynamic_rope_update": _ROPE_UPDATE,
    "GradientCheckpointingLayer": '''
class {name}(torch.nn.Module):
    """Stand-in (opensci-patch) for < 4.52: a plain module (no gradient checkpointing)."""
''',
    "GenericForQuestionAnswering": _GENERIC_HEAD,
    "GenericForSequenceClassification": _GENERIC_HEAD,
    "GenericForTokenClassification": _GENERIC_HEAD,
    "create_causal_mask": _MASK.replace("{window}", "None"),
    "create_sliding_window_causal_mask": _MASK.replace("{window}", "getattr(config, 'sliding_window', None)"),
    "layer_type_validation": '''
def {name}(*args, **kwargs):
    """Stand-in (opensci-patch) for < 4.53: validation only."""
    return None
''',
    **{name: attn_mask_stand_in(name) for name in ATTN_MASK_NAMES},
    # 4.3x-era helpers: absent from transformers.pytorch_utils on 4.48 (back on 4.57), removed from
    # transformers.utils in 5.0; both answer what the installed torch does.
    "is_torch_greater_or_equal_than_1_13": """
{name} = tuple(map(int, torch.__version__.split(".")[:2])) >= (1, 13)
""",
    "is_torch_fx_available": '''
def {name}():
    """Stand-in (opensci-patch) for >= 5.0: whether torch.fx imports, as 4.x answers it."""
    import importlib.util

    return importlib.util.find_spec("torch.fx") is not None
''',
}
NEEDS_TORCH = {"GradientCheckpointingLayer", "is_torch_greater_or_equal_than_1_13", *MASKS, *ATTN_MASK_NAMES}

CACHE = "DynamicCache"
CACHE_CHECK = "_opensci_cache_takes_config"
CACHE_DEF = f'''
def {CACHE_CHECK}(cache_class):
    import inspect

    return "config" in inspect.signature(cache_class.__init__).parameters


if not {CACHE_CHECK}({CACHE}):

    class {CACHE}({CACHE}):
        """{CACHE} accepting (and ignoring) the config= that 4.56+ code passes (opensci-patch)."""

        def __init__(self, *args, config=None, **kwargs):
            super().__init__(*args, **kwargs)
'''


def _adapter(renaming: str) -> str:
    """The keyword adapter with `renaming` (its lines from after `takes_any` to the `call` filtering the keywords)."""
    return f'''
def {ADAPTER}(mask_function):
    """Call `mask_function` with the keywords of the installed release (this code passes 4.54's)."""
    import inspect

    parameters = inspect.signature(mask_function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
{renaming}
        if not takes_any:
            kwargs = {{key: value for key, value in kwargs.items() if key in parameters}}
        return mask_function(*args, **kwargs)

    return call
'''


_RENAMING = """    renamed = {{"input_embeds": "inputs_embeds", "past_key_values": "cache"}}  # 5.2, 5.24

    def call(*args, **kwargs):
        for old, new in renamed.items():
            if old in kwargs and {test}
                kwargs[new] = kwargs.pop(old)"""

# The adapter as this patch writes it. Keywords 4.54 code passes -> what later releases call them:
# `input_embeds` -> `inputs_embeds` (5.2), `past_key_values` -> `cache` (5.24, positional, no **kwargs); the new
# name wins wherever the helper takes it (5.25 lists the deprecated `past_key_values` too and warns when it is used).
ADAPTER_DEF = _adapter(_RENAMING.format(test="new in parameters:  # 5.25 also lists the deprecated `past_key_values`"))

# Adapters earlier versions of this patch wrote (newest first): a file hotfixed with one of them is upgraded in place.
# - renamed only where the helper lacks the old name, so on 5.25 it passed the deprecated `past_key_values`;
# - renamed only `input_embeds`, so on 5.24 the cache never reached the helper (TypeError: missing 'cache').
OLD_ADAPTER_DEFS = (
    _adapter(_RENAMING.format(test="old not in parameters and new in parameters:")),
    _adapter("""
    def call(*args, **kwargs):
        if "input_embeds" in kwargs and "input_embeds" not in parameters and "inputs_embeds" in parameters:
            kwargs["inputs_embeds"] = kwargs.pop("input_embeds")"""),
)
