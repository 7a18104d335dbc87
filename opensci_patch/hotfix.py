"""Copy a model directory and apply the source patches to its Python files, safely.

Safety rules, because the input is a user's (possibly only) copy of a multi-GB checkpoint:
- SRC is only ever read.
- DST appears atomically: everything is built in a hidden sibling directory (same file
  system) and renamed into place, so Ctrl-C or a crash leaves either no DST or the old one,
  never a half-written one; the partial directory is removed on any exception.
- An existing DST is replaced only with `force=True` and only if it holds our manifest
  (`opensci_patch_manifest.json`), i.e. an earlier hotfix made it: a directory we did not
  create is never deleted, force or not. DST equal to SRC, inside SRC, or containing SRC is
  refused.
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
import secrets
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import DestinationError, ModelDirError
from .patches import PATCHES, Patch, Status, apply_patches, select

MANIFEST = "opensci_patch_manifest.json"
TOOL = "opensci-patch"
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
    target = Path(dst) if dst is not None else source.parent / f"{source.name}_fixed"
    patches = select(extras, only)
    if not check:
        target = _prepare_destination(source, target, force)  # before the work, to fail fast
    patched = [_patch_file(path, patches) for path in sorted(source.glob("*.py")) if path.is_file()]
    summary = _summary(patched, patches)
    diff = "".join(_diff(p) for p in patched)
    if check:
        files = tuple(FileReport(p.path, _sha(p.before), _sha(p.after), p.statuses) for p in patched)
        changed = sum(f.changed for f in files)
        _log_summary(log, source, target, summary, patched, check=True)
        if diff:
            log(diff.rstrip("\n"))
        log(f"check only: {changed} file(s) would change; nothing written")
        return HotfixResult(target, summary, changed, diff, files, check=True)

    files = _build(source, target, {p.path: p for p in patched}, summary, patches)
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
    if not any(p.is_file() for p in src.glob("modeling_*.py")):
        raise ModelDirError(f"{src}: no modeling_*.py; hotfix repairs remote-code model directories")
    return src.resolve()


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
    if resolved.exists():
        if not resolved.is_dir():
            raise DestinationError(f"{dst} exists and is not a directory; choose another output")
        if not _made_by_us(resolved):
            raise DestinationError(
                f"{dst} exists and was not created by opensci-patch (no {MANIFEST}); it is never replaced, "
                "even with --force: choose another output"
            )
        if not force:
            raise DestinationError(f"{dst} exists (an earlier hotfix output); pass --force to replace it")
    try:
        resolved.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DestinationError(f"cannot create {resolved.parent}: {exc.strerror}") from None
    return resolved


def _sibling(dst: Path, tag: str) -> Path:
    return dst.parent / f".{dst.name}.{tag}-{secrets.token_hex(4)}"


def _build(
    src: Path, dst: Path, patched: dict[str, _Patched], summary: dict[str, Status], patches: list[Patch]
) -> tuple[FileReport, ...]:
    """Write everything into a hidden sibling, then rename it into place (see the module docstring)."""
    partial = _sibling(dst, "partial")
    try:
        partial.mkdir()
    except OSError as exc:
        raise DestinationError(f"cannot write in {dst.parent}: {exc.strerror}") from None
    try:
        files = _copy_tree(src, partial, patched)
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
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _swap_in(partial, dst)
    except BaseException as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, OSError):  # disk full, permissions, a broken link in SRC...
            raise DestinationError(f"hotfix stopped, nothing written: {exc}") from exc
        raise
    return files


def _swap_in(partial: Path, dst: Path) -> None:
    if not dst.exists():
        try:
            os.rename(partial, dst)
        except OSError as exc:
            raise DestinationError(f"{dst} appeared while the output was being written ({exc.strerror})") from None
        return
    old = _sibling(dst, "old")
    os.rename(dst, old)
    try:
        os.rename(partial, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _copy_tree(src: Path, out: Path, patched: dict[str, _Patched]) -> tuple[FileReport, ...]:
    """Copy `src` into `out` (following symlinks, e.g. a Hugging Face cache snapshot), hashing as it goes."""
    files = []
    seen: set[str] = set()
    for root, dirs, names in os.walk(src, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            raise ModelDirError(f"{root}: symbolic link loop in the model directory")
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        rel_root = Path(root).relative_to(src)
        (out / rel_root).mkdir(exist_ok=True)
        for name in sorted(names):
            rel = (rel_root / name).as_posix()
            if rel == MANIFEST:
                continue  # an earlier hotfix's manifest: this run writes its own
            source, target = Path(root) / name, out / rel_root / name
            if rel in patched:
                p = patched[rel]
                target.write_bytes(p.after)
                shutil.copymode(source, target)
                files.append(FileReport(rel, _sha(p.before), _sha(p.after), p.statuses))
            else:
                digest = _copy_hashing(source, target)
                files.append(FileReport(rel, digest, digest, {}))
    return tuple(files)


def _copy_hashing(source: Path, target: Path) -> str:
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(CHUNK))
    with open(source, "rb") as fin, open(target, "xb") as fout:
        while n := fin.readinto(buffer):
            digest.update(buffer[:n])
            fout.write(buffer[:n])
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
