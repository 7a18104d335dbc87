"""Where a hotfix output goes, safely (the rules are in `opensci_patch.rewrite.hotfix`'s docstring): the checks
of DST, the per-DST lock, the leftovers of killed runs, and the hidden partial directory swapped into place.

The renames themselves are `opensci_patch._util.fs`'s (`sibling`, `publish_dir`, `swap_dir`, `restore_aside`);
what is hotfix's own here is what says "ours": the marker in a partial dir and the manifest in an output.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from opensci_patch._util import fs
from opensci_patch._util.defaults import MANIFEST
from opensci_patch._util.errors import DestinationError
from opensci_patch.rewrite.hashed_copy import made_by_us

PARTIAL_MARK = ".opensci-patch-partial"  # inside a partial dir until the swap: "ours, being written by pid N"
MARKS = (MANIFEST, PARTIAL_MARK)  # removed last, so that a half-removed dir of ours is still recognised as ours
LOCK_TEXT = "opensci-patch hotfix lock\n"


def prepare_destination(src: Path, dst: Path, force: bool) -> Path:
    """DST resolved, checked (`check_existing`, no overlap with SRC, not a link) and its parent made: fail fast."""
    if dst.is_symlink():
        raise DestinationError(f"{dst} is a symbolic link; give the real output path")
    resolved = check_overlap(src, dst)
    check_existing(resolved, force)
    try:
        resolved.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DestinationError(f"cannot create {resolved.parent}: {exc.strerror}") from None
    return resolved


def check_overlap(src: Path, dst: Path) -> Path:
    """DST resolved, refused when it is SRC, inside it or contains it (`hotfix --check` checks this too)."""
    resolved = dst.resolve()
    if resolved == src or resolved.is_relative_to(src):
        raise DestinationError(f"{dst} is the source directory or inside it; choose an output outside {src}")
    if src.is_relative_to(resolved):
        raise DestinationError(f"{dst} contains the source directory {src}; choose another output")
    return resolved


def check_existing(dst: Path, force: bool) -> None:
    """Refuse an existing DST unless an earlier hotfix made it and `force` is given (also at the swap)."""
    if dst.is_symlink():
        raise DestinationError(f"{dst} is a symbolic link; give the real output path")
    if not dst.exists():
        return
    if not dst.is_dir():
        raise DestinationError(f"{dst} exists and is not a directory; choose another output")
    if not made_by_us(dst):
        raise DestinationError(
            f"{dst} exists and was not created by opensci-patch (no {MANIFEST}); it is never replaced, "
            "even with --force: choose another output"
        )
    if not force:
        raise DestinationError(f"{dst} exists (an earlier hotfix output); pass --force to replace it")


@contextmanager
def exclusive(dst: Path) -> Iterator[None]:
    """Hold an exclusive lock for DST for the whole run; fail at once when another run holds it.

    The lock is `flock` on `.<DST>.lock` in DST's parent. It is released by the kernel when the
    process dies, however it dies. A finishing run removes the file while still holding it; a run
    that locked a file that is no longer at that path (removed meanwhile) locks the new one.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the checks at the swap still refuse to replace what is not ours
        yield
        return
    lock = dst.parent / f".{dst.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise DestinationError(
                f"cannot write in {dst.parent} ({exc.strerror}); choose an output in a writable directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DestinationError(
                f"another hotfix is writing {dst} right now (it holds {lock}); wait for it to finish, "
                "or choose another output"
            ) from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        if os.fstat(fd).st_size == 0:
            os.write(fd, LOCK_TEXT.encode())
        yield
    finally:
        try:
            with open(lock, encoding="utf-8") as fh:
                ours = fh.read(len(LOCK_TEXT) + 1) == LOCK_TEXT
            if ours:  # never a file of the same name that we did not write
                os.unlink(lock)
        except OSError:
            pass
        os.close(fd)


def _partial_is_ours(path: Path) -> bool:
    """A partial dir we made: its marker, our manifest (written just before the swap), or nothing at all."""
    try:
        return (path / PARTIAL_MARK).is_file() or made_by_us(path) or not any(path.iterdir())
    except OSError:
        return False


def remove_stale(dst: Path, log: Callable[[str], object]) -> None:
    """Remove what killed runs to DST left behind; put back an output a killed swap had moved aside.

    Runs under DST's lock, so no live hotfix (of this version) writes to DST. Still only siblings named
    `.<DST>.partial-<pid>-<hex>` / `.<DST>.old-<pid>-<hex>` whose pid is gone on this host, and that hold
    our marker or manifest, are touched: never a directory we did not create.
    """
    dead = fs.dead_siblings(dst, ("partial", fs.ASIDE))
    partials = [path for path in dead["partial"] if _partial_is_ours(path)]
    restored, olds = fs.restore_aside(dst, [path for path in dead[fs.ASIDE] if made_by_us(path)])
    if restored:  # killed between the two renames of a swap: the previous output
        log(f"restored {dst}, the previous output that an interrupted hotfix had moved aside")
    for path in partials + olds:
        log(f"removing {path.name}, left by an interrupted hotfix (pid gone)")
        fs.remove_tree(path, MARKS)


@contextmanager
def partial_dir(dst: Path) -> Iterator[Path]:
    """A new hidden sibling of DST, marked ours, to build the output in; removed on any exception (OSError, e.g.
    a full disk, becomes one DestinationError). The body ends with `swap_in`, which moves it into place."""
    partial = fs.sibling(dst, "partial")
    try:
        fs.claim_dir(partial, PARTIAL_MARK, f"pid {os.getpid()} on {socket.gethostname()}: hotfix -> {dst}\n")
    except OSError as exc:
        raise DestinationError(f"cannot write in {dst.parent}: {exc.strerror}") from None
    try:
        yield partial
    except BaseException as exc:
        fs.remove_tree(partial, MARKS)
        if isinstance(exc, OSError):  # disk full, permissions...
            raise DestinationError(f"hotfix stopped, nothing written: {exc}") from exc
        raise


def swap_in(partial: Path, dst: Path, force: bool) -> None:
    """Rename `partial` to DST; what is at DST now is checked again (it may have appeared during the run)."""
    if not os.path.lexists(dst):
        if not fs.publish_dir(partial, dst, MARKS):  # a non-empty directory or a file appeared meanwhile
            raise DestinationError(
                f"{dst} appeared while the output was being written; it was left as it is and "
                "nothing was written: remove it or choose another output, then run again"
            )
        return
    try:
        check_existing(dst, force)
    except DestinationError as exc:
        raise DestinationError(f"{exc} (it appeared while the output was being written; nothing written)") from None
    fs.swap_dir(partial, dst, made_by_us, MARKS, fault="hotfix.swap")
