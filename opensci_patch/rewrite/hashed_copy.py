"""The files of a hotfix output: the model directory copied with every file hashed as it goes (copied, never
hard-linked; see `opensci_patch.rewrite.hotfix` for why), and the manifest that lists them and says "made by
opensci-patch"."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from opensci_patch import __version__
from opensci_patch._util.defaults import MANIFEST
from opensci_patch._util.errors import ModelDirError
from opensci_patch._util.faults import fault_point
from opensci_patch._util.fs import write_atomic
from opensci_patch.rewrite.patches import Patch, PatchStatus

TOOL = "opensci-patch"
CHUNK = 8 << 20
SKIP_DIRS = {"__pycache__"}


@dataclass(frozen=True)
class FileReport:
    """One file of the output: its path relative to the model dir, hashes, patch statuses (Python only)."""

    path: str
    sha256_in: str
    sha256_out: str
    patches: dict[str, PatchStatus]

    @property
    def changed(self) -> bool:
        return self.sha256_in != self.sha256_out


@dataclass(frozen=True)
class PatchedFile(FileReport):
    """A top-level Python file's report, with its bytes before and after the patches (for the copy and the diff)."""

    before: bytes
    after: bytes
    refused: dict[str, list[str]] = field(default_factory=dict)  # patch -> what it left as it was, and why

    @classmethod
    def of(
        cls, path: str, before: bytes, after: bytes, statuses: dict[str, PatchStatus], refused: dict[str, list[str]]
    ) -> PatchedFile:
        return cls(path, _sha(before), _sha(after), statuses, before, after, refused)


def made_by_us(path: Path) -> bool:
    """Whether `path` holds our manifest, i.e. an earlier hotfix made it (the one thing --force may replace)."""
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        return False


def mismatches(out: Path) -> list[str]:
    """What in the hotfix output `out` differs from its manifest: a file whose sha256 is not the recorded
    `sha256_out`, one missing, one not listed (`__pycache__` aside), or no readable manifest. Empty: intact."""
    try:
        listed = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["files"]
        want = {str(rel): str(entry["sha256_out"]) for rel, entry in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [f"{MANIFEST}: missing or unreadable"]
    found = set()
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_dir() and not path.is_symlink() or rel == MANIFEST or SKIP_DIRS & set(path.relative_to(out).parts):
            continue
        found.add(rel)
    problems = [f"{rel}: not in the manifest" for rel in sorted(found - set(want))]
    for rel, digest in sorted(want.items()):
        if rel not in found:
            problems.append(f"{rel}: missing")
        elif (out / rel).is_symlink() or not (out / rel).is_file() or _file_sha(out / rel) != digest:
            problems.append(f"{rel}: sha256 differs from the manifest")
    return problems


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(
    out: Path, src: Path, summary: dict[str, PatchStatus], patches: list[Patch], files: Iterable[FileReport]
) -> None:
    """Write `out`'s manifest (whole or absent): tool, version, source, each patch's status, every file's hashes."""
    manifest = {
        "tool": TOOL,
        "version": __version__,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": str(src),
        "patches": {p.name: {"status": summary[p.name], "default": p.default} for p in patches},
        "files": {f.path: _file_entry(f) for f in files},
    }
    write_atomic(out / MANIFEST, manifest)


def _file_entry(f: FileReport) -> dict:
    entry = {"sha256_in": f.sha256_in, "sha256_out": f.sha256_out, "patches": f.patches}
    if getattr(f, "refused", None):
        entry["refused"] = f.refused  # patch -> what it left as it was, and why
    return entry


def walk_tree(src: Path, dst: Path) -> Iterator[tuple[Path, Path, bool]]:
    """(path, path relative to `src`, is a directory) for everything `copy_tree` copies to `dst`, in its order.

    Links are followed (e.g. a Hugging Face cache snapshot); two links to one directory are walked twice. Refused
    with the path (ModelDirError), each before the walk goes in: a link to a directory at or above one it is in
    (SRC's parent included: it would never end), a directory that holds `dst` or is inside it (the copy would copy
    its own output), anything but regular files and directories (a pipe would block the copy forever; a dangling
    link has nothing to copy).
    """

    def walk(directory: Path, rel: Path, above: tuple[Path, ...]) -> Iterator[tuple[Path, Path, bool]]:
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
                real = Path(os.path.realpath(path))
                if any(a.is_relative_to(real) for a in above):
                    raise ModelDirError(f"{path}: symbolic link loop (it leads back to {real}); remove that link")
                if dst.parent.is_relative_to(real) or real.is_relative_to(dst):
                    raise ModelDirError(
                        f"{path}: symbolic link to {real}, which holds the output {dst} (the copy would copy itself); "
                        "remove that link or choose another output"
                    )
                yield path, rel_path, True
                yield from walk(path, rel_path, (*above, real))
            elif stat.S_ISREG(info.st_mode):
                yield path, rel_path, False
            else:
                raise ModelDirError(
                    f"{path}: not a regular file or directory (a pipe, socket or device); "
                    "remove it from the model directory"
                )

    yield from walk(src, Path(), (Path(os.path.realpath(src)),))


def check_tree(src: Path, dst: Path) -> None:
    """`walk_tree`'s refusals, before anything is written (and by `hotfix --check`, which writes nothing)."""
    for _ in walk_tree(src, dst):
        pass


def copy_tree(src: Path, out: Path, dst: Path, patched: dict[str, PatchedFile]) -> tuple[FileReport, ...]:
    """Copy `src` into `out` (the partial dir that becomes `dst`) as `walk_tree` walks it, hashing as it goes.

    The files in `patched` are written patched; an earlier hotfix's manifest is left out (this run writes its own).
    """
    files: list[FileReport] = []
    for path, rel_path, is_dir in walk_tree(src, dst):
        target, key = out / rel_path, rel_path.as_posix()
        if is_dir:
            target.mkdir()
        elif key == MANIFEST:
            continue
        elif key in patched:
            target.write_bytes(patched[key].after)
            shutil.copymode(path, target)
            files.append(patched[key])
        else:
            digest = _copy_hashing(path, target)
            files.append(FileReport(key, digest, digest, {}))
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
