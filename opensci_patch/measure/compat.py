"""Feature probes of the installed transformers, and the runtime shims for old releases.

Every decision here asks the installed library whether it has a feature; none compares
version strings, so a backport or a yanked release cannot fool it.
"""

from __future__ import annotations

import inspect
from typing import TypedDict


def has_transformers_kwargs() -> bool:
    """`transformers.utils.TransformersKwargs` exists from 4.54 on."""
    import transformers.utils

    return hasattr(transformers.utils, "TransformersKwargs")


def has_loss_kwargs() -> bool:
    """`transformers.utils.LossKwargs` exists up to 4.53."""
    import transformers.utils

    return hasattr(transformers.utils, "LossKwargs")


def has_default_rope_init() -> bool:
    """`ROPE_INIT_FUNCTIONS["default"]` exists up to 4.57."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return "default" in ROPE_INIT_FUNCTIONS


def install_transformers_kwargs_shim() -> bool:
    """Back-fill `transformers.utils.TransformersKwargs` where it is missing (<= 4.53).

    Lets the *original* remote code (which imports it) load on old releases. The hotfixed
    code does not need this: it carries its own fallback import. Returns True when the
    shim was installed, False when the name already existed.
    """
    import transformers.utils

    if has_transformers_kwargs():
        return False

    class TransformersKwargs(TypedDict, total=False):
        """Back-filled by opensci_patch.measure.compat for transformers releases that lack it."""

    transformers.utils.TransformersKwargs = TransformersKwargs
    return True


def dtype_keyword() -> str:
    """The `from_pretrained` keyword for the dtype: "dtype" from 4.56 on, else "torch_dtype".

    Probe: from the release that accepts `dtype`, the config stores `dtype` and keeps
    `torch_dtype` only as a backwards-compatible property.
    """
    from transformers import PretrainedConfig

    return (
        "dtype"
        if isinstance(inspect.getattr_static(PretrainedConfig, "torch_dtype", None), property)
        else "torch_dtype"
    )


def probes() -> dict[str, bool | str]:
    """All probes, for records and bug reports."""
    return {
        "TransformersKwargs": has_transformers_kwargs(),
        "LossKwargs": has_loss_kwargs(),
        "rope_init_default": has_default_rope_init(),
        "dtype_keyword": dtype_keyword(),
    }
