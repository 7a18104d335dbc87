"""The low-level pieces `opensci_patch.envs` and `opensci_patch.torch_links` share: where envs live, the
environment of a child process, running an installer, locks, markers, and removing a directory of ours.

Nothing here knows about torch or transformers, so both modules can import it without importing each other.
Tests that stand in for the installer patch `run_installer` / `find_uv` here: every caller looks them up
through this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opensci_patch.errors import EnvironmentSetupError

WHEELS_VAR = "OPENSCI_PATCH_WHEELS"
ROOT_VAR = "OPENSCI_PATCH_ENV_ROOT"

MARKER = "opensci-patch-env.json"  # written last: its presence means "complete"
SENTINEL = ".opensci-patch-env"  # written first: "this directory is ours"
SCHEMA = 1
SRC_PTH = "_opensci_patch_src.pth"
INSTALL_TIMEOUT = 1800.0
TAIL_LINES = 20

SRC_ROOT = Path(__file__).resolve().parents[1]  # the directory holding the opensci_patch package

Log = Callable[[str], None]


def default_root() -> Path:
    """Where environments live: $OPENSCI_PATCH_ENV_ROOT, else the user cache directory."""
    if value := os.environ.get(ROOT_VAR):
        return Path(value).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "opensci-patch" / "envs"


def child_env(extra: dict[str, str] | None = None, *, root: Path | None = None, source: bool = True) -> dict[str, str]:
    """The environment for a child process: os.environ without PYTHONPATH/PYTHONHOME, plus `extra`.

    With `source` (default) PYTHONPATH is exactly the directory holding this process's own
    `opensci_patch` (the checkout, or a one-link directory under `root` for an installed copy), so
    the child runs the caller's code and nothing else of the caller's path leaks in; PYTHONPATH comes
    before the env's site-packages and its `.pth` files, whichever checkout wrote those last. Installers
    get `source=False`.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    if source:
        env["PYTHONPATH"] = str(source_dir((root or default_root()).expanduser().absolute()))
    env.update(extra or {})
    return env


def source_dir(root: Path) -> Path:
    """A directory whose only package is opensci_patch: the checkout, or a one-link dir under `root`.

    A checkout (pyproject.toml next to the package) is used as is. An installed copy lives in some
    site-packages, which must not go on the env's path whole (it would leak every other package).
    """
    if (SRC_ROOT / "pyproject.toml").exists():
        return SRC_ROOT
    link_dir = root / f"_opensci_patch-src-{hashlib.sha256(str(SRC_ROOT).encode()).hexdigest()[:10]}"
    if not (link_dir / "opensci_patch").exists():
        link_dir.mkdir(parents=True, exist_ok=True)
        tmp = link_dir / f".opensci_patch-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.symlink_to(SRC_ROOT / "opensci_patch")
        os.replace(tmp, link_dir / "opensci_patch")  # atomic: concurrent callers never see it missing
    return link_dir


def find_uv() -> str | None:
    if found := shutil.which("uv"):
        return found
    try:
        from uv import find_uv_bin
    except ImportError:
        return None
    try:
        return find_uv_bin()
    except FileNotFoundError:
        return None


def run_installer(cmd: list[str], cwd: Path, name: str) -> None:
    env = child_env({"UV_PYTHON_DOWNLOADS": "never"}, source=False)
    env.pop("VIRTUAL_ENV", None)
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=INSTALL_TIMEOUT,
            preexec_fn=death_signal_setter(),
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else (exc.output or "")
        raise EnvironmentSetupError(
            f"env {name}: `{shlex.join(cmd)}` took over {INSTALL_TIMEOUT:.0f} s; check the network or index."
            f"\n{tail(out, TAIL_LINES, '    ')}"
        ) from None
    except OSError as exc:
        raise EnvironmentSetupError(f"env {name}: cannot run `{shlex.join(cmd)}`: {exc}") from None
    if proc.returncode != 0:
        raise EnvironmentSetupError(
            f"env {name}: `{shlex.join(cmd)}` failed (exit {proc.returncode}); check that the release exists "
            f"and the index is reachable. Last output:\n{tail(proc.stdout, TAIL_LINES, '    ')}"
        )


def claim_dir(path: Path, mark: str | None = None, text: str = "") -> Path:
    """Create the directory `path`, which must not exist yet (FileExistsError: never someone else's), with the
    file `mark` written in it first, so that from then on a kill at any point leaves it recognisably ours.
    The one way opensci-patch makes a directory it will later replace or delete (envs, torch layers, hotfix
    outputs); a failure writing the mark removes the directory again."""
    path.mkdir()
    if mark is not None:
        try:
            (path / mark).write_text(text)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
    return path


def claim_new_dir(path: Path, root: Path) -> None:
    """Create `path` marked as ours (`claim_dir` with the sentinel), after sweeping the trash of earlier removals."""
    sweep_trash(root)
    claim_dir(path, SENTINEL, f"created by opensci_patch.envs (pid {os.getpid()}); safe to delete\n")


def new_venv(path: Path, root: Path, uv: str | None, log: Log) -> list[str]:
    """Make a venv at `path` on this interpreter (uv when given, else venv + pip); its install command prefix,
    with the offline wheel directory (`wheel_dir_args`) when one is set. One recipe for envs and torch layers."""
    if uv:
        run_installer([uv, "venv", "--allow-existing", "--no-project", "--python", sys.executable, str(path)], root,
                      path.name)  # fmt: skip
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
        run_installer([sys.executable, "-m", "venv", str(path)], root, path.name)
    except EnvironmentSetupError as exc:
        if "ensurepip" not in str(exc):
            raise
        log(f"env {path.name}: this Python has no ensurepip; making the env without pip and using {sys.executable}'s")
        run_installer([sys.executable, "-m", "venv", "--without-pip", str(path)], root, path.name)
        return [sys.executable, "-m", "pip", "--python", str(python), "install", "--disable-pip-version-check",
                "--no-input"]  # fmt: skip
    return [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]


def wheel_dir_args() -> list[str]:
    """``--no-index --find-links DIR`` when $OPENSCI_PATCH_WHEELS names a directory of wheels."""
    value = os.environ.get(WHEELS_VAR)
    if not value:
        return []
    wheels = Path(value).expanduser().absolute()
    if not wheels.is_dir():
        raise EnvironmentSetupError(f"{WHEELS_VAR}={value} is not a directory (it should hold the wheels to install)")
    return ["--no-index", "--find-links", str(wheels)]


def venv_python(path: Path) -> Path:
    return path / "Scripts" / "python.exe" if os.name == "nt" else path / "bin" / "python"


def site_packages(path: Path) -> Path:
    if os.name == "nt":
        return path / "Lib" / "site-packages"
    return path / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


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


def discard(path: Path, root: Path) -> None:
    """Remove a directory of ours: rename it aside first (atomic), then delete it, ignoring errors.

    An installer that outlived a killed driver may still write into it, so `rmtree` can fail with
    "Directory not empty"; renamed aside, that failure no longer matters (a later build sweeps the
    rest) and the env path is free at once.
    """
    trash = root / f".trash-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        path.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def sweep_trash(root: Path) -> None:
    for trash in root.glob(".trash-*"):
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def death_signal_setter() -> Callable[[], None] | None:
    """Linux: a `preexec_fn` that makes the installer get SIGKILL when the driver dies.

    Without it, an installer outlives a killed driver and writes on into the env alone. The libc
    function is looked up here, in the parent: the forked child only calls it (no imports, no loading).
    """
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no cross-process lock; creation is still marker-guarded
        yield
        return
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def tail(text: str, n: int = 40, indent: str = "") -> str:
    """The last `n` lines of a log, each after `indent`: evidence in records (`records.tail`), context under
    an error message (indented)."""
    return "\n".join(indent + line for line in text.splitlines()[-n:])
