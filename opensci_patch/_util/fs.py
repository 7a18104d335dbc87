"""Directories and files opensci-patch owns: claim a new one, write a file atomically, lock, discard, and put a
finished directory in place (`publish_dir`, `swap_dir`).

The one place these are written: envs, torch layers, hotfix outputs and the hotfix cache, fixtures and report
files all go through here. Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opensci_patch._util.errors import DestinationError
from opensci_patch._util.faults import fault_point
from opensci_patch._util.procs import pid_alive

ASIDE = "old"  # the tag of `sibling(dst, ASIDE)`, where `swap_dir` moves the previous dst during a swap


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


TRASH_MARK = ".opensci-patch-trash"  # written into a directory of ours before `discard` renames it to the trash


def discard(path: Path, root: Path) -> None:
    """Remove a directory of ours: mark it as trash, rename it aside (atomic), then delete it, ignoring errors.

    An installer that outlived a killed driver may still write into it, so the removal can fail with
    "Directory not empty"; renamed aside, that failure no longer matters (the env path is free at once) and
    what is left keeps its mark and its name `.trash-<name>-<pid>-<hex>` (`stamped`), by which a later
    `sweep_trash` recognises it as ours.
    """
    trash = stamped(root, f".trash-{path.name}")
    try:
        (path / TRASH_MARK).write_text(f"removed by opensci-patch (pid {os.getpid()}); safe to delete\n")
    except FileNotFoundError:
        return
    except OSError:
        pass  # e.g. full disk: unmarked, a leftover is never swept, but the removal goes on
    try:
        path.rename(trash)
    except FileNotFoundError:
        return
    _remove_trash(trash)


def _remove_trash(trash: Path) -> None:
    """Delete `trash`; its mark goes only with the last of the rest, so what cannot be removed stays ours."""
    try:
        for child in trash.iterdir():
            if child.name == TRASH_MARK:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        if [child.name for child in trash.iterdir()] in ([], [TRASH_MARK]):
            (trash / TRASH_MARK).unlink(missing_ok=True)
            trash.rmdir()
    except OSError:
        pass


def sweep_trash(root: Path) -> None:
    """Delete what earlier `discard`s could not: only directories named `.trash-<name>-<pid>-<hex>` that hold
    `TRASH_MARK` and whose pid is gone. Anything else (a user's `.trash-notes/`) is never touched."""
    for trash in dead_stamped(root, r"\.trash-.+"):
        if (trash / TRASH_MARK).is_file():
            _remove_trash(trash)


TEMP_MARK = ".opensci-patch-temp"  # in each `temp_dir`: ours, so that a later run may sweep it once its pid is gone


@contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    """A private temp dir `$TMPDIR/<prefix>-<pid>-<hex>` (`stamped`), marked as ours and removed at the end.

    A SIGKILL leaves it behind, so first the ones of dead runs with this prefix are removed: only those that hold
    `TEMP_MARK`, belong to this user and whose pid is gone, never anything else in the temp directory."""
    parent, uid = Path(tempfile.gettempdir()), os.getuid() if hasattr(os, "getuid") else None
    for old in dead_stamped(parent, re.escape(prefix)):
        if (old / TEMP_MARK).is_file() and uid in (None, old.stat().st_uid):
            remove_tree(old, [TEMP_MARK])
    path = stamped(parent, prefix)
    path.mkdir(mode=0o700)
    try:
        (path / TEMP_MARK).write_text(f"made by opensci-patch (pid {os.getpid()}); safe to delete once it is gone\n")
        yield path
    finally:
        remove_tree(path, [TEMP_MARK])


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


# --- a finished directory into place: build in a hidden sibling, then rename -------------------------------------


def stamped(parent: Path, prefix: str) -> Path:
    """A fresh name in `parent`, `<prefix>-<pid>-<hex>`: with our pid, so that a later run can tell the leftovers of
    a killed run (`dead_stamped`) from those of a live one, and a random part, so that no two names clash."""
    return parent / f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"


def dead_stamped(parent: Path, prefix: str) -> list[Path]:
    """The `stamped(parent, ...)` directories (not links) whose prefix matches the regex `prefix` and whose pid is
    gone on this host: what killed runs left. Whether one is really ours is for the caller to check (a marker, a
    manifest) before touching it."""
    pattern = re.compile(rf"(?:{prefix})-(?P<pid>\d+)-[0-9a-f]{{8}}")
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    return [
        path
        for path in entries
        if (match := pattern.fullmatch(path.name))
        and not path.is_symlink()
        and path.is_dir()
        and not pid_alive(int(match["pid"]))
    ]


def sibling(dst: Path, tag: str) -> Path:
    """A fresh hidden name next to `dst`, `.<dst>.<tag>-<pid>-<hex>` (`stamped`): hidden so nobody takes it for
    `dst`, in `dst`'s directory so the final rename stays on one file system (atomic)."""
    return stamped(dst.parent, f".{dst.name}.{tag}")


def dead_siblings(dst: Path, tags: Iterable[str]) -> dict[str, list[Path]]:
    """Per tag, the `sibling(dst, tag)` directories (not links) whose pid is gone on this host (`dead_stamped`)."""
    found: dict[str, list[Path]] = {tag: [] for tag in tags}
    prefix = re.compile(rf"\.{re.escape(dst.name)}\.(.*)")
    for path in dead_stamped(dst.parent, rf"\.{re.escape(dst.name)}\.(?:{'|'.join(map(re.escape, tags))})"):
        found[prefix.fullmatch(path.name.rsplit("-", 2)[0])[1]].append(path)
    return found


def remove_tree(path: Path, marks: Iterable[str] = ()) -> None:
    """rmtree of a directory of ours, but the files in `marks` (those that say "ours": a marker, a manifest) go
    last, in that order, so that a kill midway leaves it recognisable and a later run finishes the job."""
    marks = tuple(marks)
    try:
        children = list(path.iterdir())
    except FileNotFoundError:  # e.g. a partial dir, already renamed into place
        return
    for child in children:
        if child.name in marks:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    for name in marks:
        (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def publish_dir(tmp: Path, dst: Path, marks: Iterable[str] = ()) -> bool:
    """Rename the finished directory `tmp` to `dst`, so that readers find no `dst` or the whole one, never a part.

    `tmp` must be on `dst`'s file system (a `sibling`, or inside a temp dir next to `dst`): then the rename is
    atomic. Returns False when something appeared at `dst` meanwhile (a lost race, e.g. another process built the
    same thing first): what is there is left as it is, `tmp` is removed (`remove_tree`, `marks` last), and the
    caller decides whether that is fine (a cache) or an error. An empty directory at `dst` is replaced (POSIX
    rename); any other failure (disk, permissions) raises, with `tmp` left to the caller.
    """
    try:
        os.rename(tmp, dst)
    except OSError:
        if not os.path.lexists(dst):
            raise
        remove_tree(tmp, marks)
        return False
    return True


def swap_dir(
    new: Path, dst: Path, is_ours: Callable[[Path], bool], marks: Iterable[str] = (), fault: str | None = None
) -> None:
    """Replace `dst`, a directory the caller has checked is ours, by the finished directory `new`.

    A kill at any point leaves the old `dst` or the new one, or (between the two renames) no `dst` and the old
    one at `sibling(dst, ASIDE)`, which `restore_aside` puts back; never a mix, never neither for good.
    1. Rename `dst` aside: atomic, and it stays whole until the new one is in place.
    2. `is_ours` again on what was moved: `dst` may have been replaced between the caller's check and the
       rename; then it goes back untouched and this raises DestinationError (never delete what we did not create).
    3. `fault_point(fault)` (the fault tests kill here, between the renames), then rename `new` to `dst`; on any
       failure the old one goes back.
    4. Remove the old one (`remove_tree`, `marks` last); Ctrl-C meanwhile: the new `dst` is in place, so finish
       removing the old one, then stop.
    """
    old = sibling(dst, ASIDE)
    os.rename(dst, old)
    if not is_ours(old):
        os.rename(old, dst)
        raise DestinationError(f"{dst} changed while the output was being written; it was left as it is")
    if fault is not None:
        fault_point(fault)
    try:
        os.rename(new, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    try:
        remove_tree(old, marks)
    except KeyboardInterrupt:
        remove_tree(old, marks)
        raise


def restore_aside(dst: Path, asides: Iterable[Path]) -> tuple[bool, list[Path]]:
    """Put back the previous `dst` that a `swap_dir` killed between its two renames left aside.

    Only when nothing is at `dst` (else the swap finished, or never began); of several asides, the newest.
    `asides`: leftovers of dead runs (`dead_siblings(dst, [ASIDE])`) the caller has checked are ours.
    Returns whether one was put back, and the others (oldest first), which are the caller's to remove.
    """
    olds = sorted(asides, key=lambda p: p.stat().st_mtime)
    if olds and not os.path.lexists(dst):
        os.rename(olds.pop(), dst)
        return True, olds
    return False, olds
