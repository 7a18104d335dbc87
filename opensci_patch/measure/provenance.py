"""Where a record came from: the environment a capture ran in and the model files it ran.

Both go into the record as they are, so a cell's result can be traced to its torch/transformers, its
machine and the exact modeling files (a hotfixed copy names its patches).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

from opensci_patch._util.defaults import MANIFEST


def model_info(model: Path) -> dict:
    """The record's `model`: its path, whether `hotfix` patched it (and with what, and what it refused), a sha256
    of each .py file."""
    manifest = model / MANIFEST
    info: dict = {"path": str(model), "name": model.name, "patched": manifest.is_file()}
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        info["patches"] = data.get("patches")
        files = data.get("files") or {}
        refused = {f: e["refused"] for f, e in files.items() if isinstance(e, dict) and e.get("refused")}
        if refused:  # what the hotfix left as it was (file -> patch -> why): a cell's record says so too
            info["refused"] = refused
    info["modeling_sha256"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model.glob("*.py"))}
    return info


def environment(device: str) -> dict:
    """The record's `environment`: the versions, machine, feature probes and overrides this capture ran with."""
    import torch
    import transformers

    from opensci_patch.measure import compat

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "probes": compat.probes(),
        # the `kernels` package (transformers 5.25 turns hub kernels on by default); "used" is filled after loading
        "kernels": {"installed": _distribution_version("kernels"), "used": None},
        # dependency overrides the per-release env was built with (opensci_patch.matrix.overrides); [] outside one
        "overrides": _env_overrides(),
        # packages the env added to transformers' own (`cell --require`); [] outside one or when none
        "extra_requirements": _env_overrides("extra_requirements"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def _distribution_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _env_overrides(key: str = "overrides") -> list[str]:
    """The overrides (or another list: `key`) in the marker of the per-release env this interpreter runs in
    (`envs`); [] elsewhere."""
    from opensci_patch._util.locations import MARKER

    try:
        marker = json.loads((Path(sys.prefix) / MARKER).read_text())
    except (OSError, ValueError):
        return []
    found = marker.get(key, []) if isinstance(marker, dict) else []
    return [str(r) for r in found] if isinstance(found, list) else []
