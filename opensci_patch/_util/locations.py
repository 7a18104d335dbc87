"""Where opensci-patch keeps what it builds (per-release envs, torch layers, the hotfix cache) and the offline
wheel directory: one root, `$OPENSCI_PATCH_ENV_ROOT`, else the user cache directory.

Standard library only. `MARKER` is the file written last into every env (its presence means "complete"); it is
here, not in `opensci_patch.matrix`, because capture reads the marker of the env it runs in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from opensci_patch._util.errors import EnvironmentSetupError

WHEELS_VAR = "OPENSCI_PATCH_WHEELS"
ROOT_VAR = "OPENSCI_PATCH_ENV_ROOT"
MARKER = "opensci-patch-env.json"  # written last: its presence means "complete"


def default_root() -> Path:
    """Where environments live: $OPENSCI_PATCH_ENV_ROOT, else the user cache directory."""
    if value := os.environ.get(ROOT_VAR):
        return Path(value).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "opensci-patch" / "envs"


def wheel_dir_args() -> list[str]:
    """``--no-index --find-links DIR`` when $OPENSCI_PATCH_WHEELS names a directory of wheels."""
    value = os.environ.get(WHEELS_VAR)
    if not value:
        return []
    wheels = Path(value).expanduser().absolute()
    if not wheels.is_dir():
        raise EnvironmentSetupError(f"{WHEELS_VAR}={value} is not a directory (it should hold the wheels to install)")
    return ["--no-index", "--find-links", str(wheels)]


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker JSON of the env at `path`, or None (no marker: not complete, or not an env)."""
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
