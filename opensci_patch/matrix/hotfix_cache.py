"""The matrix's hotfix cache: each (variant, source) hotfixed once per version of this code and of the source's files.

The hotfix output depends only on the source files, the variant's hotfix options and this tool's code, so it is
kept in the env root (`_hotfix-cache/`) across runs and shared by the sweep (`runner.hotfix_variants`) and diagnose.
A miss is hotfixed here, in the calling process (the driver), not in a per-release env: a release whose env cannot
be built still has its hotfix. (The `relative_imports` patch checks its targets against the installed transformers,
where there is one, and a list of modules other releases have: `rewrite/patches/relative_imports.py`.) A cached
copy is reused only while its files match its manifest's sha256 values (the env root may be shared, and its files
run as model code).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import re
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from opensci_patch._util import fs
from opensci_patch._util.defaults import MANIFEST
from opensci_patch._util.errors import OpensciPatchError, format_error
from opensci_patch._util.locations import default_root
from opensci_patch.matrix.spec import VARIANTS

Log = Callable[[str], None]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _tree_digest(paths: list[Path]) -> str:
    """Code and config files by content; weight files by name, size and mtime: a real checkpoint's
    gigabytes are not read again for every variant of every run."""
    digest = hashlib.sha256()
    for path in paths:
        if path.suffix in (".safetensors", ".bin", ".pt"):
            stat = path.stat()
            data = f"{stat.st_size}:{stat.st_mtime_ns}".encode()
        else:
            data = path.read_bytes()
        digest.update(str(path.name).encode() + b"\0" + data + b"\0")
    return digest.hexdigest()


@functools.cache
def _package_digest() -> str:
    """This opensci_patch's sources, read once per process (they do not change under a run)."""
    return _tree_digest(sorted(Path(__file__).resolve().parents[1].rglob("*.py")))


def hotfix_cache_dir(root: Path | None, source: Path, variant: str) -> Path:
    """Where the hotfix of `source` for `variant` is kept across runs: keyed by the source's files, the
    variant's hotfix options and every source file of this opensci_patch (a code change is a new key)."""

    key = hashlib.sha256(
        "\n".join(
            (
                _tree_digest(sorted(p for p in source.iterdir() if p.is_file())),
                json.dumps(VARIANTS[variant].hotfix),
                _package_digest(),
            )
        ).encode()
    ).hexdigest()[:20]
    return (
        (root or default_root()).expanduser().absolute()
        / "_hotfix-cache"
        / key
        / hotfix_dir(Path(), source, variant).name
    )


def _keep_in_cache(out: Path, cached: Path) -> None:
    """Copy a finished hotfix output into the cache (temp + rename: whole or absent; a lost race is fine)."""
    tmp = fs.sibling(cached, "tmp")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(out, tmp)
        fs.publish_dir(tmp, cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _intact(cached: Path) -> bool:
    """Whether a cached hotfix output still matches its manifest's sha256s (the env root may be shared, and its
    files are run as model code); one that does not is said on stderr and removed, so it is made again."""
    from opensci_patch.rewrite.hashed_copy import mismatches

    problems = mismatches(cached)
    if not problems:
        return True
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    print(f"opensci-patch: warning: the cached hotfix output {cached} does not match its manifest "
          f"({problems[0]}{more}); hotfixing again", file=sys.stderr)  # fmt: skip
    aside = fs.sibling(cached, "bad")
    try:
        cached.rename(aside)
    except OSError:
        return False  # another run moved it first
    fs.remove_tree(aside, [MANIFEST])
    return False


def hotfix_dir(tmp: Path, source: Path, variant: str) -> Path:
    """Where a run hotfixes `variant`: a basename of its own (the remote-code module name comes from it)."""
    return tmp / "models" / f"{_slug(source.name)}_{_slug(variant)}"


def hotfix_options(variant: str) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """(extras, only) of the hotfix `variant` declares (`Variant.hotfix`: `--with P` / `--only P` pairs)."""
    options = VARIANTS[variant].hotfix or ()
    pairs = list(zip(options[::2], options[1::2], strict=True))
    unknown = sorted({flag for flag, _ in pairs} - {"--with", "--only"})
    if unknown:
        raise ValueError(f"variant {variant!r}: unknown hotfix option(s) {', '.join(unknown)}")
    only = tuple(p for flag, p in pairs if flag == "--only")
    return tuple(p for flag, p in pairs if flag == "--with"), only or None


def run_hotfix(variant: str, source: Path, out: Path) -> str | None:
    """Hotfix `source` for `variant` into `out`, in this process; None, or why it failed (the error line as the CLI
    prints it, or the traceback of a bug). Its log lines are not printed; what it says on stderr goes with a failure."""
    from opensci_patch.rewrite.hotfix import hotfix

    extras, only = hotfix_options(variant)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            hotfix(source, out, extras=extras, only=only, log=lambda m: None)
    except OpensciPatchError as exc:
        return err.getvalue() + format_error(exc) + "\n"
    except Exception:  # noqa: BLE001 - a bug in the hotfix of one variant is that variant's hotfix-error
        return err.getvalue() + traceback.format_exc()
    return None


def hotfix_once(
    wanted: list[tuple[str, Path]], env_root: Path | None, tmp: Path, log: Log
) -> dict[tuple[str, Path], Path | str]:
    """Each (variant, source)'s hotfix output, made once per version of this code and of the source's files.

    The one front door of the hotfix cache, for the sweep (`hotfix_variants`) and for diagnose: a
    (variant, source) hotfixed before is reused from `hotfix_cache_dir`; a miss is hotfixed in this process
    (`run_hotfix`) into `hotfix_dir(tmp, ...)` and kept in the cache. A miss that failed maps to why (its stderr).
    """
    made: dict[tuple[str, Path], Path | str] = {}
    for variant, source in dict.fromkeys(wanted):
        cached = hotfix_cache_dir(env_root, source, variant)
        if (cached / MANIFEST).is_file() and _intact(cached):
            log(f"{variant}: hotfix output reused from {cached.parent}")
            made[(variant, source)] = cached
            continue
        out = hotfix_dir(tmp, source, variant)
        why = run_hotfix(variant, source, out)
        if why is None and out.is_dir():
            made[(variant, source)] = out
            _keep_in_cache(out, cached)
        else:
            made[(variant, source)] = why or "the hotfix wrote no output\n"
    return made
