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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from opensci_patch import __version__
from opensci_patch._util.defaults import MANIFEST
from opensci_patch._util.errors import ModelDirError
from opensci_patch._util.faults import fault_point
from opensci_patch._util.fs import write_atomic
from opensci_patch.rewrite.patches import Patch, Status

TOOL = "opensci-patch"
CHUNK = 8 << 20
SKIP_DIRS = {"__pycache__"}


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
class PatchedFile(FileReport):
    """A top-level Python file's report, with its bytes before and after the patches (for the copy and the diff)."""

    before: bytes
    after: bytes
    refused: dict[str, list[str]] = field(default_factory=dict)  # patch -> what it left as it was, and why

    @classmethod
    def of(
        cls, path: str, before: bytes, after: bytes, statuses: dict[str, Status], refused: dict[str, list[str]]
    ) -> PatchedFile:
        return cls(path, _sha(before), _sha(after), statuses, before, after, refused)


def made_by_us(path: Path) -> bool:
    """Whether `path` holds our manifest, i.e. an earlier hotfix made it (the one thing --force may replace)."""
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        return False


def write_manifest(
    out: Path, src: Path, summary: dict[str, Status], patches: list[Patch], files: Iterable[FileReport]
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


def copy_tree(src: Path, out: Path, patched: dict[str, PatchedFile]) -> tuple[FileReport, ...]:
    """Copy `src` into `out` (following symlinks, e.g. a Hugging Face cache snapshot), hashing as it goes.

    The files in `patched` are written patched. Two links to one directory give two copies; only a link back to
    a directory above it (which would never end) is an error. Anything but regular files and directories (a
    pipe would block the copy forever; a dangling link has nothing to copy) is refused with its path.
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
                    target.write_bytes(patched[key].after)
                    shutil.copymode(path, target)
                    files.append(patched[key])
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
