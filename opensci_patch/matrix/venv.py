"""Making a per-release venv, and removing a directory of ours: what `envs` and `torch_links` share.

Nothing here knows about torch or transformers, so both modules can import it without importing each other.
The installer itself is `opensci_patch._util.procs.run_installer`, looked up through that module so tests can
stand in for it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from opensci_patch._util import defaults, locations, procs
from opensci_patch._util.errors import EnvironmentSetupError
from opensci_patch._util.fs import claim_dir, discard, sweep_trash
from opensci_patch._util.locations import MARKER, ROOT_VAR, wheel_dir_args  # noqa: F401 (MARKER: the env's marker)

SENTINEL = ".opensci-patch-env"  # written first: "this directory is ours"
SCHEMA = 1
SRC_PTH = "_opensci_patch_src.pth"

Log = Callable[[str], None]
PIN_VAR = "OPENSCI_PATCH_TORCH_PIN"  # read once, into `defaults.TORCH_PIN`
TORCH_INDEX_VAR = "OPENSCI_PATCH_TORCH_INDEX_URL"
# a release (a local label for a CUDA build): nothing that is a path, a marker or an installer option
_PIN = re.compile(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[a-z0-9]+(\.[a-z0-9]+)*)?")


def check_settings(root: Path | None = None) -> Path:
    """The env root (`root`, else `locations.default_root()`), absolute, created and writable; and every environment
    variable that becomes a path or a requirement, checked: a bad one is one line (EnvironmentSetupError), before any
    work, never a path outside the env root or a requirement with more in it than a version."""
    if not _PIN.fullmatch(defaults.TORCH_PIN):
        raise EnvironmentSetupError(f"{PIN_VAR}={defaults.TORCH_PIN!r} is not a torch release such as 2.13.0")
    index = os.environ.get(TORCH_INDEX_VAR)
    if index and not re.fullmatch(r"(https?|file)://[^\s]+", index):
        raise EnvironmentSetupError(f"{TORCH_INDEX_VAR}={index!r} is not an http(s):// or file:// URL")
    wheel_dir_args()  # OPENSCI_PATCH_WHEELS names a directory
    root = (root or locations.default_root()).expanduser().absolute()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as exc:
        raise EnvironmentSetupError(
            f"the env root {root} cannot be created or written ({exc.strerror or exc}); set {ROOT_VAR} to a "
            f"writable directory"
        ) from None
    return root


def claim_new_dir(path: Path, root: Path) -> None:
    """Create `path` marked as ours (`claim_dir` with the sentinel), after sweeping the trash of earlier removals."""
    sweep_trash(root)
    claim_dir(path, SENTINEL, f"created by opensci_patch.matrix.envs (pid {os.getpid()}); safe to delete\n")


def new_venv(path: Path, root: Path, uv: str | None, log: Log) -> list[str]:
    """Make a venv at `path` on this interpreter (uv when given, else venv + pip); its install command prefix,
    with the offline wheel directory (`wheel_dir_args`) when one is set. One recipe for envs and torch layers."""
    if uv:
        cmd = [uv, "venv", "--allow-existing", "--no-project", "--python", sys.executable, str(path)]
        procs.run_installer(cmd, root, path.name)
        install = [uv, "pip", "install", "--python", str(venv_python(path)), "--compile-bytecode"]
    else:
        install = make_venv(path, root, log)
    return [*install, *wheel_dir_args()]


def make_venv(path: Path, root: Path, log: Log) -> list[str]:
    """`python -m venv` (no uv here); returns the install command prefix for the new env.

    A base Python without ensurepip (Debian/Ubuntu without python3-venv, some GPU images) cannot
    seed pip: then the env is made `--without-pip` and this interpreter's pip installs into it
    (`pip --python`, pip >= 22.3).
    """
    python = venv_python(path)
    try:
        procs.run_installer([sys.executable, "-m", "venv", str(path)], root, path.name)
    except EnvironmentSetupError as exc:
        if "ensurepip" not in str(exc):
            raise
        log(f"env {path.name}: this Python has no ensurepip; making the env without pip and using {sys.executable}'s")
        procs.run_installer([sys.executable, "-m", "venv", "--without-pip", str(path)], root, path.name)
        return [sys.executable, "-m", "pip", "--python", str(python), "install", "--disable-pip-version-check",
                "--no-input"]  # fmt: skip
    return [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]


def venv_python(path: Path) -> Path:
    return path / "Scripts" / "python.exe" if os.name == "nt" else path / "bin" / "python"


def site_packages(path: Path) -> Path:
    if os.name == "nt":
        return path / "Lib" / "site-packages"
    return path / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def remove_ours(path: Path, root: Path, why: str, log: Log, *, sentinel: str = SENTINEL) -> None:
    """Remove a directory we made; refuse anything that is not plainly ours."""
    inside = path.parent.resolve() == root.resolve() and not path.is_symlink()
    ours = inside and path.is_dir() and (_looks_ours(path, sentinel) or not any(path.iterdir()))
    if not ours:
        raise EnvironmentSetupError(
            f"{path} exists but was not created by opensci-patch; move it away or choose another env root (${ROOT_VAR})"
        )
    log(f"removing {why} env dir {path}")
    discard(path, root)


def _looks_ours(path: Path, sentinel: str) -> bool:
    """Our sentinel, or (an env whose removal an older version left half-done) our source `.pth` in it."""
    if (path / sentinel).exists():
        return True
    return sentinel == SENTINEL and (site_packages(path) / SRC_PTH).is_file()
