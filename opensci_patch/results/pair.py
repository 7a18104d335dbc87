"""matrix.md and summary.json written into the results directory, each whole, both with one run id.

The directory is checked before anything is computed; one report at a time writes into it. No journal: both
files are regenerable from the records, so a report killed between its two writes leaves two run ids, which
the next report tells (`check_pair`) and replaces. Nothing found in the results directory is ever renamed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import secrets
from pathlib import Path

from opensci_patch._util import fs
from opensci_patch._util.errors import DestinationError
from opensci_patch._util.faults import fault_point


def check_results_dir(results_dir: Path) -> None:
    """One line (exit 2) before anything is computed or written, for a path that cannot hold results."""
    if results_dir.exists() and not results_dir.is_dir():
        raise DestinationError(f"{results_dir}: not a directory; pass --results a directory")
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DestinationError(
            f"{results_dir}: cannot create ({exc.strerror or exc}); pass a writable --results"
        ) from None
    if not os.access(results_dir, os.W_OK | os.X_OK):
        raise DestinationError(f"{results_dir}: not writable; pass a writable --results")


def _run_id_of(path: Path) -> str | None:
    """The run id a written matrix.md or summary.json carries (None: absent, not a regular file, or not ours)."""
    try:
        if not path.is_file():  # never opened: a FIFO would block
            return None
        if path.suffix == ".json":
            found = json.loads(path.read_text(encoding="utf-8")).get("run_id")
            return found if isinstance(found, str) else None
        with open(path, encoding="utf-8", errors="replace") as fh:
            m = re.search(r"^Report run `([^`\n]+)`", fh.read(1 << 16), re.M)  # in the second paragraph
        return m[1] if m else None
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def check_pair(results_dir: Path) -> str | None:
    """One line when matrix.md and summary.json carry different run ids (a report killed between its two
    writes, or a file edited by hand): both are of the last whole run only when they agree."""
    md, summary = _run_id_of(results_dir / "matrix.md"), _run_id_of(results_dir / "summary.json")
    if md is None or summary is None or md == summary:
        return None
    return (
        f"{results_dir}: matrix.md (run {md}) and summary.json (run {summary}) are of two different report runs "
        "(one was killed between its writes?); this report compares with summary.json and writes both"
    )


def write_run(results_dir: Path, markdown: str, summary: dict) -> None:
    """matrix.md and summary.json stamped with one run id (time, pid, random), each written whole
    (`fs.write_atomic`), one report at a time (a lock file in the results dir): matrix.md first, summary.json,
    what the next report compares with, last. A run killed between the two leaves two run ids (matrix.md's
    second paragraph, summary.json's "run_id"), which `check_pair` tells."""
    run_id = f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    markdown = markdown.replace("\n\n", f"\n\nReport run `{run_id}` (the same in summary.json).\n\n", 1)
    with fs.locked(results_dir / ".report.lock"):
        fs.write_atomic(results_dir / "matrix.md", markdown)
        fault_point("report.between")
        fs.write_atomic(results_dir / "summary.json", {**summary, "run_id": run_id})
