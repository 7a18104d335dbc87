"""Whether the installed transformers supports the installed torch: the (transformers, torch) pair.

Each transformers release declares the torch it needs in its own metadata (`Requires-Dist: torch>=2.6;
extra == "torch"` on 5.x, `torch>=2.2` on 4.57, `torch >=2.0` on 4.48). Outside it transformers disables
torch at import ("Disabling PyTorch because PyTorch >= 2.6 is required") and every model class raises
ImportError. Such a pair is not a result about the model: a capture records it as `unsupported-pair`,
with the requirement, before anything else imports from transformers.
"""

from __future__ import annotations

from importlib import metadata


def torch_requirement(requires: list[str] | None = None) -> str | None:
    """transformers' requirement on torch as its installed metadata states it (e.g. 'torch>=2.6'), or None.
    `requires`: the Requires-Dist lines of another transformers (`matrix.torch_sweep` reads a release's wheel)."""
    from packaging.requirements import InvalidRequirement, Requirement

    for line in (metadata.requires("transformers") if requires is None else requires) or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.name.lower() == "torch" and req.marker is not None and req.marker.evaluate({"extra": "torch"}):
            return f"torch{req.specifier}"
    return None


def unsupported_pair(torch_version: str | None = None) -> str | None:
    """One line saying why the installed transformers does not support this torch, or None when it does.

    Unsupported: the torch version is outside transformers' own requirement (`torch_requirement`), or
    transformers itself disables torch (`is_torch_available()` is False although torch imports).
    """
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    if torch_version is None:
        import torch

        torch_version = torch.__version__
    tf_version = metadata.version("transformers")
    wanted = torch_requirement()
    try:
        public = Version(str(torch_version)).public
    except InvalidVersion:
        return None
    if wanted and not Requirement(wanted).specifier.contains(public, prereleases=True):
        return f"transformers {tf_version} requires {wanted} (its metadata); this torch is {torch_version}"
    from transformers.utils import import_utils

    if not import_utils.is_torch_available():
        need = f" (it requires {wanted})" if wanted else ""
        return f"transformers {tf_version} disables torch {torch_version}{need}"
    return None


def unsupported_attention(attn: str) -> str | None:
    """Why the installed transformers refuses `attn` on this torch, or None: transformers < 5 checks
    `is_torch_sdpa_available()` (torch >= 2.1.1 on CPU/CUDA) and raises ImportError at load (measured: 4.48.0 on torch
    2.0.0). A fact about the (transformers, torch) pair, not about the model; 5.x has no such check (torch >= 2.6)."""
    from transformers.utils import import_utils

    check = getattr(import_utils, "is_torch_sdpa_available", None)
    if attn != "sdpa" or check is None or check():
        return None
    import torch

    tf_version = metadata.version("transformers")
    return f"transformers {tf_version} does not run sdpa on torch {torch.__version__} (its is_torch_sdpa_available())"
