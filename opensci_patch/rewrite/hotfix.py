"""Copy a model directory and apply the source patches to its Python files, safely.

Safety rules, because the input is a user's (possibly only) copy of a multi-GB checkpoint:
- SRC is only ever read.
- DST appears atomically: everything is built in a hidden sibling directory (same file
  system) and renamed into place, so Ctrl-C or a crash leaves either no DST or the old one,
  never a half-written one; the partial directory is removed on any exception.
- One run per DST at a time: the run holds an exclusive `flock` on `.<DST>.lock` next to DST
  from the first check to the swap; a second run to the same DST fails at once. SIGKILL leaves
  `.<DST>.partial-<pid>-<hex>` (or `.old-` during a swap); the next run to that DST removes
  those of dead pids, and only those it recognises as its own (a marker file or our manifest),
  and puts a previous output back that a killed swap had moved aside.
- An existing DST is replaced only with `force=True` and only if it holds our manifest
  (`opensci_patch_manifest.json`), i.e. an earlier hotfix made it: a directory we did not
  create is never deleted, force or not. Checked again at the swap: a directory that appeared
  at DST during the run (a user's, another tool's) is left as it is and the run fails. DST equal
  to SRC, inside SRC, or containing SRC is refused.
- A symlinked SRC is read through the link; the default DST is `<SRC>_fixed` next to the link as
  the user named it, not next to the link's target. Links inside SRC are followed; two links to
  one directory are copied twice; only a link back to a directory above it is a loop (an error).
- Weights are copied, never hard-linked: a hard link shares the inode, so a later in-place
  write to the output would silently change the input. Each file is hashed while it is
  copied, in chunks, so multi-GB files are read once and never held in memory.
- Idempotent: hotfixing a fixed directory changes nothing and says so per patch.

Only the top-level `*.py` files are patched: transformers loads remote code from the top of
the model directory. Each patch reports "not-applicable" for files without its construct.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from opensci_patch import __version__
from opensci_patch._util.defaults import MANIFEST
from opensci_patch._util.errors import DestinationError, ModelDirError
from opensci_patch._util.faults import fault_point
from opensci_patch._util.fs import claim_dir
from opensci_patch._util.procs import pid_alive
from opensci_patch.rewrite.patches import PATCHES, Patch, Status, apply_patches, select

TOOL = "opensci-patch"
PARTIAL_MARK = ".opensci-patch-partial"  # inside a partial dir until the swap: "ours, being written by pid N"
LOCK_TEXT = "opensci-patch hotfix lock\n"
CHUNK = 8 << 20
SKIP_DIRS = {"__pycache__"}
STATUS_TEXT = {
    "applied": "applied",
    "already-applied": "already patched: nothing to change",
    "not-applicable": "not applicable: the model code has no such construct",
}


@dataclass(frozen=True)
class FileReport:
    """One file of the output: its path relative to the model dir, hashes, patch statuses (Python only)."""

    path: str
    sha256_in: str
    sha256_out: str
    patches: dict[str, Status]

    @property
    def changed(self) -> bool:
        return self.sha256_in != self.sha256_out


@dataclass(frozen=True)
class HotfixResult:
    dst: Path  # where the output is (check mode: where it would be)
    summary: dict[str, Status]  # patch name -> applied / already-applied / not-applicable, over all files
    changed_files: int
    diff: str  # unified diff of the patched files (empty when nothing changes)
    files: tuple[FileReport, ...]  # check mode: the Python files only
    check: bool


@dataclass(frozen=True)
class _Patched:
    path: str
    before: bytes
    after: bytes
    statuses: dict[str, Status]


def hotfix(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    check: bool = False,
    force: bool = False,
    extras: Iterable[str] = (),
    only: Iterable[str] | None = None,
    log: Callable[[str], object] = print,
) -> HotfixResult:
    """Copy model dir `src` to `dst` (default: sibling `<src>_fixed`) with the patches applied.

    `extras` names opt-in patches to add to the defaults; `only` replaces the selection. `check=True` writes nothing and
    returns (and logs) the diff. Raises ModelDirError for an unusable SRC, DestinationError for
    a DST we may not write, PatchError when a needed patch cannot be applied.
    """
    source = _validate_source(Path(src))
    named = Path(os.path.abspath(src))  # as the user named it: a symlinked SRC's output goes next to the link
    target = Path(dst) if dst is not None else named.parent / f"{named.name}_fixed"
    patches = select(extras, only)
    if check:
        patched = _patch_all(source, patches)
        summary = _summary(patched, patches)
        diff = "".join(_diff(p) for p in patched)
        files = tuple(FileReport(p.path, _sha(p.before), _sha(p.after), p.statuses) for p in patched)
        changed = sum(f.changed for f in files)
        _log_summary(log, source, target, summary, patched, check=True)
        if diff:
            log(diff.rstrip("\n"))
        log(f"check only: {changed} file(s) would change; nothing written")
        return HotfixResult(target, summary, changed, diff, files, check=True)

    target = _prepare_destination(source, target, force)  # before the work, to fail fast
    with _exclusive(target):
        _remove_stale(target, log)  # may put back an output a killed swap had moved aside
        _check_existing(target, force)  # again, now that no other hotfix can write there
        patched = _patch_all(source, patches)
        summary = _summary(patched, patches)
        diff = "".join(_diff(p) for p in patched)
        files = _build(source, target, {p.path: p for p in patched}, summary, patches, force)
    changed = sum(f.changed for f in files)
    _log_summary(log, source, target, summary, patched, check=False)
    log(f"wrote {target} ({changed} file(s) changed; manifest {MANIFEST})")
    return HotfixResult(target, summary, changed, diff, files, check=False)


# --- source -------------------------------------------------------------------------------------


def _validate_source(src: Path) -> Path:
    if not src.exists():
        raise ModelDirError(f"{src}: no such directory")
    if not src.is_dir():
        raise ModelDirError(f"{src}: not a directory; point at a model directory")
    if not (src / "config.json").is_file():
        raise ModelDirError(f"{src}: no config.json; not a model directory")
    from opensci_patch._util.model_dir import read_config

    read_config(src)  # a JSON object, or one line saying what it is instead
    if not any(p.is_file() for p in src.glob("modeling_*.py")):
        raise ModelDirError(f"{src}: no modeling_*.py; hotfix repairs remote-code model directories")
    return src.resolve()


def _patch_all(source: Path, patches: list[Patch]) -> list[_Patched]:
    return [_patch_file(path, patches) for path in sorted(source.glob("*.py")) if path.is_file()]


def _patch_file(path: Path, patches: list[Patch]) -> _Patched:
    before = path.read_bytes()
    try:
        text = before.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelDirError(f"{path}: not UTF-8 text ({exc.reason})") from None
    new_text, statuses = apply_patches(text, patches, str(path))
    return _Patched(path.name, before, new_text.encode("utf-8") if new_text != text else before, statuses)


def _summary(patched: list[_Patched], patches: list[Patch]) -> dict[str, Status]:
    """Per patch, the strongest status over all files: applied > already-applied > not-applicable."""
    rank: list[Status] = ["not-applicable", "already-applied", "applied"]
    return {
        patch.name: max((p.statuses[patch.name] for p in patched), key=rank.index, default="not-applicable")
        for patch in patches
    }


def _diff(p: _Patched) -> str:
    if p.before == p.after:
        return ""
    lines = difflib.unified_diff(
        p.before.decode("utf-8").splitlines(keepends=True),
        p.after.decode("utf-8").splitlines(keepends=True),
        fromfile=f"a/{p.path}",
        tofile=f"b/{p.path}",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


# --- destination --------------------------------------------------------------------------------


def _made_by_us(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        return False


def _prepare_destination(src: Path, dst: Path, force: bool) -> Path:
    if dst.is_symlink():
        raise DestinationError(f"{dst} is a symbolic link; give the real output path")
    resolved = dst.resolve()
    if resolved == src or resolved.is_relative_to(src):
        raise DestinationError(f"{dst} is the source directory or inside it; choose an output outside {src}")
    if src.is_relative_to(resolved):
        raise DestinationError(f"{dst} contains the source directory {src}; choose another output")
    _check_existing(resolved, force)
    try:
        resolved.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DestinationError(f"cannot create {resolved.parent}: {exc.strerror}") from None
    return resolved


def _check_existing(dst: Path, force: bool) -> None:
    """Refuse an existing DST unless an earlier hotfix made it and `force` is given (also at the swap)."""
    if dst.is_symlink():
        raise DestinationError(f"{dst} is a symbolic link; give the real output path")
    if not dst.exists():
        return
    if not dst.is_dir():
        raise DestinationError(f"{dst} exists and is not a directory; choose another output")
    if not _made_by_us(dst):
        raise DestinationError(
            f"{dst} exists and was not created by opensci-patch (no {MANIFEST}); it is never replaced, "
            "even with --force: choose another output"
        )
    if not force:
        raise DestinationError(f"{dst} exists (an earlier hotfix output); pass --force to replace it")


@contextmanager
def _exclusive(dst: Path) -> Iterator[None]:
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


def _sibling(dst: Path, tag: str) -> Path:
    return dst.parent / f".{dst.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _partial_is_ours(path: Path) -> bool:
    """A partial dir we made: its marker, our manifest (written just before the swap), or nothing at all."""
    try:
        return (path / PARTIAL_MARK).is_file() or _made_by_us(path) or not any(path.iterdir())
    except OSError:
        return False


def _remove_stale(dst: Path, log: Callable[[str], object]) -> None:
    """Remove what killed runs to DST left behind; put back an output a killed swap had moved aside.

    Runs under DST's lock, so no live hotfix (of this version) writes to DST. Still only siblings named
    `.<DST>.partial-<pid>-<hex>` / `.<DST>.old-<pid>-<hex>` whose pid is gone on this host, and that hold
    our marker or manifest, are touched: never a directory we did not create.
    """
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.(partial|old)-(\d+)-[0-9a-f]{{8}}")
    stale: dict[str, list[Path]] = {"partial": [], "old": []}
    for path in dst.parent.iterdir():
        found = pattern.fullmatch(path.name)
        if not found or path.is_symlink() or not path.is_dir() or pid_alive(int(found.group(2))):
            continue
        if found.group(1) == "partial" and _partial_is_ours(path):
            stale["partial"].append(path)
        elif found.group(1) == "old" and _made_by_us(path):
            stale["old"].append(path)
    olds = sorted(stale["old"], key=lambda p: p.stat().st_mtime)
    if olds and not os.path.lexists(dst):  # killed between the two renames of a swap: the previous output
        os.rename(olds.pop(), dst)
        log(f"restored {dst}, the previous output that an interrupted hotfix had moved aside")
    for path in stale["partial"] + olds:
        log(f"removing {path.name}, left by an interrupted hotfix (pid gone)")
        _remove_tree(path)


def _remove_tree(path: Path) -> None:
    """rmtree, but the files that say "ours" (marker, manifest) go last, so a kill midway leaves it recognisable."""
    try:
        children = list(path.iterdir())
    except FileNotFoundError:  # e.g. the partial dir, already renamed into place
        return
    for child in children:
        if child.name in (PARTIAL_MARK, MANIFEST):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    for name in (MANIFEST, PARTIAL_MARK):
        (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def _build(
    src: Path,
    dst: Path,
    patched: dict[str, _Patched],
    summary: dict[str, Status],
    patches: list[Patch],
    force: bool,
) -> tuple[FileReport, ...]:
    """Write everything into a hidden sibling, then rename it into place (see the module docstring)."""
    partial = _sibling(dst, "partial")
    try:
        claim_dir(partial, PARTIAL_MARK, f"pid {os.getpid()} on {socket.gethostname()}: hotfix -> {dst}\n")
    except OSError as exc:
        raise DestinationError(f"cannot write in {dst.parent}: {exc.strerror}") from None
    try:
        fault_point("hotfix.started")
        files = _copy_tree(src, partial, patched)
        fault_point("hotfix.copied")
        manifest = {
            "tool": TOOL,
            "version": __version__,
            "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source": str(src),
            "patches": {p.name: {"status": summary[p.name], "default": p.default} for p in patches},
            "files": {
                f.path: {"sha256_in": f.sha256_in, "sha256_out": f.sha256_out, "patches": f.patches} for f in files
            },
        }
        tmp = partial / f"{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(partial / MANIFEST)  # the manifest is whole or absent
        (partial / PARTIAL_MARK).unlink()  # the manifest now says "ours"; the output must not carry the marker
        fault_point("hotfix.manifest")
        _swap_in(partial, dst, force)
    except BaseException as exc:
        _remove_tree(partial)
        if isinstance(exc, OSError):  # disk full, permissions...
            raise DestinationError(f"hotfix stopped, nothing written: {exc}") from exc
        raise
    return files


def _swap_in(partial: Path, dst: Path, force: bool) -> None:
    """Rename `partial` to DST; what is at DST now is checked again (it may have appeared during the run)."""
    if not os.path.lexists(dst):
        try:
            os.rename(partial, dst)  # fails on a non-empty directory or a file that appeared meanwhile
        except OSError as exc:
            raise DestinationError(
                f"{dst} appeared while the output was being written ({exc.strerror}); it was left as it is and "
                "nothing was written: remove it or choose another output, then run again"
            ) from None
        return
    try:
        _check_existing(dst, force)
    except DestinationError as exc:
        raise DestinationError(f"{exc} (it appeared while the output was being written; nothing written)") from None
    old = _sibling(dst, "old")
    os.rename(dst, old)
    if not _made_by_us(old):  # replaced by someone between the check and the rename: put it back, untouched
        os.rename(old, dst)
        raise DestinationError(f"{dst} changed while the output was being written; it was left as it is")
    fault_point("hotfix.swap")
    try:
        os.rename(partial, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    try:
        _remove_tree(old)
    except KeyboardInterrupt:  # the new output is in place: finish removing the old one, then stop
        _remove_tree(old)
        raise


def _copy_tree(src: Path, out: Path, patched: dict[str, _Patched]) -> tuple[FileReport, ...]:
    """Copy `src` into `out` (following symlinks, e.g. a Hugging Face cache snapshot), hashing as it goes.

    Two links to one directory give two copies; only a link back to a directory above it (which would
    never end) is an error. Anything but regular files and directories (a pipe would block the copy
    forever; a dangling link has nothing to copy) is refused with its path.
    """
    files: list[FileReport] = []

    def walk(directory: Path, rel: Path, above: tuple[str, ...]) -> None:
        (out / rel).mkdir(exist_ok=True)
        for name in sorted(os.listdir(directory)):
            path, rel_path = directory / name, rel / name
            try:
                info = os.stat(path)  # follows links
            except FileNotFoundError:
                target = os.readlink(path) if path.is_symlink() else "?"
                raise ModelDirError(
                    f"{path}: broken symbolic link (to {target}); fix or remove it in the model directory"
                ) from None
            if stat.S_ISDIR(info.st_mode):
                if name in SKIP_DIRS:
                    continue
                real = os.path.realpath(path)
                if real in above:
                    raise ModelDirError(f"{path}: symbolic link loop (it leads back to {real}); remove that link")
                walk(path, rel_path, (*above, real))
            elif stat.S_ISREG(info.st_mode):
                key = rel_path.as_posix()
                if key == MANIFEST:
                    continue  # an earlier hotfix's manifest: this run writes its own
                target = out / rel_path
                if key in patched:
                    p = patched[key]
                    target.write_bytes(p.after)
                    shutil.copymode(path, target)
                    files.append(FileReport(key, _sha(p.before), _sha(p.after), p.statuses))
                else:
                    digest = _copy_hashing(path, target)
                    files.append(FileReport(key, digest, digest, {}))
            else:
                raise ModelDirError(
                    f"{path}: not a regular file or directory (a pipe, socket or device); "
                    "remove it from the model directory"
                )

    walk(src, Path(), (os.path.realpath(src),))
    return tuple(files)


def _copy_hashing(source: Path, target: Path) -> str:
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(CHUNK))
    with open(source, "rb") as fin, open(target, "xb") as fout:
        while n := fin.readinto(buffer):
            digest.update(buffer[:n])
            fout.write(buffer[:n])
            fault_point("hotfix.chunk")  # tests/test_faults.py: killed midway through the copy
    shutil.copystat(source, target)
    return digest.hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- reporting ----------------------------------------------------------------------------------


def _log_summary(
    log: Callable[[str], object],
    src: Path,
    dst: Path,
    summary: dict[str, Status],
    patched: list[_Patched],
    *,
    check: bool,
) -> None:
    log(f"{TOOL} {__version__}: hotfix {src} -> {dst}" + (" (check only)" if check else ""))
    width = max(map(len, summary), default=0)
    for name, status in summary.items():
        where = [p.path for p in patched if p.statuses[name] == "applied"]
        detail = f" in {', '.join(where)}" if status == "applied" else ""
        log(f"  {name:<{width}}  {STATUS_TEXT[status]}{detail}")
    skipped = [p.name for p in PATCHES if p.name not in summary]
    if skipped:
        log(f"  (opt-in, not selected: {', '.join(skipped)})")
