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
  one directory are copied twice; a link to a directory above it (SRC's parent too) is a loop, and a
  link to the directory that holds DST would copy the output into itself: both are errors, found (as
  are pipes, devices, broken links) by a walk of SRC before anything is written, by `--check` too.
- Weights are copied, never hard-linked: a hard link shares the inode, so a later in-place
  write to the output would silently change the input. Each file is hashed while it is
  copied, in chunks, so multi-GB files are read once and never held in memory.
- Idempotent: hotfixing a fixed directory changes nothing and says so per patch.

Only the top-level `*.py` files are patched: transformers loads remote code from the top of
the model directory. Each patch reports "not-applicable" for files without its construct.

This module patches the Python files and runs the steps; `destination` guards DST (checks, lock, leftovers,
the partial dir and the swap, with the renames of `opensci_patch._util.fs`), `hashed_copy` copies and hashes
the files and writes the manifest.
"""

from __future__ import annotations

import ast
import difflib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from opensci_patch import __version__
from opensci_patch._util.defaults import MANIFEST
from opensci_patch._util.errors import ModelDirError
from opensci_patch._util.faults import fault_point
from opensci_patch.rewrite.destination import (
    PARTIAL_MARK,
    check_existing,
    check_overlap,
    exclusive,
    partial_dir,
    prepare_destination,
    remove_stale,
    swap_in,
)
from opensci_patch.rewrite.hashed_copy import TOOL, FileReport, PatchedFile, check_tree, copy_tree, write_manifest
from opensci_patch.rewrite.patches import PATCHES, Patch, PatchStatus, apply_patches, select

STATUS_TEXT = {
    "applied": "applied",
    "already-applied": "already patched: nothing to change",
    "not-applicable": "not applicable: the model code has no such construct",
    "refused": "refused: the model code has the construct in a shape this patch does not know (below)",
}


@dataclass(frozen=True)
class HotfixResult:
    dst: Path  # where the output is (check mode: where it would be)
    summary: dict[str, PatchStatus]  # patch name -> applied / already-applied / not-applicable, over all files
    changed_files: int
    diff: str  # unified diff of the patched files (empty when nothing changes)
    files: tuple[FileReport, ...]  # check mode: the Python files only
    check: bool
    refused: tuple[str, ...] = ()  # "FILE: patch 'NAME': why" for each construct a patch left as it was


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
    a DST we may not write, PatchError when a file cannot be parsed or a rewrite does not verify. A construct
    a patch does not know is refused, the other patches still apply, and the output is written: each refusal
    is logged, listed in the manifest and in `HotfixResult.refused` (the CLI then exits 1).
    """
    source = _validate_source(Path(src))
    named = Path(os.path.abspath(src))  # as the user named it: a symlinked SRC's output goes next to the link
    target = Path(dst) if dst is not None else named.parent / f"{named.name}_fixed"
    patches = select(extras, only)
    if check:  # the run's input checks, writing nothing
        check_tree(source, check_overlap(source, target))
        patched = _patch_all(source, patches)
        summary = _summary(patched, patches)
        diff = "".join(_diff(p) for p in patched)
        changed = sum(p.changed for p in patched)
        _log_summary(log, source, target, summary, patched, check=True)
        if diff:
            log(diff.rstrip("\n"))
        log(f"check only: {changed} file(s) would change; nothing written")
        return HotfixResult(target, summary, changed, diff, tuple(patched), check=True, refused=_refused(patched))

    target = prepare_destination(source, target, force)  # before the work, to fail fast
    check_tree(source, target)  # what the copy refuses, before anything is written
    with exclusive(target):
        remove_stale(target, log)  # may put back an output a killed swap had moved aside
        check_existing(target, force)  # again, now that no other hotfix can write there
        patched = _patch_all(source, patches)
        summary = _summary(patched, patches)
        diff = "".join(_diff(p) for p in patched)
        files = _build(source, target, {p.path: p for p in patched}, summary, patches, force)
    changed = sum(f.changed for f in files)
    _log_summary(log, source, target, summary, patched, check=False)
    log(f"wrote {target} ({changed} file(s) changed; manifest {MANIFEST})")
    return HotfixResult(target, summary, changed, diff, files, check=False, refused=_refused(patched))


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


def _patch_all(source: Path, patches: list[Patch]) -> list[PatchedFile]:
    return [_patch_file(path, patches) for path in sorted(source.glob("*.py")) if path.is_file()]


def _patch_file(path: Path, patches: list[Patch]) -> PatchedFile:
    before = path.read_bytes()
    try:
        text = before.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelDirError(f"{path}: not UTF-8 text ({exc.reason})") from None
    tree = _python_tree(path, text)
    refused: dict[str, list[str]] = {}
    try:
        new_text, statuses = apply_patches(text, patches, str(path), refused)
    except RecursionError:  # libcst walks and prints trees recursively; Python's own parser took the file
        raise ModelDirError(
            f"{path}: line {_deepest_statement(tree)}: nested too deeply for libcst, the parser the patches use "
            "(an expression of hundreds of terms, or a long elif chain); split it into smaller statements"
        ) from None
    after = new_text.encode("utf-8") if new_text != text else before
    return PatchedFile.of(path.name, before, after, statuses, refused)


def _refused(patched: list[PatchedFile]) -> tuple[str, ...]:
    return tuple(f"{p.path}: patch {n!r}: {why}" for p in patched for n, whys in p.refused.items() for why in whys)


def _python_tree(path: Path, text: str) -> ast.Module:
    """The file as Python's own parser reads it, else one line: libcst's native parser crashes the process on some
    nestings Python refuses (thousands of brackets), so a file goes to libcst only once Python has parsed it."""
    try:
        return ast.parse(text, str(path))
    except SyntaxError as exc:
        raise ModelDirError(f"{path}: syntax error at line {exc.lineno}, column {exc.offset or 1}: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError) as exc:  # too deep for Python's parser too; NUL bytes
        why = str(exc) or "nested too deeply"
        raise ModelDirError(f"{path}: Python cannot parse it ({type(exc).__name__}: {why})") from None


def _deepest_statement(tree: ast.Module) -> int:
    """The line of the statement holding the most deeply nested node (walked without recursion)."""
    deepest, line = -1, 1
    stack: list[tuple[ast.AST, int, int]] = [(tree, 0, 1)]
    while stack:
        node, depth, at = stack.pop()
        at = node.lineno if isinstance(node, ast.stmt) else at
        if depth > deepest:
            deepest, line = depth, at
        stack.extend((child, depth + 1, at) for child in ast.iter_child_nodes(node))
    return line


def _summary(patched: list[PatchedFile], patches: list[Patch]) -> dict[str, PatchStatus]:
    """Per patch, the strongest status over all files: refused > applied > already-applied > not-applicable."""
    rank: list[PatchStatus] = ["not-applicable", "already-applied", "applied", "refused"]
    return {
        patch.name: max((p.patches[patch.name] for p in patched), key=rank.index, default="not-applicable")
        for patch in patches
    }


def _diff(p: PatchedFile) -> str:
    if p.before == p.after:
        return ""
    lines = difflib.unified_diff(
        p.before.decode("utf-8").splitlines(keepends=True),
        p.after.decode("utf-8").splitlines(keepends=True),
        fromfile=f"a/{p.path}",
        tofile=f"b/{p.path}",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


# --- output --------------------------------------------------------------------------------------


def _build(
    src: Path,
    dst: Path,
    patched: dict[str, PatchedFile],
    summary: dict[str, PatchStatus],
    patches: list[Patch],
    force: bool,
) -> tuple[FileReport, ...]:
    """Write everything into a hidden sibling, then rename it into place (see the module docstring)."""
    with partial_dir(dst) as partial:
        fault_point("hotfix.started")
        files = copy_tree(src, partial, dst, patched)
        fault_point("hotfix.copied")
        write_manifest(partial, src, summary, patches, files)
        (partial / PARTIAL_MARK).unlink()  # the manifest now says "ours"; the output must not carry the marker
        fault_point("hotfix.manifest")
        swap_in(partial, dst, force)
    return files


# --- reporting ----------------------------------------------------------------------------------


def _log_summary(
    log: Callable[[str], object],
    src: Path,
    dst: Path,
    summary: dict[str, PatchStatus],
    patched: list[PatchedFile],
    *,
    check: bool,
) -> None:
    log(f"{TOOL} {__version__}: hotfix {src} -> {dst}" + (" (check only)" if check else ""))
    width = max(map(len, summary), default=0)
    for name, status in summary.items():
        where = [p.path for p in patched if p.patches[name] == "applied"]
        detail = f" in {', '.join(where)}" if status == "applied" else ""
        log(f"  {name:<{width}}  {STATUS_TEXT[status]}{detail}")
        for p in patched:
            for why in p.refused.get(name, ()):
                log(f"  {'':<{width}}  refused in {p.path}: {why}")
    skipped = [p.name for p in PATCHES if p.name not in summary]
    if skipped:
        log(f"  (opt-in, not selected: {', '.join(skipped)})")
