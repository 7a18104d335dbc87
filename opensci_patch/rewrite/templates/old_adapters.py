"""The keyword adapters earlier versions of moved_helpers wrote (newest first): never inserted, only compared with,
so that a file hotfixed by one of them is recognised and upgraded in place (`patches/stand_ins.py`).

- `adapter_0` renamed only where the helper lacks the old name, so on 5.25 it passed the deprecated `past_key_values`;
- `adapter_1` renamed only `input_embeds`, so on 5.24 the cache never reached the helper (TypeError: missing 'cache').
"""

# each section redefines the same function, as each version wrote it:
# ruff: noqa: F811


# --- template: adapter_0 ---
def _opensci_mask_keywords(mask_function):
    """Call `mask_function` with the keywords of the installed release (this code passes 4.54's)."""
    import inspect

    parameters = inspect.signature(mask_function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    renamed = {"input_embeds": "inputs_embeds", "past_key_values": "cache"}  # 5.2, 5.24

    def call(*args, **kwargs):
        for old, new in renamed.items():
            if old in kwargs and old not in parameters and new in parameters:
                kwargs[new] = kwargs.pop(old)
        if not takes_any:
            kwargs = {key: value for key, value in kwargs.items() if key in parameters}
        return mask_function(*args, **kwargs)

    return call


# --- template: adapter_1 ---
def _opensci_mask_keywords(mask_function):
    """Call `mask_function` with the keywords of the installed release (this code passes 4.54's)."""
    import inspect

    parameters = inspect.signature(mask_function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

    def call(*args, **kwargs):
        if "input_embeds" in kwargs and "input_embeds" not in parameters and "inputs_embeds" in parameters:
            kwargs["inputs_embeds"] = kwargs.pop("input_embeds")
        if not takes_any:
            kwargs = {key: value for key, value in kwargs.items() if key in parameters}
        return mask_function(*args, **kwargs)

    return call
