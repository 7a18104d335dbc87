"""Child processes: the environment a child gets, running an installer, pid checks, log tails.

Nothing here knows about torch or transformers. Tests that stand in for the installer patch `run_installer` /
`find_uv` here: every caller looks them up through this module (``procs.run_installer(...)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from opensci_patch._util.errors import EnvironmentSetupError, Terminated
from opensci_patch._util.locations import default_root

INSTALL_TIMEOUT = 1800.0
TAIL_LINES = 20

SRC_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the opensci_patch package


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
    """Run an installer (uv, pip) for env `name`; EnvironmentSetupError with its output's tail if it fails. A
    terminated driver (`terminate_children`) stops it too, and starts none: Terminated."""
    env = child_env({"UV_PYTHON_DOWNLOADS": "never"}, source=False)
    env.pop("VIRTUAL_ENV", None)
    if STOPPING.is_set():
        raise Terminated()
    try:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=death_signal_setter(),
        )  # fmt: skip
    except OSError as exc:
        raise EnvironmentSetupError(f"env {name}: cannot run `{shlex.join(cmd)}`: {exc}") from None
    LIVE.add(proc)
    try:
        out, _ = proc.communicate(timeout=INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise EnvironmentSetupError(
            f"env {name}: `{shlex.join(cmd)}` took over {INSTALL_TIMEOUT:.0f} s; check the network or index."
            f"\n{tail(out or '', TAIL_LINES, '    ')}"
        ) from None
    finally:
        LIVE.discard(proc)
    if STOPPING.is_set():
        raise Terminated()
    if proc.returncode != 0:
        raise EnvironmentSetupError(
            f"env {name}: `{shlex.join(cmd)}` failed (exit {proc.returncode}); check that the release exists "
            f"and the index is reachable. Last output:\n{tail(out, TAIL_LINES, '    ')}"
        )


# Child processes now running (capture and diagnose workers, installers): a terminated driver terminates them.
LIVE: set[subprocess.Popen] = set()
STOPPING = threading.Event()  # set by terminate_children: no new child starts


def terminate_children() -> None:
    """SIGTERM every child (they clean up as after Ctrl-C); called by the CLI's SIGTERM handler."""
    STOPPING.set()
    for proc in list(LIVE):
        with contextlib.suppress(OSError):
            proc.terminate()


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


def tail(text: str, n: int = 40, indent: str = "") -> str:
    """The last `n` lines of a log, each after `indent`: evidence in records (`records.error_record`), context under
    an error message (indented)."""
    return "\n".join(indent + line for line in text.splitlines()[-n:])
