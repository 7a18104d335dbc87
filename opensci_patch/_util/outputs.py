"""Output paths refused before any work is done: one line, exit 2 (`DestinationError`)."""

from __future__ import annotations

import os
from pathlib import Path

from opensci_patch._util.errors import DestinationError


def check_output_file(path: Path, force: bool) -> None:
    """Refuse an output file we could not write or must not overwrite, before any work is done."""
    if path.is_dir():
        raise DestinationError(f"{path} is a directory; --out takes a file name")
    if path.exists() and not path.is_file():  # a device, a pipe, a socket: never replaced, even with --force
        raise DestinationError(f"{path} exists and is not a regular file; --out takes a file name")
    if path.exists() and not force:
        raise DestinationError(f"{path} exists; pass --force to overwrite it")
    _check_can_create(path.parent, str(path))


def check_output_dir(path: Path, option: str) -> None:
    """A directory we can create or write into, checked before any work is done."""
    if path.exists() and not path.is_dir():
        raise DestinationError(f"{option} {path} is not a directory")
    _check_can_create(path, f"{option} {path}")


def _check_can_create(path: Path, shown: str) -> None:
    """`path`, or the nearest directory above it that exists, must be a directory we can write into."""
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise DestinationError(f"{shown}: cannot write into {path} (not a writable directory)")
