"""Directories and files opensci-patch owns: claim a new one, write a file atomically, lock, discard.

The one place these are written: envs, torch layers, hotfix outputs and the hotfix cache, fixtures and report
files all go through here. Standard library only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opensci_patch._util.errors import DestinationError


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


def write_atomic(path: Path | str, content: str | bytes | dict | list | Any) -> Path:
    """Write `content` to `path` so a reader sees the old file or the whole new one, never a part.

    A unique temp file in the same directory (concurrent writers never share one), fsync, then
    `os.replace`. Dicts and lists are written as sorted, indented JSON; a record as its `to_json()`.
    An unwritable destination is a `DestinationError` (one line, exit 2).
    """
    path = Path(path)
    if hasattr(content, "to_json"):  # a Record
        content = content.to_json()
    elif isinstance(content, (dict, list)):
        content = json.dumps(content, indent=2, sort_keys=True) + "\n"
    data = content.encode() if isinstance(content, str) else content
    tmp: str | None = None
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory")
        if path.exists() and not path.is_file():  # a device node or a pipe is never replaced by a file
            raise OSError(0, "exists and is not a regular file")
        mode = path.stat().st_mode & 0o777 if path.is_file() else 0o644
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise DestinationError(
            f"{path}: cannot write ({exc.strerror or exc}); choose a writable location that is not a directory"
        ) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path
