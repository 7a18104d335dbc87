"""A checkpoint whose code (or config) needs a transformers module the installed release lacks, in one line.

`transformers.models.qwen3` first appears in 4.51.0 (measured: absent from the 4.50.3 wheel, present in
4.51.0's). A remote file importing its config from there fails on 4.48-4.50 with `ModuleNotFoundError`,
or, when its config.json says `model_type: qwen3`, earlier, in `AutoConfig`, with "model type `qwen3`
but Transformers does not recognize this architecture". Both become: which module, and from which
release on it exists where `FIRST_RELEASE` knows it.
"""

from __future__ import annotations

import importlib.util
import re

# module -> the first release that has it (each read off the release wheels; docs/upstream.md)
FIRST_RELEASE = {
    "transformers.models.qwen3": "4.51.0",
    "transformers.models.qwen3_moe": "4.51.0",
}
# module -> the first release without it (removed upstream; `hotfix` gives the names 4.4x-era files import from it
# stand-ins: patch moved_helpers)
REMOVED_IN = {
    "transformers.modeling_attn_mask_utils": "5.24.0",
}
MODEL_TYPE = re.compile(r"model type `([A-Za-z0-9_]+)` but Transformers does not recognize")


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package is missing too
        return True


def missing_module(exc: BaseException) -> str | None:
    """The transformers module `exc` says is missing (and is missing here), else None."""
    for e in _chain(exc):
        name = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
        if name and name.startswith("transformers.") and _absent(name):
            parts = name.split(".")  # report the model package, not a file in it
            return ".".join(parts[:3]) if parts[:2] == ["transformers", "models"] and len(parts) > 3 else name
        m = MODEL_TYPE.search(str(e))
        if m and _absent(f"transformers.models.{m[1]}"):
            return f"transformers.models.{m[1]}"
    return None


def explain(module: str, release: str) -> str:
    if removed := REMOVED_IN.get(module):
        why = f"removed in transformers {removed}; `opensci-patch hotfix` the checkpoint"
    elif first := FIRST_RELEASE.get(module):
        why = f"it first appears in transformers {first}"
    else:
        why = "added in a later release, or removed"
    return f"the model needs {module}, which transformers {release} does not have ({why})"
