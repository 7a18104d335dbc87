"""The main job on the shipped checkpoint, and its verdict against a reference record shipped with it.

`opensci-patch demo` hotfixes a copy of the shipped checkpoint, captures the original and the
patched model with the installed transformers, and compares the patched capture with
`data/opensci-tiny.reference.json`: the capture of the same hotfixed checkpoint on transformers
4.48.0 (fp32, eager, CPU). A demo that only printed logits would call 5.24.0's broken decode loop
fine (its first logits are right); the verdict line says MATCH or MISMATCH, and MISMATCH exits 1.

MATCH is `verdict.same_tokens_within(TOLERANCE)`: the same 20 greedy tokens, the same top-10 token
ids in the same order, their logits within `TOLERANCE`, and the KV-cache self-check passed. Bit
identity (the logits' sha256) is reported, but not required: another CPU's SIMD path or another
torch may round differently while being right. `tests/test_demo.py` checks that the shipped record
is what 4.48.0 gives today.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from opensci_patch._util.defaults import DATA_DIR, FIXTURE_DIR
from opensci_patch._util.errors import DestinationError
from opensci_patch.measure.records import Record, RecordError, load
from opensci_patch.results.verdict import same_tokens_within

REFERENCE_RECORD = DATA_DIR / "opensci-tiny.reference.json"
TOLERANCE = 1e-4  # fp32 logits; the fp64 reference agrees to 3.5e-6 on every supported release


def write_fixture(dst: Path, force: bool = False, source: Path = FIXTURE_DIR) -> Path:
    """Copy the shipped checkpoint to `dst`; refuse to touch an existing non-empty dir without force."""
    if dst.exists() and not dst.is_dir():
        raise DestinationError(f"{dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise DestinationError(
            f"{dst} exists and is not empty; choose another path or pass --force to overwrite the fixture files in it"
        )
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(source.iterdir()):
        if f.is_file():
            shutil.copyfile(f, dst / f.name)
    return dst


def compare(record: Record, reference: Record, tolerance: float = TOLERANCE) -> tuple[bool, str]:
    """(match, one line saying why) for a patched capture against the shipped reference record."""
    where = f"transformers {reference.environment.get('transformers')} reference"
    match, why = same_tokens_within(tolerance)(record, reference)
    return match, f"{'MATCH' if match else 'MISMATCH'} with the {where}: {why}"


OUTPUTS = ("opensci-tiny", "opensci-tiny_fixed", "record-original.json", "record-patched.json")  # in a workdir


def check_workdir(work: Path, force: bool) -> None:
    """Refuse a workdir holding an earlier demo's outputs unless `force`; with it, refuse (before anything is
    written) any of them that is not the demo's own: a checkpoint copy that differs from the shipped one, an
    output dir without hotfix's manifest, a file that is not a capture record."""
    from opensci_patch.rewrite.hashed_copy import made_by_us

    earlier = [name for name in OUTPUTS if os.path.lexists(work / name)]
    if earlier and not force:
        raise DestinationError(
            f"{work} already holds {', '.join(earlier)}; pass --force to run the demo there again, replacing "
            "them (only if an earlier demo wrote them), or choose another work directory"
        )
    for name in earlier:
        path = work / name
        if name == OUTPUTS[0]:
            ours = path.is_dir() and not path.is_symlink() and _is_shipped_copy(path)
        elif name == OUTPUTS[1]:
            ours = path.is_dir() and not path.is_symlink() and made_by_us(path)
        else:
            ours = path.is_file() and not path.is_symlink() and _is_record(path)
        if not ours:
            raise DestinationError(
                f"{path} was not written by demo (or fixture); it is never replaced, even with --force: "
                "choose another work directory"
            )


def _is_shipped_copy(path: Path) -> bool:
    """Every file in `path` is byte for byte the shipped checkpoint's file of that name (what demo or fixture wrote)."""
    for entry in path.iterdir():
        shipped = FIXTURE_DIR / entry.name
        if entry.is_symlink() or not (entry.is_file() and shipped.is_file() and filecmp.cmp(entry, shipped, False)):
            return False
    return True


def _is_record(path: Path) -> bool:
    try:
        load(path)
    except RecordError:
        return False
    return True


def run(workdir: Path | None, force: bool = False, log=print) -> int:
    """fixture -> hotfix -> capture original and patched (child processes) -> verdict. Returns the exit code.

    `force`: run again in a workdir an earlier demo wrote, replacing its outputs (only those: `check_workdir`)."""
    from opensci_patch.rewrite.hotfix import hotfix

    work = workdir or Path(tempfile.mkdtemp(prefix="opensci-demo-"))
    check_workdir(work, force)
    orig = write_fixture(work / OUTPUTS[0], force=force)
    fixed = work / OUTPUTS[1]
    hotfix(orig, fixed, force=force)
    rc = 0
    for name, model in (("original", orig), ("patched", fixed)):
        log(f"== capture: {name} model")
        out = work / f"record-{name}.json"
        cmd = [sys.executable, "-m", "opensci_patch.cli", "capture", str(model), "--quiet", "--out", str(out)]
        cmd += ["--force"] if force else []
        proc = subprocess.run(cmd, text=True, capture_output=True)
        log(proc.stdout.strip())
        if proc.returncode not in (0, 1):
            print(proc.stderr.strip(), file=sys.stderr)
            rc = proc.returncode
        elif name == "patched":
            match, line = compare(load(out), load(REFERENCE_RECORD))
            log(line)
            if not match:
                rc = 1
    log(f"records and model dirs are in {work}")
    for line in newer_release_note():
        log(line)
    return rc


def newer_release_note(fetch=None) -> list[str]:
    """Two lines when the package index has a final transformers newer than the installed one, else none.

    pip keeps an installed transformers, and installs only a release whose dependency pins the index can meet:
    the per-release env of `cell` tests the newest one anyway, with the committed overrides where that release
    needs one (none today). Offline (index unreachable) this says nothing and waits 5 s at most."""
    from importlib import metadata

    from packaging.version import Version

    from opensci_patch.matrix import overrides, releases

    try:
        installed = Version(metadata.version("transformers"))
        finals = [v for v in (fetch or (lambda: releases.index_versions(timeout=5)))() if not v.is_prerelease]
    except (metadata.PackageNotFoundError, releases.IndexUnreachable):
        return []
    newest = max(finals, default=None)
    if newest is None or newest <= installed:
        return []
    committed = overrides.COMMITTED
    needed = committed.is_file() and overrides.for_release(overrides.load(committed), str(newest))
    lift = f" --overrides {committed}" if needed else ""
    return [
        f"note: the package index has transformers {newest}, newer than the installed {installed}",
        f"note: to test {newest}: opensci-patch cell --transformers 4.48.0 --transformers {newest}{lift} "
        "&& opensci-patch report",
    ]
